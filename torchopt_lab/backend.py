"""The one place that decides which implementation runs: the torch reference path or Triton kernels.

Every component (an optimizer, a layer) asks :func:`resolve` with the backend it was given
(``"auto"``, ``"torch"`` or ``"triton"``) and the device of its tensors. The decision and its reason
are recorded, so :func:`backend_info` can always tell the user what ran and why: a fallback is never
silent.

``TORCHOPT_LAB_BACKEND=torch|triton|auto`` sets, process-wide, what ``"auto"`` means.
"""

from __future__ import annotations

import importlib
import os
import threading
from dataclasses import asdict, dataclass
from functools import cache
from types import ModuleType
from typing import Any, Literal

import torch

Backend = Literal["auto", "torch", "triton"]
BACKENDS: tuple[str, ...] = ("auto", "torch", "triton")
ENV_VAR = "TORCHOPT_LAB_BACKEND"


@dataclass(frozen=True)
class Decision:
    """What a component asked for, what it got, and why."""

    component: str
    requested: str
    backend: str
    device: str
    reason: str


_decisions: dict[str, Decision] = {}
_lock = threading.Lock()


def check_backend(backend: str) -> str:
    """Return ``backend`` if it names a backend, else raise ValueError quoting it."""
    if backend not in BACKENDS:
        raise ValueError(f"Invalid backend: {backend!r}; expected one of {BACKENDS}")
    return backend


def interpreter_enabled() -> bool:
    """Whether Triton kernels run on the CPU through the interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@cache
def _load_kernels() -> tuple[ModuleType | None, str]:
    try:
        importlib.import_module("triton")
    except ImportError as error:  # no triton on this platform
        return None, f"triton is not installed ({error})"
    try:
        module = importlib.import_module("triton_kernels")
    except ImportError as error:
        return None, f"torchopt-lab's triton_kernels package failed to import ({error})"
    if not getattr(module, "TORCHOPT_LAB_KERNELS", False):
        location = getattr(module, "__file__", None) or list(getattr(module, "__path__", []))
        raise ImportError(
            f"The module 'triton_kernels' imported from {location} is not torchopt-lab's kernel "
            "package: another package of that name is installed and shadows it. Uninstall it "
            "(pip uninstall triton_kernels) or reinstall torchopt-lab, or use backend='torch'."
        )
    return module, "ok"


def kernels() -> ModuleType:
    """Import torchopt-lab's ``triton_kernels``; raise clearly if it is missing or not ours."""
    module, reason = _load_kernels()
    if module is None:
        raise RuntimeError(f"The Triton backend is unavailable: {reason}")
    return module


def triton_status(device: torch.device) -> tuple[bool, str]:
    """Whether Triton kernels can run on ``device``, and why (not)."""
    module, reason = _load_kernels()
    if module is None:
        return False, reason
    if device.type == "cuda":
        return True, "CUDA tensors and triton available"
    if device.type == "cpu" and interpreter_enabled():
        return True, "CPU tensors under the Triton interpreter (TRITON_INTERPRET=1)"
    return False, f"Triton kernels need CUDA tensors, got {device.type} tensors"


def default_backend() -> str:
    """What ``"auto"`` means in this process: ``TORCHOPT_LAB_BACKEND``, else ``"auto"``."""
    value = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    if value not in BACKENDS:
        raise ValueError(f"Invalid {ENV_VAR}={value!r}; expected one of {BACKENDS}")
    return value


def resolve(component: str, requested: str, device: torch.device | str) -> str:
    """Pick ``"torch"`` or ``"triton"`` for ``component`` on ``device`` and record the decision.

    ``"auto"`` (after ``TORCHOPT_LAB_BACKEND``) picks Triton for CUDA tensors when it can, and the
    torch path otherwise, with the reason recorded. An explicit ``"triton"`` that cannot run raises
    RuntimeError instead of falling back.
    """
    check_backend(requested)
    device = torch.device(device)
    effective = default_backend() if requested == "auto" else requested
    runnable, why = triton_status(device)
    if effective == "torch":
        source = "requested" if requested == "torch" else f"{ENV_VAR}=torch"
        backend, reason = "torch", f"torch path {source}"
    elif effective == "triton":
        if not runnable:
            raise RuntimeError(f"{component}: backend='triton' cannot run here: {why}")
        backend, reason = "triton", why
    elif device.type == "cuda" and runnable:
        backend, reason = "triton", why
    else:
        backend, reason = "torch", f"auto chose the torch path: {why}"
    record(component, requested, backend, device, reason)
    return backend


def record(component: str, requested: str, backend: str, device: torch.device, reason: str) -> None:
    """Record what ran for ``component`` and why, for :func:`backend_info`.

    :func:`resolve` records its decisions; a component records here when it narrows one (the
    optimizers send tensors the kernels cannot update to the torch path, and say why).
    """
    with _lock:
        _decisions[component] = Decision(component, requested, backend, str(device), reason)


@torch.compiler.assume_constant_result
def record_traced(component: str, requested: str, device_type: str, index: int | None) -> str:
    """Record that ``torch.compile`` traced ``component``'s torch path on a device, and return
    ``"torch"``. Dynamo runs this once, when it traces, and bakes the result into the graph
    (:func:`record` takes a lock, which Dynamo cannot trace): the decision reaches
    :func:`backend_info` without breaking the graph."""
    record(
        component,
        requested,
        "torch",
        torch.device(device_type, index),
        "torch.compile traces the torch path",
    )
    return "torch"


def backend_info() -> dict[str, Any]:
    """What ran and why: the Triton status, and the last decision of every component."""
    module, reason = _load_kernels()
    with _lock:
        decisions = {name: asdict(decision) for name, decision in _decisions.items()}
    return {
        "default": default_backend(),
        "triton_available": module is not None,
        "triton_reason": reason,
        "interpreter": interpreter_enabled(),
        "cuda_available": torch.cuda.is_available(),
        "decisions": decisions,
    }
