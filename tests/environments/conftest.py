import pytest
import torch


@pytest.fixture(autouse=True)
def _few_threads():
    # Small tensors, a shared machine: more threads than needed only adds contention.
    torch.set_num_threads(1)
    yield
