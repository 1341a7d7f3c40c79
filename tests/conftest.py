"""Test set-up. Without CUDA, Triton kernels run on the CPU through the Triton interpreter,
which reads TRITON_INTERPRET when ``@triton.jit`` decorates: so it is set here, before any
kernel import."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

# Under pytest-xdist, each worker takes its share of the cores for torch's intra-op threads:
# N workers of N threads each oversubscribe the machine (a 2-core run of the optim_db tests took
# 410 s of wall time so, 104 s with one thread per worker).
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    torch.set_num_threads(max(1, torch.get_num_threads() // _WORKERS))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
