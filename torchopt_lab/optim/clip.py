r"""Gradient clipping with ``torch.nn.utils``' signatures and results.

Norm clipping scales every gradient by one coefficient computed from the norm of all of them,
as if they were concatenated into one vector:

.. math::
    \|g\|_p = \Big(\sum_i \|g_i\|_p^p\Big)^{1/p}, \qquad
    g_i \leftarrow g_i \cdot \min\Big(\frac{\text{max\_norm}}{\|g\|_p + 10^{-6}},\ 1\Big)

(:math:`\|g\|_\infty = \max_i \|g_i\|_\infty`). Value clipping clamps each entry to
:math:`[-\text{clip\_value}, \text{clip\_value}]`. Optimizers apply the same norm clip through their
``max_grad_norm`` argument.
"""

from __future__ import annotations

import types
import warnings
from collections.abc import Iterable

import torch
from torch import Tensor
from torch.utils._foreach_utils import (
    _device_has_foreach_support,
    _group_tensors_by_device_and_dtype,
    _has_foreach_support,
)

__all__ = ["clip_grad_norm_", "clip_grad_value_"]


def _use_foreach(foreach: bool | None, tensors: list[Tensor], device: torch.device) -> bool:
    """torch.nn.utils' rule: foreach where supported if unspecified; an explicit True must work."""
    if foreach is None:
        return _has_foreach_support(tensors, device)
    if foreach and not _device_has_foreach_support(device):
        raise RuntimeError(
            f"foreach=True was passed, but can't use the foreach API on {device.type} tensors"
        )
    return foreach


@torch.no_grad()
def _total_norm(
    tensors: list[Tensor],
    norm_type: float = 2.0,
    error_if_nonfinite: bool = False,
    foreach: bool | None = None,
) -> Tensor:
    """The ``norm_type``-norm of all ``tensors`` viewed as one vector, on the first one's device."""
    norm_type = float(norm_type)
    if len(tensors) == 0:
        return torch.tensor(0.0)
    first_device = tensors[0].device
    norms: list[Tensor] = []
    for (device, _), ([device_tensors], _) in _group_tensors_by_device_and_dtype([tensors]).items():
        if _use_foreach(foreach, device_tensors, device):
            norms.extend(torch._foreach_norm(device_tensors, norm_type))
        else:
            norms.extend(torch.linalg.vector_norm(t, norm_type) for t in device_tensors)
    total_norm = torch.linalg.vector_norm(
        torch.stack([norm.to(first_device) for norm in norms]), norm_type
    )
    if error_if_nonfinite and torch.logical_or(total_norm.isnan(), total_norm.isinf()):
        raise RuntimeError(
            f"The total norm of order {norm_type} for gradients from `parameters` is non-finite "
            f"({total_norm.item()}), so it cannot be clipped. To disable this error and scale the "
            "gradients by the non-finite norm anyway, set `error_if_nonfinite=False`"
        )
    return total_norm


def _clip_coefficient(total_norm: Tensor, max_norm: float) -> Tensor:
    """min(max_norm / (total_norm + 1e-6), 1) as a tensor: no host synchronization."""
    return torch.clamp(float(max_norm) / (total_norm + 1e-6), max=1.0)


@torch.no_grad()
def clip_grad_norm_(
    parameters: Tensor | Iterable[Tensor],
    max_norm: float,
    norm_type: float = 2.0,
    error_if_nonfinite: bool = False,
    foreach: bool | None = None,
) -> Tensor:
    """Scale the gradients of ``parameters`` in place so that their total norm is at most
    ``max_norm``; return the total norm before clipping, as a tensor.

    Same signature, errors and result as ``torch.nn.utils.clip_grad_norm_`` (see the module
    docstring for the formula). ``norm_type`` may be any positive number or ``inf``.
    """
    if isinstance(parameters, Tensor):
        parameters = [parameters]
    else:
        is_generator = isinstance(parameters, types.GeneratorType)
        parameters = list(parameters)
        if is_generator and len(parameters) == 0:
            warnings.warn(
                "`parameters` is an empty generator, no gradient clipping will occur.",
                stacklevel=3,
            )
    grads = [p.grad for p in parameters if p.grad is not None]
    total_norm = _total_norm(grads, norm_type, error_if_nonfinite, foreach)
    if not grads:
        return total_norm
    coefficient = _clip_coefficient(total_norm, max_norm)
    for (device, _), ([device_grads], _) in _group_tensors_by_device_and_dtype([grads]).items():
        if _use_foreach(foreach, device_grads, device):
            torch._foreach_mul_(device_grads, coefficient.to(device))
        else:
            device_coefficient = coefficient.to(device)
            for grad in device_grads:
                grad.mul_(device_coefficient)
    return total_norm


@torch.no_grad()
def clip_grad_value_(
    parameters: Tensor | Iterable[Tensor],
    clip_value: float,
    foreach: bool | None = None,
) -> None:
    """Clamp every gradient entry of ``parameters`` to ``[-clip_value, clip_value]`` in place.

    Same signature and result as ``torch.nn.utils.clip_grad_value_``.
    """
    if isinstance(parameters, Tensor):
        parameters = [parameters]
    clip_value = float(clip_value)
    grads = [p.grad for p in parameters if p.grad is not None]
    for (device, _), ([device_grads], _) in _group_tensors_by_device_and_dtype([grads]).items():
        if _use_foreach(foreach, device_grads, device):
            torch._foreach_clamp_min_(device_grads, -clip_value)
            torch._foreach_clamp_max_(device_grads, clip_value)
        else:
            for grad in device_grads:
                grad.clamp_(min=-clip_value, max=clip_value)
