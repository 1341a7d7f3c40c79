"""Layer tests run torch on one intra-op thread: their tensors are tiny, so threads only add
synchronisation, and under ``pytest -n 2`` on two cores two threads per worker oversubscribe the
machine (gradcheck of a small convolution went from 0.1 s to 1.5 s)."""

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_torch_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
