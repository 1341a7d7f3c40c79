"""Where every ``torchopt_lab.nn.functional`` function chooses between the torch path and Triton.

Each functional asks :func:`use_triton` with its name and its tensors; the choice itself is made
by :func:`torchopt_lab.backend.resolve` (component ``"nn.<name>"``), so ``TORCHOPT_LAB_BACKEND``
and :func:`torchopt_lab.backend_info` cover the layers too. When Triton is chosen, the functional
calls :func:`triton_function` and hands it exactly its own arguments.

The Triton implementations live in ``torchopt_lab.nn._triton``, a module that exposes
``FUNCTIONS: dict[str, Callable]`` mapping a functional's name (``"relu"``, ``"cross_entropy"``,
...) to a callable with that functional's signature, less the deprecated ``size_average`` and
``reduce`` and softmax's ``_stacklevel``. It is called after the functional validated its
arguments, with ``reduction`` resolved and a class-index target made ``long``. A name Triton is
chosen for but which that table lacks raises NotImplementedError naming it: never a silent
fallback.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from functools import cache

import torch

from torchopt_lab import backend

_TRITON_MODULE = "torchopt_lab.nn._triton"
# The layer kernels index with int32 offsets and refuse a tensor past this many elements
# (``triton_kernels.nn._common.MAX_NUMEL``); "auto" sends such a call down the torch path.
MAX_KERNEL_NUMEL = 2**31 - 1


# The Triton table, filled when a decision first picks Triton: a plain dict that torch.compile
# reads without tracing the import.
_LOADED: dict[str, Callable[..., torch.Tensor]] = {}


@cache
def _triton_functions() -> dict[str, Callable[..., torch.Tensor]]:
    try:
        module = importlib.import_module(_TRITON_MODULE)
    except ModuleNotFoundError as error:
        if error.name != _TRITON_MODULE:
            raise
        return {}
    return dict(module.FUNCTIONS)


def use_triton(name: str, *tensors: torch.Tensor | None) -> bool:
    """Whether ``nn.<name>`` runs as Triton kernels for these tensors (the first one's device).

    Raises NotImplementedError when the backend choice is Triton but no kernel is wired for
    ``name``, and RuntimeError (from :func:`torchopt_lab.backend.resolve`) when Triton was asked
    for explicitly and cannot run. Under "auto", a tensor past :data:`MAX_KERNEL_NUMEL` elements
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
    if name not in _LOADED:
        raise NotImplementedError(
            f"nn.{name}: the Triton backend was chosen ({backend.ENV_VAR}="
            f"{backend.default_backend()!r}, {device.type} tensors) but no Triton kernel is wired "
            f"for {name!r}; set {backend.ENV_VAR}=torch to run the torch path"
        )
    return True


@torch.compiler.assume_constant_result
def _resolve(name: str, device_type: str, device_index: int | None) -> str:
    """:func:`torchopt_lab.backend.resolve` for ``nn.<name>``, which ``torch.compile`` runs once
    at trace time and bakes into the graph as a constant (it imports triton and reads the
    environment, which Dynamo cannot trace): the backend of a compiled model is fixed when it is
    compiled, and the decision is still recorded for :func:`torchopt_lab.backend_info`."""
    choice = backend.resolve(f"nn.{name}", "auto", torch.device(device_type, device_index))
    if choice == "triton":
        global _LOADED
        _LOADED = _triton_functions()
    return choice


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


def triton_function(name: str) -> Callable[..., torch.Tensor]:
    """The Triton implementation of ``nn.<name>``; call only after :func:`use_triton` said yes."""
    return _LOADED[name]
