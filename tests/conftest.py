import os

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    has_gpu = torch.cuda.is_available()
    for item in items:
        if "gpu" in item.keywords and not has_gpu:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU"))


@pytest.fixture(autouse=True)
def _seed_per_test(request):
    # fresh inputs every run, but reproducible from the printed seed when a test fails
    seed = int(os.environ.get("GLA_TEST_SEED", torch.seed() % (2**31)))
    torch.manual_seed(seed)
    request.node.user_properties.append(("seed", seed))
    yield
