import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The main-job tests run tiny tensors: one intra-op thread avoids the synchronisation cost (and the
    collapse under oversubscription) of several threads on a 2-core machine. Restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
