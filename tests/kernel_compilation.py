"""Compile Triton kernels for real GPUs without one: the one helper the kernel tests share.

The test process runs with ``TRITON_INTERPRET=1``, under which ``@triton.jit`` yields interpreter
objects (their ``@triton.jit`` helpers too) that ``triton.compile`` cannot take. So
:func:`compile_kernels` compiles in one fresh Python process with the interpreter off, importing the
kernels anew, and returns one result per request:

``{"module", "kernel", "capability", "variant", "ok", "error", "ptx_v4_loads", "ptx_v4_stores",
"spill_bytes", "registers"}``, the spills and registers per thread as the ``ptxas`` bundled with
Triton reports them (``ptxas -v``). The optimizer and the layer kernel tests both use it.

A request names the kernel's module and name, a target capability (80, 90), the signature (Triton
type strings, ``"*fp32"`` for a pointer), the constexprs (a dtype written ``{"dtype": "fp64"}``, a
``@triton.jit`` function ``{"function": "module:name"}``, a tuple as a list),
the launcher's ``num_warps``, and which non-pointer arguments to mark divisible by 16 (as Triton's
launcher does for such values). Every pointer gets the ``tt.divisibility`` 16 hint (torch's
allocations are aligned).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

_ROOT = Path(__file__).resolve().parents[1]


def compile_kernels(requests: list[dict[str, Any]], timeout: float = 600) -> list[dict[str, Any]]:
    """Compile every request in one interpreter-free subprocess; see the module docstring."""
    environment = dict(os.environ, TRITON_INTERPRET="0")
    completed = subprocess.run(
        [sys.executable, __file__],
        input=json.dumps(requests),
        capture_output=True,
        text=True,
        env=environment,
        cwd=_ROOT,
        timeout=timeout,
        check=False,
    )
    if completed.returncode != 0:
        raise RuntimeError(f"kernel compilation process failed:\n{completed.stderr[-4000:]}")
    return [json.loads(line) for line in completed.stdout.splitlines() if line.startswith("{")]


def _constexpr(value: Any) -> Any:
    import triton.language as tl

    if isinstance(value, dict) and "dtype" in value:
        return tl.dtype(value["dtype"])
    if isinstance(value, dict) and "function" in value:
        # A @triton.jit function handed to a kernel as a constexpr, named "module:attribute".
        import importlib

        module, name = value["function"].split(":")
        return getattr(importlib.import_module(module), name)
    if isinstance(value, list):
        return tuple(_constexpr(entry) for entry in value)
    return value


def _compile(request: dict[str, Any]) -> dict[str, Any]:
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    module = importlib.import_module(request["module"])
    kernel = getattr(module, request["kernel"])
    constexprs = {name: _constexpr(value) for name, value in request["constexprs"].items()}
    # In the kernel's own argument order (ASTSource pairs the signature with it by position).
    given = dict(request["signature"], **dict.fromkeys(constexprs, "constexpr"))
    missing = set(kernel.arg_names) ^ set(given)
    if missing:
        raise ValueError(f"{request['kernel']}: signature and arguments differ in {missing}")
    signature = {name: given[name] for name in kernel.arg_names}
    names = list(signature)
    divisible = [
        (names.index(name),)
        for name, kind in signature.items()
        if kind.startswith("*") or name in request.get("divisible", ())
    ]
    source = ASTSource(
        fn=kernel,
        signature=signature,
        constexprs=constexprs,
        attrs={index: [["tt.divisibility", 16]] for index in divisible},
    )
    result = {key: request.get(key) for key in ("module", "kernel", "capability", "variant")}
    try:
        compiled = triton.compile(
            source,
            target=GPUTarget("cuda", request["capability"], 32),
            options={"num_warps": request.get("num_warps", 4)},
        )
    except Exception as error:  # reported to the test, which fails naming it
        return dict(result, ok=False, error=f"{type(error).__name__}: {error}")
    ptx = compiled.asm["ptx"]
    return dict(
        result,
        ok=True,
        error=None,
        ptx_v4_loads=len(re.findall(r"ld\.global(?:\.\w+)*\.v4\.", ptx)),
        ptx_v4_stores=len(re.findall(r"st\.global(?:\.\w+)*\.v4\.", ptx)),
        **_ptxas_report(ptx, request["capability"]),
    )


def _ptxas_report(ptx: str, capability: int) -> dict[str, int]:
    """Spill store + load bytes and registers per thread reported by ``ptxas -v`` for the PTX's
    own target (Triton emits ``sm_90a`` for capability 90)."""
    import tempfile

    from triton.backends.nvidia.compiler import get_ptxas

    architecture = re.search(r"^\.target (\w+)", ptx, re.MULTILINE).group(1)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "kernel.ptx"
        path.write_text(ptx)
        report = subprocess.run(
            [
                get_ptxas(capability).path,
                "-v",
                f"--gpu-name={architecture}",
                str(path),
                "-o",
                os.devnull,
            ],
            capture_output=True,
            text=True,
            check=True,
        ).stderr
    spills = re.findall(r"(\d+) bytes spill (?:stores|loads)", report)
    registers = re.search(r"Used (\d+) registers", report)
    if not spills or registers is None:
        raise RuntimeError(f"ptxas -v reported no spill or register counts:\n{report}")
    return {
        "spill_bytes": sum(int(value) for value in spills),
        "registers": int(registers.group(1)),
    }


def main() -> None:
    sys.path.insert(0, str(_ROOT))
    for request in json.loads(sys.stdin.read()):
        print(json.dumps(_compile(request)), flush=True)


if __name__ == "__main__":
    main()
