"""What every optimizer here shares: the extra arguments, global-norm clipping, and the one place
where a step picks its backend for each (device, dtype) group of tensors.

A subclass provides three things, the rest is here:

- ``_reference``: the torch reference update, a function in torch.optim's functional shape
  (``adam(params, grads, exp_avgs, ..., *, lr, beta1, ...)``) over lists on one device and dtype;
- ``_init_group(group)``: the tensor lists of one param group, in the order of ``_reference``'s
  positional arguments, with lazily created state;
- ``_hyperparameters(group)``: the keyword arguments of ``_reference`` for that group.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import Tensor

from torchopt_lab import backend as _backend
from torchopt_lab.optim.clip import _clip_coefficient, _total_norm

TensorLists = dict[str, list[Any]]

TRITON_NOT_AVAILABLE = (
    "Triton optimizer kernels are not available yet (they land with issue 3); "
    "use backend='torch' for the torch reference path"
)


def _scalar_dtype() -> torch.dtype:
    """The dtype torch.optim gives ``state["step"]``: float64 under a float64 default dtype."""
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


def new_step() -> Tensor:
    """A fresh ``state["step"]``, hosted on the CPU like torch.optim's non-capturable step."""
    return torch.tensor(0.0, dtype=_scalar_dtype())


def as_float(value: float | Tensor) -> float:
    """A hyperparameter as a Python number (a 1-element tensor lr or beta is read once)."""
    return value.item() if isinstance(value, Tensor) else value


def increment_steps(state_steps: list[Tensor]) -> None:
    """Add one to every ``state["step"]``."""
    if state_steps:
        # One wrapped scalar for the whole list: foreach on CPU scalars would wrap 1 per tensor.
        torch._foreach_add_(state_steps, torch.tensor(1.0), alpha=1.0)


def read_steps(state_steps: list[Tensor]) -> list[float]:
    """The step counts as Python numbers."""
    if not state_steps:
        return []
    try:
        # One read for the whole list; steps loaded from elsewhere may differ in dtype or device.
        return torch.stack(state_steps).tolist()
    except RuntimeError:
        return [step.item() for step in state_steps]


def _real_view(tensor: Tensor) -> Tensor:
    return torch.view_as_real(tensor) if tensor.is_complex() else tensor


def check_max_grad_norm(max_grad_norm: float | None) -> float | None:
    """Return ``max_grad_norm`` if it is None or a positive finite number, else raise ValueError."""
    if max_grad_norm is None:
        return None
    if isinstance(max_grad_norm, bool) or not isinstance(max_grad_norm, (int, float)):
        raise ValueError(f"Invalid max_grad_norm value: {max_grad_norm!r}; expected a number")
    if not (math.isfinite(max_grad_norm) and max_grad_norm > 0):
        raise ValueError(
            f"Invalid max_grad_norm value: {max_grad_norm}; expected a positive finite number"
        )
    return float(max_grad_norm)


