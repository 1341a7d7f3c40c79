"""Every optimizer kernel compiles for sm_80 and sm_90, moves float32 in 128-bit accesses (tails of
tensors whose sizes allow it included), and does not spill: checked without a GPU by compiling to
PTX and running the bundled ptxas."""

from __future__ import annotations

from functools import cache
from typing import Any

import pytest
from kernel_compilation import compile_kernels

from triton_kernels.optim.kernels import UPDATES
from triton_kernels.optim.launchers import NUM_WARPS, NUM_WARPS_FLOAT64
from triton_kernels.optim.tables import DEFAULT_BLOCK_SIZE

MODULE = "triton_kernels.optim.kernels"
STEP_SIGNATURE = {
    "tensor_table": "*i64",
    "block_table": "*i64",
    "tensor_count": "i32",
    "block_count": "i32",
    "hyperparameters": "*fp64",
    "grad_scale": "*fp32",
    "found_inf": "*fp32",
    "square_norms": "*fp64",
    "max_grad_norm": "fp32",
    "skipped_steps": "*i32",
    "block_counters": "*i32",
    "diagnostic_sums": "*fp32",
    "diagnostics": "*fp32",
}
NORM_SIGNATURE = {
    "tensor_table": "*i64",
    "block_table": "*i64",
    "tensor_count": "i32",
    "block_count": "i32",
    "partial_sums": "*fp64",
    "done_counter": "*i32",
    "square_norms": "*fp64",
    "slot": "i32",
}
SKIPPED_NORMS_SIGNATURE = {
    **{name: STEP_SIGNATURE[name] for name in list(STEP_SIGNATURE)[:4]},
    **{name: STEP_SIGNATURE[name] for name in ("grad_scale", "found_inf", "square_norms")},
    "max_grad_norm": "fp32",
    **{name: STEP_SIGNATURE[name] for name in ("block_counters", "diagnostic_sums", "diagnostics")},
}
# algorithm -> float32 arrays read and written per element with every option off. Its fields,
# states and options come from its declaration (kernels.UPDATES).
ALGORITHM_TABLE = {
    "sgd": (2, 1),
    "adagrad": (3, 2),
    "rmsprop": (3, 2),
    "adam": (4, 3),
}
CONTROLS = ("UNSCALE_GRADS", "CHECK_FOUND_INF", "CLIP_GRADS", "SKIP_NONFINITE", "COUNT_SKIPPED")
CONTROLS += ("RECORD_NORMS",)
# variant -> (param dtype, state dtype, compute dtype, every option and control on, NUMEL_MULTIPLE,
# capabilities). "plain": float32 with aligned sizes; "odd-sizes": some size is odd, so tails
# cannot be vectorised; "full": bfloat16 params, float32 state, everything on.
VARIANTS = {
    "plain": ("fp32", "fp32", "fp32", False, 16, (80, 90)),
    "odd-sizes": ("fp32", "fp32", "fp32", False, 1, (80, 90)),
    "full": ("bf16", "fp32", "fp32", True, 16, (80, 90)),
    "float16": ("fp16", "fp16", "fp32", True, 8, (90,)),
    "float64": ("fp64", "fp64", "fp64", True, 2, (90,)),
}
# Warps of 32 threads, 4 float32 per 128-bit access.
VECTORS_PER_STREAM = DEFAULT_BLOCK_SIZE // (NUM_WARPS * 32 * 4)


def _dtype(name: str) -> dict[str, str]:
    return {"dtype": name}


