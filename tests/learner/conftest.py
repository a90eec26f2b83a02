"""tests/learner: one torch thread in the test process. These tests run many tiny ops on a shared
2-core machine, where a second OpenMP thread only spin-waits for a busy core (measured: 17 s vs
0.7 s for the same test under load). Ray learner actors get one thread each from their CPU share."""
import pytest
import torch


@pytest.fixture(autouse=True)
def _one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
