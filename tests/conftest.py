import os

import pytest
import torch


def pytest_runtest_logreport(report):
    # GLA_FAILURE_LOG=FILE: each failure's traceback is appended the moment it happens, so a run
    # cut short by a time limit (the GPU test machine's) still says why its failed tests failed
    path = os.environ.get("GLA_FAILURE_LOG")
    if path and report.failed and not os.environ.get("PYTEST_XDIST_WORKER"):  # once: by the controller
        with open(path, "a", encoding="utf-8") as f:
            f.write(f"==== {report.nodeid} [{report.when}, {report.duration:.1f} s]\n{report.longreprtext}\n\n")


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


@pytest.fixture
def one_torch_thread():
    """torch limited to one thread for the test (restored afterwards): the models in these tests are
    tiny, so threads only add OpenMP overhead (and contention on shared CI cores). Modules opt in with
    ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
