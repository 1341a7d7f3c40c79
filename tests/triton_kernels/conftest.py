"""The kernel tests run where the kernels would: on the GPU when there is one (compiled; the root
conftest turns the Triton interpreter on only without CUDA), else on the CPU (interpreted). Every
tensor a test makes without naming a device lands there; ``torch.get_default_device()`` names it."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

KERNEL_DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(autouse=True)
def _on_the_kernel_device() -> Iterator[None]:
    with KERNEL_DEVICE:
        yield
