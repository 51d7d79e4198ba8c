import pytest
import torch


@pytest.fixture(autouse=True)
def _few_threads():
    # Tests run on small tensors; more threads than cores only adds contention.
    torch.set_num_threads(1)
    yield