class TorchoptOptimizer(torch.optim.Optimizer):
    """Base of every torchopt_lab optimizer (private: use the optimizers themselves).

    ``backend`` and ``max_grad_norm`` are attributes of the optimizer, not of its param groups, so
    param groups and ``state_dict()`` hold exactly torch.optim's keys and interchange with it.
    """

    _reference: ClassVar[Callable[..., None]]
    # Whether complex params reach ``_reference`` as real views (torch.view_as_real), as torch.optim
    # does for optimizers whose update is not linear in the gradient.
    _views_complex_as_real: ClassVar[bool] = True
    # Whether ``_reference`` fills in state lists (SGD creates momentum buffers on the first step).
    _creates_state: ClassVar[bool] = False

    def __init__(
        self,
        params: Any,
        defaults: dict[str, Any],
        *,
        backend: str = "auto",
        max_grad_norm: float | None = None,
    ) -> None:
        self.backend = _backend.check_backend(backend)
        self.max_grad_norm = check_max_grad_norm(max_grad_norm)
        if defaults.get("differentiable"):
            raise RuntimeError(
                f"{type(self).__name__}: differentiable=True is not supported; the update runs "
                "under torch.no_grad(). Use torch.optim for differentiating through a step."
            )
        super().__init__(params, defaults)
        if defaults.get("fused") and defaults.get("foreach"):
            raise RuntimeError("`fused` and `foreach` cannot be `True` together.")

    def __getstate__(self) -> dict[str, Any]:
        # torch.optim pickles only defaults, state and param groups; keep our two attributes too.
        return {
            **super().__getstate__(),
            "backend": self.backend,
            "max_grad_norm": self.max_grad_norm,
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("backend", "auto")
        self.__dict__.setdefault("max_grad_norm", None)

    def _init_group(self, group: dict[str, Any]) -> TensorLists:
        raise NotImplementedError

    def _hyperparameters(self, group: dict[str, Any]) -> dict[str, Any]:
        raise NotImplementedError

    def _finish_group(self, group: dict[str, Any], tensors: TensorLists) -> None:
        """Store state the reference update created (SGD's first momentum buffers)."""

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One optimization step; ``closure`` re-evaluates the model and returns the loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        groups = [(group, self._init_group(group)) for group in self.param_groups]
        clip_coefficient = None
        if self.max_grad_norm is not None:
            grads = [grad for _, tensors in groups for grad in tensors["grads"]]
            if any(grad.is_sparse for grad in grads):
                # NotImplementedError is what clip_grad_norm_ raises from deep inside torch here.
                raise NotImplementedError(
                    f"{type(self).__name__}: max_grad_norm cannot clip sparse gradients (torch has "
                    "no norm for them); clip the dense gradients yourself or drop max_grad_norm"
                )
            if grads:
                clip_coefficient = _clip_coefficient(_total_norm(grads), self.max_grad_norm)
        for group, tensors in groups:
            if tensors["params"]:
                self._update_group(group, tensors, clip_coefficient)
                self._finish_group(group, tensors)
        return loss

    def _update_group(
        self, group: dict[str, Any], tensors: TensorLists, clip_coefficient: Tensor | None
    ) -> None:
        """The one dispatch point: each (device, dtype) group runs on the backend chosen for it."""
        names = list(tensors)
        count = len(tensors["params"])
        # Lists not kept for this group (max_exp_avg_sqs without amsgrad) stay empty.
        full = [name for name in names if len(tensors[name]) == count]
        split = torch.optim.Optimizer._group_tensors_by_device_and_dtype(
            [tensors[name] for name in full], with_indices=True
        )
        hyperparameters = self._hyperparameters(group)
        component = f"optim.{type(self).__name__}"
        # With one (device, dtype), the update gets the group's own lists: no copies, and state it
        # creates lands in them directly.
        single = len(split) == 1
        for (device, dtype), (lists, indices) in split.items():
            chosen = _backend.resolve(component, self.backend, device)
            if single:
                part = dict(tensors)
            else:
                part = {name: [] for name in names}
                part.update(zip(full, lists, strict=True))
            if self._views_complex_as_real and dtype.is_complex:
                for name in names:
                    part[name] = [_real_view(t) for t in part[name]]
            if chosen == "triton":
                self._triton_update(group, part, hyperparameters, clip_coefficient)
            else:
                self._torch_update(group, part, hyperparameters, clip_coefficient)
            if self._creates_state and not single:
                for name in full:
                    for position, index in enumerate(indices):
                        tensors[name][index] = part[name][position]

    def _triton_update(
        self,
        group: dict[str, Any],
        tensors: TensorLists,
        hyperparameters: dict[str, Any],
        clip_coefficient: Tensor | None,
    ) -> None:
        """The update as Triton kernels: same arguments and contract as :meth:`_torch_update`."""
        raise NotImplementedError(f"optim.{type(self).__name__}: {TRITON_NOT_AVAILABLE}")

    def _torch_update(
        self,
        group: dict[str, Any],
        tensors: TensorLists,
        hyperparameters: dict[str, Any],
        clip_coefficient: Tensor | None,
    ) -> None:
        """The update through the reference function.

        ``tensors`` are the lists of one (device, dtype) group, complex ones as real views, in the
        order of ``_reference``'s positional arguments; ``hyperparameters`` its keyword arguments;
        ``clip_coefficient`` a 0-dim tensor min(max_grad_norm / (norm + 1e-6), 1) or None. The
        gradients themselves are never modified; new state goes into the lists (SGD's buffers).
        """
        device = tensors["params"][0].device
        self._check_torch_path(group, device)
        if clip_coefficient is not None:
            scaled = torch._foreach_mul(tensors["grads"], clip_coefficient.to(device))
            tensors = {**tensors, "grads": scaled}
        type(self)._reference(*tensors.values(), **hyperparameters)

    def _check_torch_path(self, group: dict[str, Any], device: torch.device) -> None:
        """Refuse what the torch reference path cannot honour, instead of ignoring it."""
        name = type(self).__name__
        if group.get("fused"):
            raise RuntimeError(
                f"{name}: fused=True asks for the fused Triton kernels, but the torch reference "
                f"path runs for {device.type} tensors; pass fused=None, or use CUDA tensors with "
                "backend='auto' or 'triton'"
            )
        if group.get("capturable"):
            raise RuntimeError(
                f"{name}: capturable=True needs the Triton backend (it keeps the step count on "
                f"the device); the torch reference path runs for {device.type} tensors"
            )
