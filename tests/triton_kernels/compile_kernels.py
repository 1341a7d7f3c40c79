"""Compile the optimizer kernels for real GPUs, without one, and report what the code looks like.

Run as a script in a fresh process (``python tests/triton_kernels/compile_kernels.py``): the test
process has ``TRITON_INTERPRET=1`` set, under which ``@triton.jit`` yields interpreter objects that
cannot be compiled, so compilation needs an interpreter-free import of the kernels. Prints one JSON
object per compiled variant: kernel, target, vectorised load/store counts, and ptxas's spill bytes
and registers per thread.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "0"
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import get_ptxas
from triton.compiler import ASTSource

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from triton_kernels.optim import kernels
from triton_kernels.optim.launchers import NUM_WARPS, NUM_WARPS_FLOAT64
from triton_kernels.optim.tables import DEFAULT_BLOCK_SIZE

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
# Per-kernel flags: all off ("plain": float32), all on ("full": bfloat16 params with float32
# state; "float16" params and state; "float64").
KERNEL_FLAGS = {
    "_sgd_kernel": ("MAXIMIZE", "USE_MOMENTUM", "USE_NESTEROV"),
    "_adagrad_kernel": ("MAXIMIZE",),
    "_rmsprop_kernel": ("MAXIMIZE", "CENTER", "USE_MOMENTUM"),
    "_adam_kernel": ("MAXIMIZE", "USE_AMSGRAD", "DECOUPLE_WEIGHT_DECAY"),
}
CONTROL_FLAGS = ("UNSCALE_GRADS", "CHECK_FOUND_INF", "CLIP_GRADS", "SKIP_NONFINITE", "RECORD_NORMS")


def _ptxas_report(ptx: str, capability: int) -> tuple[int, int]:
    """Spill store + load bytes and registers per thread that the ptxas bundled with triton (the
    one it would run for this architecture) reports for this PTX."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "kernel.ptx"
        path.write_text(ptx)
        result = subprocess.run(
            [
                get_ptxas(capability).path,
                "-v",
                f"--gpu-name={_arch(ptx)}",
                str(path),
                "-o",
                os.devnull,
            ],
            capture_output=True,
            text=True,
            check=True,
        )
    found = re.findall(r"(\d+) bytes spill (?:stores|loads)", result.stderr)
    if not found:
        raise RuntimeError(f"ptxas -v reported no spill counts:\n{result.stderr}")
    registers = int(re.search(r"Used (\d+) registers", result.stderr).group(1))
    return sum(int(value) for value in found), registers


def _arch(ptx: str) -> str:
    """The PTX's own ``.target`` (Triton emits ``sm_90a`` for capability 90)."""
    return re.search(r"^\.target (\w+)", ptx, re.MULTILINE).group(1)


def _compile(fn, signature, constexprs, capability, name, variant):
    warps = NUM_WARPS_FLOAT64 if variant == "float64" else NUM_WARPS
    pointers = [index for index, kind in enumerate(signature.values()) if kind.startswith("*")]
    signature = dict(signature, **dict.fromkeys(constexprs, "constexpr"))
    source = ASTSource(
        fn=fn,
        signature=signature,
        constexprs=constexprs,
        attrs={(index,): [["tt.divisibility", 16]] for index in pointers},
    )
    compiled = triton.compile(
        source, target=GPUTarget("cuda", capability, 32), options={"num_warps": warps}
    )
    ptx = compiled.asm["ptx"]
    spill_bytes, registers = _ptxas_report(ptx, capability)
    return {
        "kernel": name,
        "variant": variant,
        "capability": capability,
        "ld_v4": len(re.findall(r"ld\.global(?:\.\w+)*\.v4\.b32", ptx)),
        "st_v4": len(re.findall(r"st\.global(?:\.\w+)*\.v4\.b32", ptx)),
        "spill_bytes": spill_bytes,
        "registers": registers,
    }


def main() -> None:
    for capability in (80, 90):
        for name, flags in KERNEL_FLAGS.items():
            fn = getattr(kernels, name)
            variants = [
                ("plain", (tl.float32, tl.float32, tl.float32)),
                ("full", (tl.bfloat16, tl.float32, tl.float32)),
            ]
            if capability == 90:
                variants.append(("float16", (tl.float16, tl.float16, tl.float32)))
                variants.append(("float64", (tl.float64, tl.float64, tl.float64)))
            for variant, (param_dtype, state_dtype, compute_dtype) in variants:
                on = variant != "plain"
                constexprs = {
                    "PARAM_DTYPE": param_dtype,
                    "STATE_DTYPE": state_dtype,
                    "COMPUTE_DTYPE": compute_dtype,
                    "BLOCK": DEFAULT_BLOCK_SIZE,
                    "ASSUME_ALIGNED": True,
                    "NORM_SLOTS": 2 if on else 1,
                    **dict.fromkeys(CONTROL_FLAGS, on),
                    **dict.fromkeys(flags, on),
                }
                print(
                    json.dumps(_compile(fn, STEP_SIGNATURE, constexprs, capability, name, variant))
                )
        constexprs = {
            "GRAD_DTYPE": tl.float32,
            "COMPUTE_DTYPE": tl.float32,
            "BLOCK": DEFAULT_BLOCK_SIZE,
            "ASSUME_ALIGNED": True,
            "REDUCE_BLOCK": 1024,
        }
        print(
            json.dumps(
                _compile(
                    kernels._grad_square_norm_kernel,
                    NORM_SIGNATURE,
                    constexprs,
                    capability,
                    "_grad_square_norm_kernel",
                    "plain",
                )
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()
