"""Tensor hyperparameters and scalar state as a rule's ``scalars`` function reads them: Python
numbers eagerly, float64 tensors kept in the graph under ``torch.compile``; and when two
parameters' scalars are the same. Shared by the rule engine (:mod:`torchopt_lab.optim.rules`)
and the fused CPU step (:mod:`._cpu_fused`), which cannot import each other."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

__all__ = ["as_number", "increment", "scalar_value", "scalars_key"]


def as_number(value: Any) -> Any:
    """A tensor hyperparameter (or a tuple of them) as Python numbers, as torch reads them; under
    ``torch.compile``, as 0-dim float64 tensors (a host read would break the graph)."""
    if isinstance(value, Tensor):
        return scalar_value(value.reshape(()))
    if isinstance(value, tuple):
        return tuple(as_number(entry) for entry in value)
    return value


def scalar_value(value: Tensor) -> float | Tensor:
    """A 0-dim tensor (the step count, scalar state such as NAdam's ``mu_product``) as
    :meth:`Rule.scalars` reads it: a Python number eagerly; under ``torch.compile`` a float64
    tensor (the counts of a part stacked, see :meth:`RuleOptimizer._traced_scalars`), kept in
    the graph (as torch.optim's ``_get_value``), so that the compiled step neither breaks the
    graph on a host read nor bakes the count in and recompiles every step."""
    if torch.compiler.is_compiling():
        return value.to(torch.float64)
    return value.item()


def scalars_key(scalars: Mapping[str, Any]) -> tuple[Any, ...]:
    """What parameters must share to be updated by one call (the update over lists, or one
    compiled chunk of the fused CPU step): equal scalars. Python numbers
    compare by type and value (with the sign of a zero: ``-0.0`` is not ``0.0``); anything else
    (a tensor) by identity, which parameters on the same step share (one dict per step value).
    NAdam's, made per parameter from its ``mu_product``, are equal when the products are."""
    values = tuple(scalars.values())
    if not all(type(value) in _PLAIN_SCALARS for value in values):
        return tuple(scalars), tuple(map(id, values))
    zeros = tuple(math.copysign(1.0, v) for v in values if type(v) is float and v == 0)
    return tuple(scalars), values, tuple(map(type, values)), zeros


_PLAIN_SCALARS = frozenset((bool, int, float, type(None)))


# (device, dtype) -> a 0-dim one, read by :func:`increment`.
_ONES: dict[tuple[torch.device, torch.dtype], Tensor] = {}


def increment(counts: list[Tensor]) -> None:
    """Add 1 to each of ``counts`` (step counts, 0-dim) in place, as ``torch._foreach_add_(counts,
    1)`` does: with a list of one 0-dim tensor of their device and dtype, which on the CPU costs
    a quarter of the Python number's (the per-tensor loop there wraps the number in a new tensor
    for each count: 32 against 133 us for 66 counts, measured). Counts of mixed devices or dtypes,
    and a trace, take the number."""
    if not counts:
        return
    first = counts[0]
    key = (first.device, first.dtype)
    if torch.compiler.is_compiling() or any(
        count.dtype != key[1] or count.device != key[0] for count in counts
    ):
        torch._foreach_add_(counts, 1)
        return
    one = _ONES.get(key)
    if one is None:
        one = _ONES[key] = torch.ones((), device=key[0], dtype=key[1])
    torch._foreach_add_(counts, [one] * len(counts))
