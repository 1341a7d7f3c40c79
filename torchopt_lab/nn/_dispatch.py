"""The one dispatch point of ``torchopt_lab.nn``, and what every op's Triton path shares.

Each op module (``_activation.py``, ``_softmax.py``, ...) holds its functional, its torch-path
Function and its Triton-path Function side by side. The functional validates its arguments once,
then asks :func:`use_triton` (an op with a kernel) or calls :func:`record_torch_only` (an op
without one) and runs the Function of the chosen path itself: there is no table of names to
keep in step. The choice is made by :func:`torchopt_lab.backend.resolve` (component
``"nn.<name>"``), so ``TORCHOPT_LAB_BACKEND`` and :func:`torchopt_lab.backend_info` cover the
layers too.

The Triton-path Functions call their kernels as PyTorch custom ops
(``torch.library.custom_op`` with fake implementations, registered in the op's module), so
``torch.compile`` sees one opaque op of known output shapes instead of tracing into Triton's
launcher. A custom op's body imports the kernels through :func:`triton_kernels` when it first
runs; importing ``torchopt_lab.nn`` never imports triton.

Differentiable once: the kernels keep the log-sum-exp, ``μ`` and ``r``, or a dropout seed, not a
graph, so a second derivative through them is refused, never silently wrong. Each Triton-path
backward is ``@once_differentiable`` (differentiating its result raises) and, first,
:func:`first_order_only` raises in a backward run with ``create_graph=True``:
``once_differentiable`` alone returns a constant when the incoming gradient needs no grad
(``loss.backward(create_graph=True)``), and the layers before this one would then compute a
Hessian-vector product without this op's curvature. Use the torch path
(``TORCHOPT_LAB_BACKEND=torch``) for double backward.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable
from types import ModuleType
from typing import Any

import torch

from torchopt_lab import backend

# The layer kernels index with int32 offsets and refuse a tensor past this many elements
# (``triton_kernels.nn._common.MAX_NUMEL``); "auto" sends such a call down the torch path.
MAX_KERNEL_NUMEL = 2**31 - 1


def use_triton(name: str, *tensors: torch.Tensor | None) -> bool:
    """Whether ``nn.<name>`` runs its Triton path for these tensors (the first one's device).

    Raises RuntimeError (from :func:`torchopt_lab.backend.resolve`) when Triton was asked for
    explicitly and cannot run. Under "auto", a tensor past :data:`MAX_KERNEL_NUMEL` elements
    takes the torch path (recorded); asked for explicitly, the kernel's launcher refuses it.
    """
    device = next((t.device for t in tensors if t is not None), torch.device("cpu"))
    if _resolve(name, device.type, device.index) != "triton":
        return False
    # (no max(default=...): torch.compile cannot trace that keyword)
    largest = max([t.numel() for t in tensors if t is not None] or [0])
    if largest > MAX_KERNEL_NUMEL and backend.default_backend() == "auto":
        backend.record(
            f"nn.{name}",
            "auto",
            "torch",
            device,
            f"auto chose the torch path: a tensor of {largest} elements is past the kernels' "
            f"int32 offsets (at most {MAX_KERNEL_NUMEL})",
        )
        return False
    return True


@torch.compiler.assume_constant_result
def _resolve(name: str, device_type: str, device_index: int | None) -> str:
    """:func:`torchopt_lab.backend.resolve` for ``nn.<name>``, which ``torch.compile`` runs once
    at trace time and bakes into the graph as a constant (it imports triton and reads the
    environment, which Dynamo cannot trace): the backend of a compiled model is fixed when it is
    compiled, and the decision is still recorded for :func:`torchopt_lab.backend_info`."""
    return backend.resolve(f"nn.{name}", "auto", torch.device(device_type, device_index))


def record_torch_only(name: str, *tensors: torch.Tensor | None) -> None:
    """Record that ``nn.<name>``, which has no Triton kernel, ran on the torch path (whatever the
    backend choice), for :func:`torchopt_lab.backend_info`; nothing is recorded while
    ``torch.compile`` traces (recording takes a lock Dynamo cannot trace)."""
    if torch.compiler.is_compiling():
        return
    device = next((t.device for t in tensors if t is not None), torch.device("cpu"))
    backend.record(
        f"nn.{name}",
        "auto",
        "torch",
        device,
        f"no Triton kernel for nn.{name}: the torch path runs on every backend",
    )


def record_torch_part(component: str, device: torch.device) -> None:
    """Record that ``component`` (a part of a Triton-path op, ``"nn.linear.gemm"``) ran on torch
    (not while ``torch.compile`` traces: recording takes a lock Dynamo cannot trace)."""
    if not torch.compiler.is_compiling():
        backend.resolve(component, "torch", device)


@functools.cache
def triton_kernels() -> ModuleType:
    """``triton_kernels.nn``, imported on first use (by a custom op's body, which only runs once
    :func:`use_triton` chose Triton, or when called directly); raises clearly when triton or the
    kernel package is missing (:func:`torchopt_lab.backend.kernels`)."""
    return importlib.import_module(f"{backend.kernels().__name__}.nn")


def statistics_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the kernels keep per-row or per-channel statistics in for ``dtype`` inputs
    (``triton_kernels.nn._common.statistics_dtype``), for the custom ops' fake implementations."""
    return importlib.import_module(f"{triton_kernels().__name__}._common").statistics_dtype(dtype)


def first_order_only(backward: Callable[..., Any]) -> Callable[..., Any]:
    """Make ``backward`` raise RuntimeError when run with ``create_graph=True`` (grad mode on)."""

    @functools.wraps(backward)
    def checked(ctx: Any, *grad_outputs: torch.Tensor) -> Any:
        if torch.is_grad_enabled() and not _single_func_grad(ctx):
            raise RuntimeError(
                f"{type(ctx).__name__.removesuffix('Backward')}: the Triton path is differentiable "
                "once, so backward with create_graph=True (double backward, Hessian-vector "
                f"products) would give a wrong second derivative; set {backend.ENV_VAR}=torch "
                "for the twice-differentiable torch path"
            )
        return backward(ctx, *grad_outputs)

    return checked


def _single_func_grad(ctx: Any) -> bool:
    """Whether this backward is ``torch.func``'s (``grad``, ``vjp``, ``jacrev``, under any
    ``vmap``s) with no reverse- or forward-mode level alive but the Function's own: ``torch.func``
    always differentiates with ``create_graph=True``, but with no other differentiating level
    that graph is never differentiated again, so the first-order backward is exact. A ``vjp``
    pullback called under ``grad`` runs after its own level has ended, under the outer one, which
    would differentiate the backward again (a silent zero second derivative): refused."""
    from torch._C._functorch import TransformType
    from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters

    # torch.func runs the Function through a generated _SingleLevelFunction that, unlike every
    # torch.autograd.Function, is not a Function subclass
    forward_class = getattr(type(ctx), "_forward_cls", torch.autograd.Function)
    if issubclass(forward_class, torch.autograd.Function):
        return False
    levels = [
        interpreter.level()
        for interpreter in retrieve_all_functorch_interpreters()
        if interpreter.key() in (TransformType.Grad, TransformType.Jvp)
    ]
    own = _function_level(forward_class)
    if own is None:  # a torch without the generated forward's level: count the levels instead
        return len(levels) <= 1
    return all(level == own for level in levels)


def _function_level(forward_class: type) -> int | None:
    """The functorch level a generated _SingleLevelFunction was made for (the ``level`` its
    ``forward`` closes over in ``torch._functorch.autograd_function``), or None."""
    forward = forward_class.__dict__.get("forward")
    forward = getattr(forward, "__func__", forward)
    code, closure = getattr(forward, "__code__", None), getattr(forward, "__closure__", None)
    if code is None or closure is None or "level" not in code.co_freevars:
        return None
    level = closure[code.co_freevars.index("level")].cell_contents
    return level if isinstance(level, int) else None


def forward_mode_error(name: str) -> RuntimeError:
    """The error of forward-mode AD (``torch.func.jvp``, ``jacfwd``, ``hessian``) through the
    Triton path of ``nn.<name>``."""
    return RuntimeError(
        f"nn.{name}: the Triton path is first-order (reverse mode, differentiable once): it has "
        "no forward-mode derivative (torch.func.jvp, jacfwd, hessian) and no double backward; "
        f"set {backend.ENV_VAR}=torch for the torch path, which has both"
    )


def no_forward_mode(name: str) -> Any:
    """A ``jvp`` staticmethod for a Triton-path Function (set aside for ``torch.compile`` by
    :func:`torchopt_lab.nn._function.forward_mode`) that raises :func:`forward_mode_error`."""

    def jvp(ctx: Any, *tangents: Any) -> Any:
        raise forward_mode_error(name)

    return staticmethod(jvp)


def register_vmap_by_slices(op: Any, folds: Callable[..., bool] | None = None) -> None:
    """Give the custom op ``op`` a vmap rule that runs it once per slice of the vmapped dimension
    and stacks the results: exact for every op (per-slice statistics included, as
    ``batch_norm`` needs under ``vmap``), one launch per slice. (Dropout's seed is drawn with
    ``torch.randint`` outside the op, so vmap's ``randomness`` governs it as torch's dropout.)

    ``folds(in_dims, *args)``, when given and true for a call, says the op treats a leading
    dimension of its batched arguments as more rows of the same computation (an elementwise op,
    a row-wise one along a trailing dimension): the rule then moves the vmapped dimension to the
    front and launches once."""

    def rule(info: Any, in_dims: tuple[Any, ...], *args: Any) -> tuple[Any, Any]:
        if folds is not None and folds(in_dims, *args):
            # one launch: the vmapped dimension moved to the front of the batched tensors
            moved = [
                arg if dim is None else arg.movedim(dim, 0).contiguous()
                for arg, dim in zip(args, in_dims, strict=True)
            ]
            result = op(*moved)
            return result, (0,) * len(result) if isinstance(result, tuple) else 0
        results = []
        for index in range(info.batch_size):
            sliced = [
                arg if dim is None else arg.select(dim, index)
                for arg, dim in zip(args, in_dims, strict=True)
            ]
            results.append(op(*sliced))
        if isinstance(results[0], tuple):
            stacked = tuple(torch.stack(parts) for parts in zip(*results, strict=True))
            return stacked, (0,) * len(stacked)
        return torch.stack(results), 0

    torch.library.register_vmap(op, rule)
