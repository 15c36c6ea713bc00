import pytest
import torch


@pytest.fixture(autouse=True)
def _one_torch_thread():
    # the models here are tiny: one thread avoids OpenMP overhead (and contention on shared CI cores)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
