"""The optimizer kernel skeleton compiles, with every registered rule's update inlined and every
control on (GradScaler, clipping, skip_nonfinite, diagnostics), for sm_80 and sm_90 in float32
and float64, moves float32 in 128-bit accesses and does not spill: checked without a GPU by
compiling to PTX and running the bundled ptxas (tests/kernel_compilation.py).

A rule's update is a @triton.jit function, which JSON cannot carry to kernel_compilation's
process: so one interpreter-free subprocess imports the registry and compiles every variant."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from functools import cache
from pathlib import Path
from typing import Any

import pytest
from test_optim_kernels_compile import CONTROLS, STEP_SIGNATURE

from torchopt_lab.optim.rules import REGISTRY
from triton_kernels.optim.launchers import NUM_WARPS, NUM_WARPS_FLOAT64
from triton_kernels.optim.rule_kernels import DEFAULT_BLOCK

_ROOT = Path(__file__).resolve().parents[2]
# The rules with a triton_update inlined in the skeleton. The built-ins (rule.reference set: Adam,
# AdamW) run their own fused KernelUpdate, which test_optim_kernels_compile.py holds to the same
# checks (compiles, 128-bit accesses, no spills).
WITH_KERNEL = sorted(name for name, cls in REGISTRY.items() if cls.rule.triton_update is not None)
# Each of the 32 * NUM_WARPS threads moves BLOCK / (32 * NUM_WARPS) float32, in vectors of 4.
VECTORS_PER_TENSOR = DEFAULT_BLOCK // (32 * NUM_WARPS * 4)

_SCRIPT = """
import json, sys
sys.path[:0] = [{root!r}, {tests!r}]
import torch
import triton.language as tl
from kernel_compilation import _compile
from torchopt_lab.optim.rules import REGISTRY
from triton_kernels.optim import kernels

for name, cls in sorted(REGISTRY.items()):
    rule = cls.rule
    if rule.triton_update is None:
        continue  # a built-in: its kernel is a KernelUpdate (test_optim_kernels_compile.py)
    group = {{h.name: h.default for h in rule.hyperparameters}}
    scalar_state = {{s.name: torch.tensor(s.init) for s in rule.state if s.scalar}}
    count = len(rule.scalars(group, 1.0, scalar_state))
    for capability in (80, 90):
        for dtype in ("fp32", "fp64"):
            request = {{
                "module": "triton_kernels.optim.kernels",
                "kernel": "_optimizer_step_kernel",
                "capability": capability,
                "variant": f"{{name}}/{{dtype}}",
                "signature": {signature!r},
                "constexprs": {{
                    "UPDATE": kernels.rule_update, "OPTIONS": rule.triton_update,
                    "FIELD_COUNT": count, "STATE_COUNT": len(rule.tensor_state),
                    "HAS_STEP": False, "PARAM_DTYPE": tl.dtype(dtype),
                    "STATE_DTYPE": tl.dtype(dtype), "COMPUTE_DTYPE": tl.dtype(dtype),
                    "BLOCK": {block}, "NUMEL_MULTIPLE": 16, "ASSUME_ALIGNED": True,
                    "NORM_SLOTS": 2, "MAXIMIZE": True,
                    **dict.fromkeys({controls!r}, True),
                }},
                "num_warps": {warps64} if dtype == "fp64" else {warps},
            }}
            row = _compile(request)
            row["state_count"] = len(rule.tensor_state)
            print(json.dumps(row), flush=True)
"""


@cache
def _compiled() -> dict[tuple[str, int], dict[str, Any]]:
    script = _SCRIPT.format(
        root=str(_ROOT),
        tests=str(_ROOT / "tests"),
        signature=STEP_SIGNATURE,
        block=DEFAULT_BLOCK,
        controls=CONTROLS,
        warps=NUM_WARPS,
        warps64=NUM_WARPS_FLOAT64,
    )
    completed = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        env=dict(os.environ, TRITON_INTERPRET="0"),
        cwd=_ROOT,
        timeout=900,
        check=False,
    )
    if completed.returncode != 0:
        raise RuntimeError(f"rule kernel compilation failed:\n{completed.stderr[-4000:]}")
    rows = [json.loads(line) for line in completed.stdout.splitlines() if line.startswith("{")]
    return {(row["variant"], row["capability"]): row for row in rows}


def _rows(name: str) -> list[dict[str, Any]]:
    return [row for (variant, _), row in _compiled().items() if variant.startswith(name + "/")]


@pytest.mark.parametrize("name", WITH_KERNEL)
def test_rule_kernel_compiles_for_sm80_and_sm90(name: str) -> None:
    rows = _rows(name)
    assert len(rows) == 4
    assert all(row["ok"] for row in rows), [row["error"] for row in rows if not row["ok"]]


@pytest.mark.parametrize("name", WITH_KERNEL)
def test_rule_kernel_moves_float32_in_128_bit_accesses(name: str) -> None:
    for row in _rows(name):
        if row["variant"].endswith("/fp32"):
            # param, grad and each state in, param and each state out, in full blocks.
            tensors = 2 + row["state_count"]
            assert row["ptx_v4_loads"] >= tensors * VECTORS_PER_TENSOR, row
            assert row["ptx_v4_stores"] >= (tensors - 1) * VECTORS_PER_TENSOR, row


@pytest.mark.parametrize("name", WITH_KERNEL)
def test_rule_kernel_does_not_spill_registers(name: str) -> None:
    for row in _rows(name):
        assert row["spill_bytes"] == 0, row