def _requests() -> list[dict[str, Any]]:
    requests = []
    for variant, (param, state, compute, on, multiple, capabilities) in VARIANTS.items():
        common = {
            "COMPUTE_DTYPE": _dtype(compute),
            "BLOCK": DEFAULT_BLOCK_SIZE,
            "NUMEL_MULTIPLE": multiple,
            "ASSUME_ALIGNED": True,
        }
        warps = NUM_WARPS_FLOAT64 if param == "fp64" else NUM_WARPS
        for capability in capabilities:
            for algorithm in ALGORITHM_TABLE:
                declaration = UPDATES[algorithm]
                constexprs = {
                    "UPDATE": {"function": f"{MODULE}:{declaration.update.__name__}"},
                    "OPTIONS": [on] * len(declaration.options),
                    "FIELD_COUNT": len(declaration.fields),
                    "STATE_COUNT": len(declaration.states),
                    "HAS_STEP": declaration.has_step,
                    "PARAM_DTYPE": _dtype(param),
                    "STATE_DTYPE": _dtype(state),
                    **common,
                    "NORM_SLOTS": 2 if on else 1,
                    **dict.fromkeys(CONTROLS, on),
                    "MAXIMIZE": on,
                }
                requests.append(
                    {
                        "module": MODULE,
                        "kernel": "_optimizer_step_kernel",
                        "capability": capability,
                        "variant": f"{algorithm}/{variant}",
                        "signature": STEP_SIGNATURE,
                        "constexprs": constexprs,
                        "num_warps": warps,
                    }
                )
            requests.append(
                {
                    "module": MODULE,
                    "kernel": "_skipped_step_norms_kernel",
                    "capability": capability,
                    "variant": f"skipped/{variant}",
                    "signature": SKIPPED_NORMS_SIGNATURE,
                    "constexprs": {
                        "PARAM_DTYPE": _dtype(param),
                        **common,
                        "NORM_SLOTS": 2 if on else 1,
                        **dict.fromkeys(CONTROLS[:4], on),
                    },
                    "num_warps": warps,
                }
            )
            requests.append(
                {
                    "module": MODULE,
                    "kernel": "_grad_square_norm_kernel",
                    "capability": capability,
                    "variant": f"norm/{variant}",
                    "signature": NORM_SIGNATURE,
                    "constexprs": {"GRAD_DTYPE": _dtype(param), **common, "REDUCE_BLOCK": 1024},
                    "num_warps": warps,
                }
            )
    return requests


@cache
def _compiled() -> dict[tuple[str, int], dict[str, Any]]:
    return {(row["variant"], row["capability"]): row for row in compile_kernels(_requests())}


def _rows(algorithm: str) -> list[dict[str, Any]]:
    return [row for (variant, _), row in _compiled().items() if variant.startswith(algorithm + "/")]


def test_the_algorithm_table_covers_every_algorithm_of_the_kernel():
    assert set(ALGORITHM_TABLE) == set(UPDATES)


@pytest.mark.parametrize("algorithm", [*ALGORITHM_TABLE, "norm", "skipped"])
def test_kernel_compiles_for_sm80_and_sm90_in_every_variant(algorithm):
    rows = _rows(algorithm)
    expected = {
        (f"{algorithm}/{variant}", capability)
        for variant, spec in VARIANTS.items()
        for capability in spec[-1]
    }
    assert {(row["variant"], row["capability"]) for row in rows} == expected
    assert all(row["ok"] for row in rows), [row["error"] for row in rows if not row["ok"]]


def _streams(algorithm: str) -> tuple[int, int]:
    return (1, 0) if algorithm == "norm" else ALGORITHM_TABLE[algorithm]


@pytest.mark.parametrize("algorithm", [*ALGORITHM_TABLE, "norm"])
def test_float32_full_blocks_and_aligned_tails_move_128_bits_per_access(algorithm):
    # Full blocks (unmasked) and the masked tails of tensors whose sizes are multiples of 16 each
    # issue VECTORS_PER_STREAM 128-bit accesses per array: twice that in all.
    reads, writes = _streams(algorithm)
    for capability in (80, 90):
        row = _compiled()[(f"{algorithm}/plain", capability)]
        assert row["ptx_v4_loads"] >= 2 * reads * VECTORS_PER_STREAM, row
        assert row["ptx_v4_stores"] >= 2 * writes * VECTORS_PER_STREAM, row


@pytest.mark.parametrize("algorithm", [*ALGORITHM_TABLE, "norm"])
def test_float32_tails_of_odd_sizes_are_masked_element_by_element(algorithm):
    # An odd size leaves only the full blocks vectorised: the claim above is not vacuous.
    reads, writes = _streams(algorithm)
    for capability in (80, 90):
        row = _compiled()[(f"{algorithm}/odd-sizes", capability)]
        assert reads * VECTORS_PER_STREAM <= row["ptx_v4_loads"] < 2 * reads * VECTORS_PER_STREAM
        assert row["ptx_v4_stores"] < 2 * writes * VECTORS_PER_STREAM or writes == 0, row


@pytest.mark.parametrize("algorithm", [*ALGORITHM_TABLE, "norm", "skipped"])
def test_kernel_does_not_spill_registers(algorithm):
    rows = _rows(algorithm)
    assert all(row["spill_bytes"] == 0 for row in rows), rows


@pytest.mark.parametrize("algorithm", [*ALGORITHM_TABLE, "norm"])
def test_float32_kernel_fits_in_64_registers_so_32_warps_stay_resident(algorithm):
    # A memory-bound kernel hides latency with resident warps: at <= 64 registers per thread an
    # SM holds 4 blocks of NUM_WARPS=8 warps (65536 registers / (64 x 256 threads)).
    for capability in (80, 90):
        row = _compiled()[(f"{algorithm}/plain", capability)]
        assert row["registers"] <= 64, row
