"""A rule's per-tensor update, run once over lists of tensors with torch's foreach ops.

A rule's ``update(param, grad, *state, **scalars)`` is written for one parameter with torch ops.
Called with :class:`TensorList` arguments (one list per tensor argument, the scalars shared), the
same Python code runs once for a whole list of parameters: each operator and torch function on a
:class:`TensorList` becomes the corresponding ``torch._foreach_*`` op where one computes the same
element-wise operation (``x + y``, ``x * s``, ``torch.lerp``, ``torch.maximum``, ``x.sqrt()``,
...), and a loop applying the op to each tensor where none does (any op works, just slower).
Either way each tensor sees the same operations in the same order as in the per-tensor update,
so the results are the same bit for bit (on the CPU, foreach ops run torch's per-tensor ops;
CUDA's foreach kernels compute in the same opmath, except division by a number, powers and
addcmul/addcdiv, kept per tensor there; ``tests/optim/test_lifted.py`` checks the CPU).
Python branches on scalars (``if weight_decay != 0``) work as before, since the scalars are the
Python numbers the per-tensor update gets.

What cannot be lifted raises :class:`NotLiftable` (the caller then runs the update per tensor):
a branch on a tensor's value or shape that differs among the tensors (``if p.dim() > 1``),
``len``, iteration or ``item()``.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = ["NotLiftable", "TensorList", "copy_into"]


class NotLiftable(TypeError):
    """The update asked a question of a :class:`TensorList` whose answer differs per tensor (or
    that has no list answer): it must run per tensor."""


def _number(value: Any) -> bool:
    """A real Python number (bool included): what foreach's ``Scalar`` overloads take with the
    same type promotion as a per-tensor op (a complex number would promote a real tensor)."""
    return isinstance(value, (int, float))


def _unary(name: str) -> Callable[[TensorList], TensorList]:
    foreach = getattr(torch, f"_foreach_{name}")
    return lambda x: TensorList(foreach(x.tensors))


class TensorList:
    """A list of tensors (one per parameter, of one device and dtype) that a rule's per-tensor
    update reads as if it were one tensor: every op applies to each tensor, as one foreach op
    where torch has one that computes the same, else tensor by tensor.

    ``tensors`` holds the list. Indexing (``x[mask]``) indexes each tensor, as in the per-tensor
    update; there is no ``len`` or iteration (a tensor's would be its rows).
    """

    __slots__ = ("tensors",)

    def __init__(self, tensors: Sequence[Tensor]) -> None:
        self.tensors = list(tensors)

    def __repr__(self) -> str:
        return f"TensorList({self.tensors!r})"

    @classmethod
    def __torch_function__(
        cls,
        func: Callable[..., Any],
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        lifted = _FOREACH.get(getattr(func, "__name__", ""))
        if lifted is not None and func in _sources(func.__name__):
            try:
                result = lifted(*args, **kwargs)
            except TypeError:
                # Arguments the foreach form does not take (out=, decimals=, ...).
                result = NotImplemented
            if result is not NotImplemented:
                return result
        return _each(func, args, kwargs)

    # Operators: the foreach op where it computes what the tensor operator does, else the
    # operator on each tensor.
    def __add__(self, other: Any) -> Any:
        return _operator(_add, operator.add, self, other)

    def __radd__(self, other: Any) -> Any:
        return _operator(_add, operator.add, other, self)

    def __sub__(self, other: Any) -> Any:
        return _operator(_sub, operator.sub, self, other)

    def __rsub__(self, other: Any) -> Any:
        return _operator(_sub, operator.sub, other, self)

    def __mul__(self, other: Any) -> Any:
        return _operator(_mul, operator.mul, self, other)

    def __rmul__(self, other: Any) -> Any:
        return _operator(_mul, operator.mul, other, self)

    def __truediv__(self, other: Any) -> Any:
        return _operator(_div, operator.truediv, self, other)

    def __rtruediv__(self, other: Any) -> Any:
        return _operator(_div, operator.truediv, other, self)

    def __pow__(self, other: Any) -> Any:
        return _operator(_pow, operator.pow, self, other)

    def __rpow__(self, other: Any) -> Any:
        return _operator(_pow, operator.pow, other, self)

    def __neg__(self) -> TensorList:
        return TensorList(torch._foreach_neg(self.tensors))

    def __abs__(self) -> TensorList:
        return TensorList(torch._foreach_abs(self.tensors))

    def __getitem__(self, index: Any) -> Any:
        return _each(operator.getitem, (self, index), {})

    def __setitem__(self, index: Any, value: Any) -> None:
        _each(operator.setitem, (self, index, value), {})

    def __getattr__(self, name: str) -> Any:
        # Tensor methods run through __torch_function__; attributes (dtype, shape, real, ...)
        # are read from every tensor: a list if they are tensors, else the common value.
        attribute = getattr(Tensor, name, None)
        if attribute is None:
            raise AttributeError(f"'TensorList' object has no attribute {name!r}")
        if callable(attribute):
            return lambda *args, **kwargs: TensorList.__torch_function__(
                attribute, (TensorList,), (self, *args), kwargs
            )
        return _gather([getattr(t, name) for t in self.tensors], name)

    def _refuse(self, *args: Any) -> Any:
        raise NotLiftable(
            "a rule's update asked a tensor for a Python value (bool, len, iteration, a number) "
            "that differs per tensor: it runs per tensor"
        )

    __bool__ = __len__ = __iter__ = __float__ = __int__ = __index__ = _refuse

    # Comparisons give a list of boolean tensors, as they do per tensor.
    def __lt__(self, other: Any) -> Any:
        return _each(operator.lt, (self, other), {})

    def __le__(self, other: Any) -> Any:
        return _each(operator.le, (self, other), {})

    def __gt__(self, other: Any) -> Any:
        return _each(operator.gt, (self, other), {})

    def __ge__(self, other: Any) -> Any:
        return _each(operator.ge, (self, other), {})

    def __eq__(self, other: Any) -> Any:  # type: ignore[override]
        return _each(operator.eq, (self, other), {})

    def __ne__(self, other: Any) -> Any:  # type: ignore[override]
        return _each(operator.ne, (self, other), {})

    __hash__ = None  # type: ignore[assignment]


def _gather(values: list[Any], what: str) -> Any:
    """The results of one op over each tensor: a TensorList of tensors, a tuple of TensorLists
    for tuples of tensors, None for in-place ops that return nothing; any other value must be
    the same for every tensor (``dtype``, ``is_complex()``), else the update branches per
    tensor and cannot be lifted."""
    if all(isinstance(value, Tensor) for value in values):
        return TensorList(values)
    if all(value is None for value in values):
        return None
    if all(isinstance(value, tuple) for value in values) and all(
        isinstance(entry, Tensor) for value in values for entry in value
    ):
        return tuple(TensorList(list(entries)) for entries in zip(*values, strict=True))
    first = values[0]
    if all(type(value) is type(first) and value == first for value in values[1:]):
        return first
    raise NotLiftable(f"{what} differs among the tensors of the list: the update runs per tensor")


def _operator(
    lifted: Callable[[Any, Any], Any], op: Callable[[Any, Any], Any], x: Any, y: Any
) -> Any:
    result = lifted(x, y)
    return _each(op, (x, y), {}) if result is NotImplemented else result


def _length(args: Sequence[Any]) -> int:
    for value in args:
        if isinstance(value, TensorList):
            return len(value.tensors)
        if isinstance(value, (list, tuple)):
            for entry in value:
                if isinstance(entry, TensorList):
                    return len(entry.tensors)
    raise TypeError("no TensorList among the arguments")


def _pick(value: Any, index: int) -> Any:
    if isinstance(value, TensorList):
        return value.tensors[index]
    if isinstance(value, (list, tuple)) and any(isinstance(v, TensorList) for v in value):
        return type(value)(_pick(entry, index) for entry in value)
    return value


def _each(func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """``func`` applied to each tensor of the lists among its arguments, one call per tensor
    (the per-tensor update's own op, so the same result)."""
    count = _length((*args, *kwargs.values()))
    values = [
        func(
            *(_pick(value, index) for value in args),
            **{key: _pick(value, index) for key, value in kwargs.items()},
        )
        for index in range(count)
    ]
    return _gather(values, getattr(func, "__name__", repr(func)))


def _sources(name: str) -> tuple[Any, ...]:
    """The torch function and Tensor method named ``name`` (what ``__torch_function__`` gets)."""
    return tuple(
        source for source in (getattr(torch, name, None), getattr(Tensor, name, None)) if source
    )


def _lists(*values: Any) -> bool:
    return all(isinstance(value, TensorList) for value in values)


def _real(x: TensorList) -> bool:
    return not x.tensors[0].is_complex() if x.tensors else True


def _foreach_device(x: TensorList) -> bool:
    # On the CPU every foreach op runs torch's per-tensor op on each tensor ("slow path"), so
    # identical results by construction. Elsewhere the fused foreach kernels compute in the same
    # opmath, except division by a scalar (see _div).
    return not x.tensors or x.tensors[0].device.type == "cpu"


def _scalar(x: TensorList, value: int | float) -> int | float | Tensor:
    """A Python float as the CPU's foreach ops take it best: one 0-dim float64 tensor for the
    whole list. Given a number, they wrap it into a tensor again for each tensor of the list,
    which costs more than a small tensor's arithmetic; a 0-dim float64 tensor promotes and
    computes as a Python float does (both are float64 CPU scalars to the kernel) with a tensor
    of one or more dimensions, but not with a 0-dim one (two 0-dim tensors promote to float64),
    so a list holding one gets the number."""
    if type(value) is float and _foreach_device(x) and all(t.dim() for t in x.tensors):
        return torch.tensor(value, dtype=torch.float64)
    return value


def _add(x: Any, y: Any, *, alpha: Any = None) -> Any:
    if _lists(x, y):
        if alpha is None:
            return TensorList(torch._foreach_add(x.tensors, y.tensors))
        return TensorList(torch._foreach_add(x.tensors, y.tensors, alpha=alpha))
    if alpha is not None:
        return NotImplemented
    # x + s == s + x exactly (IEEE addition commutes).
    if isinstance(y, TensorList) and _number(x):
        x, y = y, x
    if isinstance(x, TensorList) and _number(y):
        return TensorList(torch._foreach_add(x.tensors, _scalar(x, y)))
    return NotImplemented


def _sub(x: Any, y: Any, *, alpha: Any = None) -> Any:
    if _lists(x, y):
        if alpha is None:
            return TensorList(torch._foreach_sub(x.tensors, y.tensors))
        return TensorList(torch._foreach_sub(x.tensors, y.tensors, alpha=alpha))
    if alpha is not None:
        return NotImplemented
    # x - s == x + (-s) and s - x == (-x) + s exactly: subtraction adds the negation (torch's
    # sub is its add with alpha=-1).
    if isinstance(x, TensorList) and _number(y) and not isinstance(y, bool):
        return TensorList(torch._foreach_add(x.tensors, _scalar(x, -y)))
    if isinstance(y, TensorList) and _number(x) and not isinstance(x, bool):
        return TensorList(torch._foreach_add(torch._foreach_neg(y.tensors), _scalar(y, x)))
    return NotImplemented


def _mul(x: Any, y: Any) -> Any:
    if _lists(x, y):
        return TensorList(torch._foreach_mul(x.tensors, y.tensors))
    if isinstance(y, TensorList) and _number(x):
        x, y = y, x
    if isinstance(x, TensorList) and _number(y):
        return TensorList(torch._foreach_mul(x.tensors, _scalar(x, y)))
    return NotImplemented


def _div(x: Any, y: Any, *, rounding_mode: Any = None) -> Any:
    if rounding_mode is not None:
        return NotImplemented
    if _lists(x, y):
        return TensorList(torch._foreach_div(x.tensors, y.tensors))
    if isinstance(x, TensorList) and _number(y) and _foreach_device(x):
        # Off the CPU, foreach divides by a scalar as a multiplication by its reciprocal taken
        # in float64 and a tensor by one taken in its opmath type: not always the same bits.
        return TensorList(torch._foreach_div(x.tensors, _scalar(x, y)))
    return NotImplemented


def _pow(x: Any, y: Any) -> Any:
    if not _foreach_device(x if isinstance(x, TensorList) else y):
        return NotImplemented  # fused pow kernels special-case exponents differently
    if _lists(x, y):
        return TensorList(torch._foreach_pow(x.tensors, y.tensors))
    if isinstance(x, TensorList) and _number(y):
        return TensorList(torch._foreach_pow(x.tensors, y))
    if isinstance(y, TensorList) and _number(x):
        return TensorList(torch._foreach_pow(x, y.tensors))
    return NotImplemented


def _lerp(start: Any, end: Any, weight: Any) -> Any:
    if _lists(start, end) and (_number(weight) or isinstance(weight, TensorList)):
        weights = weight.tensors if isinstance(weight, TensorList) else weight
        return TensorList(torch._foreach_lerp(start.tensors, end.tensors, weights))
    return NotImplemented


def _binary_lists(name: str) -> Callable[[Any, Any], Any]:
    foreach = getattr(torch, f"_foreach_{name}")

    def lifted(x: Any, y: Any) -> Any:
        if _lists(x, y) and _real(x):
            return TensorList(foreach(x.tensors, y.tensors))
        return NotImplemented

    return lifted


def _clamp(x: Any, min: Any = None, max: Any = None) -> Any:
    if not (isinstance(x, TensorList) and _real(x)):
        return NotImplemented
    bounds = (min, max)
    if all(bound is None for bound in bounds) or not all(
        bound is None or _number(bound) for bound in bounds
    ):
        return NotImplemented
    # clamp(x, lo, hi) = min(max(x, lo), hi), NaN kept: clamp_min then clamp_max.
    tensors = x.tensors
    if min is not None:
        tensors = torch._foreach_clamp_min(tensors, min)
    if max is not None:
        tensors = torch._foreach_clamp_max(tensors, max)
    return TensorList(tensors)


def _clamp_bound(name: str) -> Callable[[Any, Any], Any]:
    def lifted(x: Any, bound: Any) -> Any:
        return _clamp(x, **{name: bound})

    return lifted


def _addc(name: str) -> Callable[..., Any]:
    foreach = getattr(torch, f"_foreach_{name}")

    def lifted(x: Any, tensor1: Any, tensor2: Any, *, value: Any = 1) -> Any:
        if _lists(x, tensor1, tensor2) and _number(value) and _foreach_device(x):
            return TensorList(foreach(x.tensors, tensor1.tensors, tensor2.tensors, value))
        return NotImplemented

    return lifted


def _real_unary(name: str) -> Callable[[Any], Any]:
    lifted_op = _unary(name)

    def lifted(x: Any) -> Any:
        # Complex tensors: torch's ops differ in what they accept and return (abs is real).
        if isinstance(x, TensorList) and _real(x):
            return lifted_op(x)
        return NotImplemented

    return lifted


# torch function or Tensor method name -> its foreach form (NotImplemented: run it per tensor).
_FOREACH: dict[str, Callable[..., Any]] = {
    "add": _add,
    "__add__": _add,
    "sub": _sub,
    "subtract": _sub,
    "__sub__": _sub,
    "mul": _mul,
    "multiply": _mul,
    "__mul__": _mul,
    "div": _div,
    "divide": _div,
    "true_divide": _div,
    "__truediv__": _div,
    "pow": _pow,
    "__pow__": _pow,
    "lerp": _lerp,
    "maximum": _binary_lists("maximum"),
    "minimum": _binary_lists("minimum"),
    "clamp": _clamp,
    "clip": _clamp,
    "clamp_min": _clamp_bound("min"),
    "clamp_max": _clamp_bound("max"),
    "addcmul": _addc("addcmul"),
    "addcdiv": _addc("addcdiv"),
    "neg": lambda x: -x if isinstance(x, TensorList) else NotImplemented,
    "negative": lambda x: -x if isinstance(x, TensorList) else NotImplemented,
    "__neg__": lambda x: -x if isinstance(x, TensorList) else NotImplemented,
    **{
        name: _real_unary(name)
        for name in (
            "abs",
            "sqrt",
            "rsqrt",
            "exp",
            "expm1",
            "log",
            "log1p",
            "log2",
            "log10",
            "sign",
            "reciprocal",
            "sigmoid",
            "tanh",
            "sin",
            "cos",
            "floor",
            "ceil",
            "round",
            "trunc",
            "frac",
            "erf",
        )
        if hasattr(torch, f"_foreach_{name}")
    },
}


def copy_into(targets: list[Tensor], sources: list[Tensor]) -> None:
    """``target.copy_(source)`` for each pair, as one ``torch._foreach_copy_`` where torch has it
    (torch 2.4 lacks it on some builds) and the targets are plain tensors (DTensor, FSDP2's
    parameters, has no sharding rule for it)."""
    foreach_copy = getattr(torch, "_foreach_copy_", None)
    if foreach_copy is not None and all(type(t) in _PLAIN for t in targets):
        foreach_copy(targets, sources)
        return
    for target, source in zip(targets, sources, strict=True):
        target.copy_(source)


_PLAIN = (Tensor, torch.nn.Parameter)
