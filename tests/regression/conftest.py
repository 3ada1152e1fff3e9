import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    """The tiny model is too small to gain from threads, and on a shared machine extra OpenMP threads spin-wait for
    busy cores (5-10x slower). Results are bitwise the same with any thread count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
