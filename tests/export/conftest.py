import pytest


@pytest.fixture(autouse=True)
def _one_torch_thread(one_torch_thread):
    # every test in tests/export: tiny models, one thread (tests/conftest.py's one_torch_thread)
    yield
