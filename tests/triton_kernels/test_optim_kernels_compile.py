"""Every optimizer kernel compiles for sm_80 and sm_90, moves float32 in 128-bit accesses, and
does not spill: checked without a GPU by compiling to PTX and running the bundled ptxas."""

from __future__ import annotations

import json
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest

from triton_kernels.optim.launchers import NUM_WARPS
from triton_kernels.optim.tables import DEFAULT_BLOCK_SIZE

SCRIPT = Path(__file__).with_name("compile_kernels.py")
# Float32 arrays each kernel reads and writes per element, in its plain variant (no options).
STREAMS = {
    "_sgd_kernel": (2, 1),
    "_adagrad_kernel": (3, 2),
    "_rmsprop_kernel": (3, 2),
    "_adam_kernel": (4, 3),
    "_grad_square_norm_kernel": (1, 0),
}
# Warps of 32 threads, 4 float32 per 128-bit access.
VECTORS_PER_STREAM = DEFAULT_BLOCK_SIZE // (NUM_WARPS * 32 * 4)


@cache
def _compiled() -> tuple[dict, ...]:
    result = subprocess.run(
        [sys.executable, str(SCRIPT)], capture_output=True, text=True, timeout=300, check=False
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return tuple(json.loads(line) for line in result.stdout.splitlines() if line.startswith("{"))


def _variants(kernel: str) -> list[dict]:
    return [row for row in _compiled() if row["kernel"] == kernel]


@pytest.mark.parametrize("kernel", sorted(STREAMS))
def test_kernel_compiles_for_sm80_and_sm90_in_every_variant(kernel):
    variants = _variants(kernel)
    expected = {(80, "plain"), (90, "plain")}
    if kernel != "_grad_square_norm_kernel":
        expected |= {(80, "full"), (90, "full"), (90, "float16"), (90, "float64")}
    assert {(row["capability"], row["variant"]) for row in variants} == expected


@pytest.mark.parametrize("kernel", sorted(STREAMS))
def test_kernel_float32_loads_and_stores_are_128_bit(kernel):
    reads, writes = STREAMS[kernel]
    for row in _variants(kernel):
        if row["variant"] == "plain":
            assert row["ld_v4"] >= reads * VECTORS_PER_STREAM, row
            assert row["st_v4"] >= writes * VECTORS_PER_STREAM, row


@pytest.mark.parametrize("kernel", sorted(STREAMS))
def test_kernel_does_not_spill_registers(kernel):
    assert all(row["spill_bytes"] == 0 for row in _variants(kernel)), _variants(kernel)


@pytest.mark.parametrize("kernel", sorted(STREAMS))
def test_float32_kernel_fits_in_64_registers_so_32_warps_stay_resident(kernel):
    # A memory-bound kernel hides latency with resident warps: at <= 64 registers per thread an
    # SM holds 4 blocks of NUM_WARPS=8 warps (65536 registers / (64 x 256 threads)).
    for row in _variants(kernel):
        if row["variant"] == "plain":
            assert row["registers"] <= 64, row
