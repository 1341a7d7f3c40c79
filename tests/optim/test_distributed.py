"""torch.distributed with torchopt_lab optimizers: two CPU processes over gloo, each case against
the same run on torch.optim (see ``distributed_worker.py``), on the torch path and the Triton path.

Tolerance: float32 results after a few steps agree to rtol 1e-5, atol 1e-6 (a different order of
float32 operations; a local instead of a global clipping norm differs by about 1e-3).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

WORKER = Path(__file__).with_name("distributed_worker.py")
ROOT = WORKER.parents[2]

pytestmark = pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed gloo"
)


def _run(case: str, tmp_path: Path) -> dict:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    completed = subprocess.run(
        [sys.executable, str(WORKER), case, str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    return torch.load(tmp_path / f"{case}.pt")


def _assert_same(results: dict) -> None:
    for backend, runs in results.items():
        for name, params in runs.items():
            if name in ("torch", "refused"):
                continue
            label = f"{backend}/{name}"
            for ours, theirs in zip(params, runs["torch"], strict=True):
                torch.testing.assert_close(
                    ours, theirs, rtol=1e-5, atol=1e-6, msg=lambda m, label=label: f"{label}: {m}"
                )


def test_ddp_with_fused_clipping_matches_torch_optim(tmp_path):
    _assert_same(_run("ddp", tmp_path))


def test_fsdp2_max_grad_norm_clips_by_the_global_norm_of_every_shard(tmp_path):
    _assert_same(_run("fsdp2", tmp_path))


def test_zero_redundancy_optimizer_with_our_optimizer_class_matches_torch_optim(tmp_path):
    results = _run("zero", tmp_path)
    _assert_same(results)
    # max_grad_norm would clip each partition by its own norm: refused, not silently wrong.
    assert all(runs["refused"] is True for runs in results.values())


def test_distributed_checkpoint_state_interchanges_with_torch_optim(tmp_path):
    _assert_same(_run("checkpoint", tmp_path))
