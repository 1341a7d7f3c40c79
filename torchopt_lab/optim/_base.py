"""What every optimizer here shares: the extra arguments, global-norm clipping, and the one place
where a step picks its backend for each (device, dtype) group of tensors.

A subclass provides three things, the rest is here:

- ``_reference``: the torch reference update, a function in torch.optim's functional shape
  (``adam(params, grads, exp_avgs, ..., *, lr, beta1, ...)``) over lists on one device and dtype;
- ``_group_tensors(group)``: the tensor lists of one param group, in the order of ``_reference``'s
  positional arguments, with lazily created state;
- ``_hyperparameters(group)``: the keyword arguments of ``_reference`` for that group.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import inspect
import math
import sys
from collections.abc import Callable, Iterator
from itertools import chain
from typing import Any, ClassVar

import torch
from torch import Tensor
from torch.optim.optimizer import _device_dtype_check_for_fused, _use_grad_for_differentiable

from torchopt_lab import backend as _backend
from torchopt_lab.optim import _cpu_fused
from torchopt_lab.optim._fused import FusedState, Part, _local, fused_step, repeat_step
from torchopt_lab.optim.clip import _clip_coefficient, _total_norm

TensorLists = dict[str, list[Any]]

# Parameter dtypes whose state ``float32_state=True`` keeps in float32.
_LOW_PRECISION = (torch.float16, torch.bfloat16)


# Implementation flags honoured by handing the update to torch.optim's functional update.
_TORCH_FLAGS = ("fused", "capturable", "differentiable")


def _scalar_dtype() -> torch.dtype:
    """The dtype torch.optim gives ``state["step"]``: float64 under a float64 default dtype."""
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


def new_step() -> Tensor:
    """A fresh ``state["step"]``, hosted on the CPU like torch.optim's non-capturable step."""
    return torch.tensor(0.0, dtype=_scalar_dtype())


def as_float(value: float | Tensor) -> float | Tensor:
    """A hyperparameter as a Python number (a 1-element tensor lr or beta is read once).

    Under ``torch.compile`` a tensor stays a tensor (a 0-dim float64 one, as the Python number
    would be): reading it on the host would break the graph and bake its value into it."""
    if not isinstance(value, Tensor):
        return value
    if torch.compiler.is_compiling():
        return value.reshape(()).to(torch.float64)
    return value.item()


def read_steps(state_steps: list[Tensor]) -> list[float] | list[Tensor]:
    """The step counts as Python numbers; under ``torch.compile``, the step tensors themselves,
    for :func:`per_step` to read in the graph.

    A compiled step keeps the counts in the graph, as torch.optim's compiled optimizers do: a host
    read (``tolist``, ``item``) would break the graph, and a count baked in as a constant would
    recompile on every step."""
    if torch.compiler.is_compiling():
        return list(state_steps)
    if not state_steps:
        return []
    try:
        # One read for the whole list; steps loaded from elsewhere may differ in dtype or device.
        return torch.stack(state_steps).tolist()
    except RuntimeError:
        return [step.item() for step in state_steps]


def per_step(steps: list[Any], scalars: Callable[[Any], Any]) -> list[Any]:
    """``scalars(t)`` for each step count of :func:`read_steps` (a number, or a tuple of them),
    computed once per distinct count where counts are numbers.

    Under ``torch.compile`` the counts are evaluated together: stacked into one 1-D float64
    tensor, which ``scalars`` computes on element-wise (with ``+ - * / **``, as on numbers), and
    its results split per tensor (:func:`split_stacked`); so the graph holds the scalars'
    computation once, not once per tensor. Counts on different devices (a state dict loaded from
    elsewhere) are computed one by one."""
    if not torch.compiler.is_compiling():
        memo = {t: scalars(t) for t in set(steps)}
        return [memo[t] for t in steps]
    if len({t.device for t in steps}) != 1:
        return [scalars(t.to(torch.float64)) for t in steps]
    values = scalars(torch.stack(steps).to(torch.float64))
    single = not isinstance(values, tuple)
    rows = split_stacked([values] if single else list(values), len(steps))
    return [row[0] for row in rows] if single else [tuple(row) for row in rows]


def split_stacked(values: list[Any], count: int) -> list[list[Any]]:
    """Under ``torch.compile``: ``count`` rows, one per tensor, of its entries of ``values``, each
    value a 1-D tensor of one entry per tensor (computed on stacked step counts) or one value
    for all (a hyperparameter).

    The stacked values are gathered into one ``[count, len(values)]`` float64 table first, read
    row by row: Inductor inlines a pointwise value into each consumer, so a value split directly
    would have its whole arithmetic recomputed in every tensor's loop (the generated code, and
    its compile time, growing by all of it per tensor), where the table, which every tensor
    reads, is computed once. Entries keep their value's dtype."""
    stacked = [
        index
        for index, value in enumerate(values)
        if isinstance(value, Tensor) and value.shape == (count,)
    ]
    rows: list[list[Any]] = [list(values) for _ in range(count)]
    if stacked:
        table = torch.stack([values[index].to(torch.float64) for index in stacked], dim=1)
        for row, entries in zip(rows, table.unbind(0), strict=True):
            for column, index in enumerate(stacked):
                entry, dtype = entries[column], values[index].dtype
                row[index] = entry if dtype == torch.float64 else entry.to(dtype)
    return rows


def foreach_add_(targets: list[Tensor], tensors: list[Tensor], alpha: float | Tensor) -> None:
    """``targets[i] += alpha * tensors[i]``; ``alpha`` a number, or under ``torch.compile`` a
    0-dim tensor (a tensor ``lr``, see :func:`as_float`), which ``alpha=`` cannot take."""
    if isinstance(alpha, Tensor):
        torch._foreach_add_(targets, torch._foreach_mul(tensors, alpha))
        return
    torch._foreach_add_(targets, tensors, alpha=alpha)


def foreach_addcdiv_(
    targets: list[Tensor],
    numerators: list[Tensor],
    denominators: list[Tensor],
    values: list[Any] | float | Tensor,
) -> None:
    """``targets[i] += values[i] * numerators[i] / denominators[i]`` (``values`` a list, or one
    value for all), in that order of operations (torch's addcdiv kernel). Under
    ``torch.compile`` the values are 0-dim tensors, which ``torch._foreach_addcdiv_`` cannot
    take: the same three operations, unfused here and fused by Inductor."""
    if torch.compiler.is_compiling() or isinstance(values, Tensor):
        if not isinstance(values, list):
            values = [values] * len(targets)
        scaled = torch._foreach_mul(numerators, values)
        torch._foreach_div_(scaled, denominators)
        torch._foreach_add_(targets, scaled)
        return
    torch._foreach_addcdiv_(targets, numerators, denominators, values)


def _sharing_memory(params: list[Tensor]) -> set[int]:
    """Ids of the parameters whose memory overlaps another's (the same tensor twice, or views of
    one storage that overlap), by address interval: one sort, no per-pair work."""
    # FSDP2's DTensors hold no storage of their own: their local shards are the memory updated.
    spans = sorted(
        (str(t.device), t.data_ptr(), t.data_ptr() + t.numel() * t.element_size(), id(p), index)
        for index, (p, t) in enumerate(zip(params, _local(params), strict=True))
        if t.numel()
    )
    shared: set[int] = set()
    device, reach, owner = None, -1, None
    for where, start, end, key, _ in spans:
        if where != device:
            device, reach = where, -1
        if start < reach:
            shared.update((key, owner))
        if end > reach:
            reach, owner = end, key
    return shared


def _real_view(tensor: Tensor) -> Tensor:
    return torch.view_as_real(tensor) if tensor.is_complex() else tensor


def _as_float_step(step: Any) -> Tensor:
    """``state["step"]`` as a floating tensor: a Python number (older torch) or an integer tensor
    (torch on the CPU counts in whatever dtype it was given, int64 included) keeps its value."""
    if torch.is_tensor(step) and step.is_floating_point():
        return step
    return new_step().fill_(float(step))


# Why a tensor with the negative bit set (``torch._neg_view``, a lazy negation) leaves the kernels.
_NEGATIVE_BIT = (
    "a parameter or gradient has the negative bit set (a lazy negation: its memory holds minus "
    "its value), and the kernels read memory"
)


def _memory_key(param: Tensor) -> tuple[Any, ...]:
    """What identifies the memory a parameter updates: its storage (views of one storage may
    overlap), or the tensor itself when it holds no elements."""
    if param.numel() == 0 or torch.compiler.is_compiling():
        return ("tensor", id(param))
    try:
        return (param.device, param.untyped_storage().data_ptr())
    except (RuntimeError, NotImplementedError):  # a wrapper subclass (DTensor) has no storage
        return ("tensor", id(param))


def _distinct_storages(params: list[Tensor]) -> bool:
    """Whether each of ``params`` (of one device) has a storage of its own, asked in one pass
    (the usual case; :func:`_memory_key` per parameter costs a microsecond each). False when
    unsure: empty tensors (their storages may all sit at address 0), a wrapper subclass without
    a storage (DTensor), or a trace."""
    if torch.compiler.is_compiling():
        return False
    try:
        addresses = {p.untyped_storage().data_ptr() for p in params}
    except (RuntimeError, NotImplementedError):
        return False
    return len(addresses) == len(params) and 0 not in addresses


def _without_repeats(tensors: TensorLists) -> Iterator[TensorLists]:
    """One group's tensor lists cut into consecutive runs in which no parameter repeats.

    torch.optim (``foreach=False``, its default on the CPU) warns about a parameter listed twice
    in a group and then updates it once per occurrence, in turn; a multi-tensor update over the
    whole list would instead apply both occurrences' state updates before either parameter
    update. Updating the runs one after another gives torch's result. Parameters that are views
    of one storage (they may overlap) count as repeats too; cutting a run where nothing overlaps
    only costs a launch."""
    params = tensors["params"]
    if _distinct_storages(params):
        yield tensors
        return
    keys = [_memory_key(param) for param in params]
    if len(set(keys)) == len(keys):
        yield tensors
        return
    count = len(params)
    start, seen = 0, set()
    for end, key in enumerate([*keys, None]):
        if key is not None and key not in seen:
            seen.add(key)
            continue
        yield {
            name: values[start:end] if len(values) == count else values
            for name, values in tensors.items()
        }
        start, seen = end, {key}


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


def _built_by_zero_redundancy_optimizer() -> bool:
    """Whether a ZeroRedundancyOptimizer is constructing this optimizer for its partition."""
    zero_module = sys.modules.get("torch.distributed.optim.zero_redundancy_optimizer")
    if zero_module is None:
        return False
    frame = sys._getframe(1)
    while frame is not None:
        if isinstance(frame.f_locals.get("self"), zero_module.ZeroRedundancyOptimizer):
            return True
        frame = frame.f_back
    return False


def _use_grad_in_graph(step: Callable[..., Any]) -> Callable[..., Any]:
    """torch.optim's ``_use_grad_for_differentiable``, except under ``torch.compile``: torch's
    wrapper breaks the graph on both sides of the update (``torch._dynamo.graph_break()``), so
    ``fullgraph=True`` could not trace a step; here the grad mode is set inside the graph."""
    eager = _use_grad_for_differentiable(step)

    @functools.wraps(step)
    def wrapper(self: torch.optim.Optimizer, *args: Any, **kwargs: Any) -> Any:
        if torch.compiler.is_compiling():
            with torch.set_grad_enabled(bool(self.defaults.get("differentiable", False))):
                return step(self, *args, **kwargs)
        return eager(self, *args, **kwargs)

    return wrapper


#: The options every torchopt_lab optimizer takes beside torch's (keyword-only, after
#: ``backend``), held as attributes of the optimizer, not in its param groups.
ENGINE_OPTIONS: dict[str, Any] = {
    "max_grad_norm": None,
    "skip_nonfinite": False,
    "float32_state": False,
    "record_norms": False,
}


def set_engine_options(
    optimizer: torch.optim.Optimizer,
    *,
    backend: str = "auto",
    max_grad_norm: float | None = None,
    skip_nonfinite: bool = False,
    float32_state: bool = False,
    record_norms: bool = False,
) -> None:
    """Check and set ``backend`` and :data:`ENGINE_OPTIONS` on ``optimizer`` (built-in or rule)."""
    optimizer.backend = _backend.check_backend(backend)
    optimizer.max_grad_norm = check_max_grad_norm(max_grad_norm)
    if optimizer.max_grad_norm is not None and _built_by_zero_redundancy_optimizer():
        raise ValueError(
            f"{type(optimizer).__name__}: max_grad_norm={max_grad_norm} cannot be used inside "
            "ZeroRedundancyOptimizer: each rank holds only its partition of the parameters, "
            "so the clip would use that partition's norm, not the global one. Clip with "
            "torch.nn.utils.clip_grad_norm_(model.parameters(), ...) before step() instead"
        )
    if skip_nonfinite and optimizer.max_grad_norm is None:
        raise ValueError(
            "skip_nonfinite=True needs max_grad_norm: the step is skipped when the gradient "
            "norm computed for clipping is not finite"
        )
    optimizer.skip_nonfinite = bool(skip_nonfinite)
    optimizer.float32_state = bool(float32_state)
    optimizer.record_norms = bool(record_norms)
    optimizer._skipped_on_host = 0
    # Steps skip_nonfinite skipped inside compiled steps (counted there, without a host read).
    optimizer._skipped_traced = torch.zeros((), dtype=torch.int64)


class DeclaredOptimizer(torch.optim.Optimizer):
    """The class derived from a declaration, written once for both engines.

    A subclass that sets the class attribute ``rule`` (a :class:`torchopt_lab.optim.rules.Rule`)
    gets from it: ``__init__`` with the signature ``params``, the rule's hyperparameters in
    order, ``fused`` (where the engine adds it), ``backend`` and :data:`ENGINE_OPTIONS`; the
    rule's checks (torch's order, exception types and messages), then each hyperparameter's
    ``convert`` and the rule's ``fixed`` keys, the param-group keys in ``group_order``; the keys
    ``__setstate__`` fills in (``_group_defaults``) and forces (``fixed``); each parameter's state
    created from the rule's :class:`~torchopt_lab.optim.rules.State` entries, in the constructor
    with ``eager_state``. Two engines run the step: ``RuleOptimizer`` (the rule's per-tensor
    update) and :class:`TorchoptOptimizer` (a built-in's ``reference`` and fused kernel).
    """

    rule: ClassVar[Any]
    _signature: ClassVar[inspect.Signature]
    # Whether the constructor takes ``fused`` (keyword-only, after the rule's hyperparameters,
    # an attribute of the optimizer) when the rule does not declare it as a hyperparameter.
    _adds_fused: ClassVar[bool] = False
    # Param-group keys that state dicts of older versions may lack, with the value
    # ``__setstate__`` gives them (derived from the rule; written by hand without one).
    _group_defaults: ClassVar[dict[str, Any]] = {}

    def __repr__(self) -> str:
        """torch.optim's repr (the param groups), then the options this optimizer holds outside
        its groups: ``backend``, ``max_grad_norm`` and the fused-kernel options."""
        options = "".join(
            f"    {name}: {getattr(self, name)}\n"
            for name in (
                "backend",
                "max_grad_norm",
                "skip_nonfinite",
                "float32_state",
                "record_norms",
            )
        )
        torch_repr = super().__repr__()
        assert torch_repr.endswith(")")
        return f"{torch_repr[:-1]}\nOptimizer options\n{options})"

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "rule" in cls.__dict__:
            cls._derive()

    @classmethod
    def _derive(cls) -> None:
        """Check ``cls.rule`` and derive the constructor, its signature and the group defaults;
        then the engine's own parts (:meth:`_derive_engine`)."""
        rule = cls.rule
        names = [h.name for h in rule.hyperparameters]
        own = {"params", "backend", *ENGINE_OPTIONS}
        if len(set(names)) != len(names) or own & set(names):
            raise TypeError(
                f"{cls.__name__}.rule: hyperparameter names must be unique and not one of the "
                f"constructor's own {sorted(own)}: {names}"
            )
        if set(rule.fixed) & set(names):
            raise TypeError(
                f"{cls.__name__}.rule: fixed keys {sorted(set(rule.fixed) & set(names))} are "
                "hyperparameters too; a fixed key is one the constructor does not take"
            )
        keys = [*names, *rule.fixed]
        unknown = {name for check in rule.checks for name in check.names} - set(keys)
        if unknown:
            raise TypeError(f"{cls.__name__}.rule: checks of undeclared names {sorted(unknown)}")
        state_names = [entry.name for entry in rule.state]
        if "step" in state_names or len(set(state_names)) != len(state_names):
            raise TypeError(
                f"{cls.__name__}.rule: state names must be unique and not 'step': {state_names}"
            )
        if rule.group_order and sorted(rule.group_order) != sorted(keys):
            raise TypeError(
                f"{cls.__name__}.rule: group_order must list every hyperparameter and fixed key "
                f"once: {list(rule.group_order)}, keys {keys}"
            )
        parameters = [inspect.Parameter("params", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
        parameters += [
            inspect.Parameter(
                h.name,
                inspect.Parameter.KEYWORD_ONLY
                if h.keyword_only
                else inspect.Parameter.POSITIONAL_OR_KEYWORD,
                default=h.default,
            )
            for h in rule.hyperparameters
        ]
        # Beside torch's arguments, as every torchopt_lab optimizer: whether the step is fused
        # (a rule's own extension where torch.optim has none) and which backend runs it
        # (attributes of the optimizer, not of its param groups, so state dicts stay torch's).
        if cls._adds_fused and "fused" not in names:
            parameters.append(
                inspect.Parameter("fused", inspect.Parameter.KEYWORD_ONLY, default=None)
            )
        parameters.append(
            inspect.Parameter("backend", inspect.Parameter.KEYWORD_ONLY, default="auto")
        )
        # ... and the engine's options, as every optimizer here takes them (attributes too).
        parameters += [
            inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default)
            for name, default in ENGINE_OPTIONS.items()
        ]
        cls._signature = inspect.Signature(parameters)

        def __init__(self: DeclaredOptimizer, params: Any, *args: Any, **kwargs: Any) -> None:
            DeclaredOptimizer._construct(self, params, args, kwargs)

        __init__.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
            [inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD), *parameters]
        )
        __init__.__qualname__ = f"{cls.__qualname__}.__init__"
        __init__.__doc__ = f"Construct {cls.__name__}: see the class docstring."
        cls.__init__ = __init__  # type: ignore[method-assign]
        defaults = rule.setstate_defaults
        if defaults is None:
            defaults = {h.name: h.default for h in rule.hyperparameters}
        cls._group_defaults = dict(defaults)
        cls._derive_engine()

    @classmethod
    def _derive_engine(cls) -> None:
        """What the engine derives from ``cls.rule`` beside the constructor (nothing here)."""

    def _construct(self, params: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """The derived constructor: bind, check, convert, fix, order; then :meth:`_build`."""
        cls = type(self)
        rule = cls.rule
        try:
            bound = cls._signature.bind(params, *args, **kwargs)
        except TypeError as error:
            raise TypeError(f"{cls.__name__}(): {error}") from None
        bound.apply_defaults()
        values = dict(bound.arguments)
        params = values.pop("params")
        engine = {name: values.pop(name) for name in ("backend", *ENGINE_OPTIONS)}
        if cls._adds_fused and all(h.name != "fused" for h in rule.hyperparameters):
            engine["fused"] = values.pop("fused")
        values.update(rule.fixed)
        for check in rule.checks:
            check(check.value(values))
        for h in rule.hyperparameters:
            if h.convert is not None:
                values[h.name] = h.convert(values[h.name])
        if rule.group_order:
            values = {name: values[name] for name in rule.group_order}
        self._build(params, values, engine)
        if rule.eager_state:
            for group in self.param_groups:
                for p in group["params"]:
                    self._init_state(p, group)

    def __getstate__(self) -> dict[str, Any]:
        # torch.optim pickles only defaults, state and param groups; keep the engine's options
        # too (not the fused kernels' cached tables: they hold addresses, rebuilt on a step).
        return {
            **super().__getstate__(),
            "backend": self.backend,
            **{name: getattr(self, name) for name in ENGINE_OPTIONS},
            **({"fused": self.fused} if type(self)._adds_fused else {}),
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        """torch.optim's, then the engine's options an older pickle lacks (``fused`` included,
        where the engine adds it: pickled before RMSprop took it) and the param-group keys an
        older state dict lacks."""
        super().__setstate__(state)
        self.__dict__.setdefault("backend", "auto")
        for name, default in ENGINE_OPTIONS.items():
            self.__dict__.setdefault(name, default)
        self.__dict__.setdefault("_skipped_on_host", 0)
        if type(self)._adds_fused:
            self.__dict__.setdefault("fused", None)
        self._fill_group_defaults()

    def _build(self, params: Any, defaults: dict[str, Any], engine: dict[str, Any]) -> None:
        """The engine's construction from checked param-group ``defaults`` and its own options
        (``backend``, :data:`ENGINE_OPTIONS`, and ``fused`` where the engine adds it)."""
        raise NotImplementedError

    def _fill_group_defaults(self) -> None:
        """``__setstate__``: fill in the keys an older state dict lacks, force ``rule.fixed``."""
        rule = getattr(type(self), "rule", None)
        fixed = {} if rule is None else rule.fixed
        for group in self.param_groups:
            for key, value in self._group_defaults.items():
                group.setdefault(key, value)
            group.update(fixed)

    def _step_device(self, p: Tensor, group: dict[str, Any]) -> torch.device | None:
        """Where a new ``step`` (and scalar state) lives: the CPU unless ``capturable``, as
        torch.optim keeps it (None: the CPU)."""
        return p.device if group.get("capturable") else None

    def _init_group(self, group: dict[str, Any]) -> None:
        """Create the state a step of ``group`` would create before its update, and nothing else:
        that of each parameter with a gradient and no state yet, stopping at the first sparse
        gradient (where a step may raise, having created the state of the parameters before it).

        A compiled step calls it first: Dynamo runs a method of this name eagerly, outside the
        graph, as it does torch.optim's own ``_init_group``, so the first compiled step traces
        the state it reads. Created inside the graph instead, the state made the next step fail
        the graph's guards (they saw no state) and compile the whole step a second time."""
        rule = getattr(type(self), "rule", None)
        if rule is None or not (rule.step_state or any(e.exists(group) for e in rule.state)):
            return  # a group that keeps no state leaves self.state untouched, as torch does
        for p in group["params"]:
            grad = p.grad
            if grad is None:
                continue
            if grad.is_sparse:
                return
            state = self.state[p]
            if len(state) == 0:
                self._create_state(state, p, group)

    def _init_groups(self) -> None:
        """:meth:`_init_group` for every group; called by compiled steps only."""
        for group in self.param_groups:
            self._init_group(group)

    def _init_state(self, p: Tensor, group: dict[str, Any]) -> dict[str, Any]:
        """``self.state[p]``, created from the rule's State entries if empty (see
        :meth:`_create_state`)."""
        state = self.state[p]
        if len(state) == 0:
            self._create_state(state, p, group)
        return state

    def _create_state(
        self,
        state: dict[str, Any],
        p: Tensor,
        group: dict[str, Any],
        dtype: torch.dtype | None = None,
    ) -> None:
        """Fill a parameter's empty ``state``: ``step`` (with ``rule.step_state``), then each
        State entry kept in ``group`` (``when``) with an initial value (``init`` not None):
        tensors like ``p`` (in ``dtype`` if given), scalars like ``step``."""
        rule = self.rule
        device = self._step_device(p, group)
        if rule.step_state:
            state["step"] = torch.tensor(0.0, dtype=_scalar_dtype(), device=device)
        for entry in rule.state:
            if not entry.exists(group):
                continue
            # State created in the constructor takes the constructor's values, whatever a param
            # group overrides (torch's Adagrad fills every sum with its initial_accumulator_value).
            init = entry.initial(self.defaults if rule.eager_state else group)
            if init is None:
                continue  # created by the update on the first step
            if entry.scalar:
                state[entry.name] = torch.tensor(init, dtype=_scalar_dtype(), device=device)
            else:
                if rule.complex_as_real and p.is_complex():
                    # The update sees the real view: both components start at init (torch's
                    # Adagrad fills complex(v, v)).
                    init = complex(init, init)
                state[entry.name] = torch.full_like(
                    p, init, dtype=dtype, memory_format=torch.preserve_format
                )


class TorchoptOptimizer(DeclaredOptimizer):
    """Base of every torchopt_lab optimizer (private: use the optimizers themselves).

    ``backend``, ``max_grad_norm`` and the fused-kernel options (``skip_nonfinite``,
    ``float32_state``, ``record_norms``; see docs/kernels.md, "Fused Triton optimizer kernels") are
    attributes of the optimizer, not of its param groups, so param groups and ``state_dict()``
    hold exactly torch.optim's keys and interchange with it.
    """

    _reference: ClassVar[Callable[..., None]]
    # Whether complex params reach ``_reference`` as real views (torch.view_as_real), as torch.optim
    # does for optimizers whose update is not linear in the gradient.
    _views_complex_as_real: ClassVar[bool] = True
    # Whether ``_reference`` fills in state lists (SGD creates momentum buffers on the first step).
    _creates_state: ClassVar[bool] = False

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            for p in group["params"]:
                # Older torch stored ``step`` as a Python number (a tensor since torch 1.12), and
                # torch on the CPU also steps an integer tensor: both become a float step.
                p_state = self.state.get(p, {})
                if "step" in p_state:
                    p_state["step"] = _as_float_step(p_state["step"])

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch.optim's ``load_state_dict``; with ``float32_state``, the state of low-precision
        parameters stays float32 (torch casts every floating state tensor to its parameter's
        dtype, which would round a float32 checkpoint to bfloat16)."""
        super().load_state_dict(state_dict)
        _cpu_fused.forget_plans(self)  # they hold the replaced state's tensors
        if self.float32_state:
            self._load_float32_state(state_dict)

    def _load_float32_state(self, state_dict: dict[str, Any]) -> None:
        saved_ids = chain.from_iterable(group["params"] for group in state_dict["param_groups"])
        params = chain.from_iterable(group["params"] for group in self.param_groups)
        for saved_id, param in zip(saved_ids, params, strict=True):
            saved = state_dict["state"].get(saved_id)
            if param.dtype not in _LOW_PRECISION or not saved:
                continue
            for key, value in saved.items():
                if key != "step" and torch.is_tensor(value) and value.is_floating_point():
                    self.state[param][key] = value.to(
                        device=param.device, dtype=torch.float32, copy=True
                    )

    @property
    def _step_supports_amp_scaling(self) -> bool:
        """Whether ``GradScaler.step`` may hand this optimizer ``grad_scale``/``found_inf`` instead
        of unscaling the gradients itself: true when every device runs the fused kernels, which
        unscale as they load and skip the step on the device when ``found_inf`` is set. Tensors
        that still take the torch path (sparse gradients, complex or gapped parameters, ...)
        honour both too: their gradients are unscaled, and ``found_inf`` skips the whole step
        (read on the host, one synchronisation, only when such tensors exist). Also true, as in
        torch.optim, for ``fused=True``: on the torch path that runs torch's fused kernels."""
        if self.defaults.get("fused") or self._fused_extension():
            return True
        devices = {p.device for group in self.param_groups for p in group["params"]}
        component = f"optim.{type(self).__name__}"
        return bool(devices) and all(
            _backend.resolve(component, self.backend, device) == "triton" for device in devices
        )

    def norm_diagnostics(self) -> dict[Tensor, Tensor]:
        """Per-parameter squared norms from the last step run with ``record_norms=True``.

        Maps each parameter the step updated (by the kernels or by the torch path) to a float32
        tensor on its device holding
        ``[grad_sq_norm, update_sq_norm, param_sq_norm]``: the squared L2 norms of the gradient
        the update used (after unscaling and clipping), of the update (new minus old parameter)
        and of the parameter before the update. They are accumulated by the update kernel as it
        runs, so logging ``sqrt(update_sq_norm / param_sq_norm)`` (the update/weight ratio) costs
        no extra pass over memory and no synchronisation until you read a value.
        """
        state = self.__dict__.get("_fused_state")
        if state is None:
            return {}
        by_id = {id(p): p for group in self.param_groups for p in group["params"]}
        # Copies: the kernels overwrite their buffers on the next step.
        copies = {id(buffer): buffer.clone() for buffer, _ in state.norms.values()}
        return {
            by_id[key]: copies[id(buffer)][row]
            for key, (buffer, row) in state.norms.items()
            if key in by_id
        }

    @property
    def skipped_steps(self) -> int:
        """How many steps ``skip_nonfinite`` skipped (reading it synchronises with the device)."""
        state = self.__dict__.get("_fused_state")
        counters = state.skipped_steps.values() if state is not None else ()
        # Every device sees the same global norm, so they skip together: count a step once.
        traced = self.__dict__.get("_skipped_traced")
        in_graph = 0 if traced is None else int(traced.item())
        return self._skipped_on_host + in_graph + max((int(c.item()) for c in counters), default=0)

    def _build(self, params: Any, defaults: dict[str, Any], engine: dict[str, Any]) -> None:
        if "fused" in engine:
            # fused as an extension (RMSprop: torch's has none), an attribute as the rule
            # optimizers keep it, refused with differentiable or foreach in torch's words.
            self.fused = engine.pop("fused")
        set_engine_options(self, **engine)
        torch.optim.Optimizer.__init__(self, params, defaults)
        if defaults.get("fused") and defaults.get("foreach"):
            raise RuntimeError("`fused` and `foreach` cannot be `True` together.")
        if "fused" in self.__dict__:
            _cpu_fused.check_flags(self.fused, defaults)

    def _fused_extension(self) -> bool:
        """Whether ``fused=True`` was given as this optimizer's extension (an attribute, not a
        param-group key: torch's optimizer has no ``fused``)."""
        return bool(self.__dict__.get("fused"))

    def _step_device(self, p: Tensor, group: dict[str, Any]) -> torch.device | None:
        return None  # on the CPU; the fused kernels move it to the device (in-kernel counts)

    @classmethod
    def _derive_engine(cls) -> None:
        """A built-in's rule: its ``reference`` is ``_reference``; the lists of
        :meth:`_group_tensors` are named after the reference's positional parameters
        (``params``, ``grads``, one per tensor State, ``state_steps``), its keywords are read
        from the param group (or by ``rule.kernel.readers``: Adam's ``beta1``)."""
        rule = cls.rule
        if rule.reference is None:
            raise TypeError(
                f"{cls.__name__}.rule: a built-in optimizer's rule needs a reference (its "
                "group-level multi-tensor update); a rule without one subclasses RuleOptimizer"
            )
        if all(h.name != "differentiable" for h in rule.hyperparameters):
            raise TypeError(
                f"{cls.__name__}.rule: the built-in engine needs torch's differentiable flag "
                "among the hyperparameters (its step reads defaults['differentiable'])"
            )
        if any(entry.scalar for entry in rule.state):
            raise TypeError(
                f"{cls.__name__}.rule: the built-in engine keeps no scalar state beside step"
            )
        parameters = inspect.signature(rule.reference).parameters.values()
        lists = [p.name for p in parameters if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD]
        expected = ["params", "grads", *rule.tensor_state]
        if rule.step_state:
            expected.append("state_steps")
        if (
            len(lists) != len(expected)
            or lists[:2] != ["params", "grads"]
            or (rule.step_state and lists[-1] != "state_steps")
        ):
            raise TypeError(
                f"{cls.__name__}.rule: reference takes lists {lists}; expected params, grads, "
                f"one per tensor state {list(rule.tensor_state)}"
                + (", state_steps" if rule.step_state else "")
            )
        readers = dict(rule.kernel.readers) if rule.kernel is not None else {}
        keys = {h.name for h in rule.hyperparameters} | set(rule.fixed)
        keywords = [p.name for p in parameters if p.kind is inspect.Parameter.KEYWORD_ONLY]
        unread = [name for name in keywords if name not in keys and name not in readers]
        if unread:
            raise TypeError(
                f"{cls.__name__}.rule: reference keywords {unread} are neither hyperparameters "
                "nor fixed keys nor read by rule.kernel.readers"
            )
        if rule.kernel is not None and not set(rule.kernel.state_lists.values()) <= set(lists):
            raise TypeError(
                f"{cls.__name__}.rule: kernel state lists {rule.kernel.state_lists} are not "
                f"reference lists {lists}"
            )
        cls._reference = staticmethod(rule.reference)
        cls._views_complex_as_real = rule.complex_as_real
        cls._creates_state = any(entry.init is None for entry in rule.state)
        cls._lists = tuple(lists)
        cls._state_entries = tuple(
            (entry, name)
            for entry, name in zip(
                (entry for entry in rule.state if not entry.scalar), lists[2:], strict=False
            )
        )
        # (name, reader or None: read group[name]); no operator.itemgetter, which Dynamo
        # cannot trace in a compiled step.
        cls._keywords = tuple((name, readers.get(name)) for name in keywords)

    def _group_tensors(self, group: dict[str, Any]) -> TensorLists:
        """The group's tensor lists in the order of ``_reference``'s positional arguments, with
        lazily created state (derived from ``rule``; a class without one writes its own)."""
        rule = getattr(type(self), "rule", None)
        if rule is None:
            raise NotImplementedError
        tensors: TensorLists = {name: [] for name in self._lists}
        params, grads = tensors["params"], tensors["grads"]
        # States this group keeps (``when``); the others' lists stay empty.
        kept = [
            (entry.name, tensors[name])
            for entry, name in self._state_entries
            if entry.exists(group)
        ]
        steps = tensors["state_steps"] if rule.step_state else None
        sparse = rule.sparse_message
        all_state = self.state
        # A group that keeps no state (SGD without momentum) leaves self.state untouched, as
        # torch does: no empty entries in its state_dict.
        stateless = steps is None and not kept
        # A list comprehension a column (a Python loop body per parameter costs as much as the
        # update of a small one).
        params.extend([p for p in group["params"] if p.grad is not None])
        grads.extend([p.grad for p in params])
        # As torch.optim: the parameters before the first sparse gradient get their state, then
        # it raises.
        refused = None
        if sparse is not None:
            refused = next((index for index, grad in enumerate(grads) if grad.is_sparse), None)
        states = [] if stateless else [all_state[p] for p in params[:refused]]
        for p, state in zip(params, states, strict=False):  # states stop at a refused one
            if len(state) == 0:
                self._create_state(state, p, group)
        if refused is not None:
            raise RuntimeError(sparse.format(name=type(self).__name__))
        if stateless:
            return tensors
        for name, values in kept:
            values.extend([state.get(name) for state in states])
        if steps is not None:
            steps.extend([state["step"] for state in states])
        return tensors

    def _hyperparameters(self, group: dict[str, Any]) -> dict[str, Any]:
        """The keyword arguments of ``_reference`` for a group (derived from ``rule``)."""
        if getattr(type(self), "rule", None) is None:
            raise NotImplementedError
        return {name: group[name] if read is None else read(group) for name, read in self._keywords}

    def _without_kernel(self) -> bool:
        """Whether this optimizer's rule declares no fused kernel (its steps run the reference)."""
        rule = getattr(type(self), "rule", None)
        return rule is not None and rule.kernel is None

    def _created_lists(self, group: dict[str, Any], tensors: TensorLists) -> dict[str, list]:
        """Copies of the state lists an update may fill in (``State.init=None``), taken before
        it runs: :meth:`_finish_group` then stores only what changed."""
        if getattr(type(self), "rule", None) is None or not self._creates_state:
            return {}
        return {
            name: list(tensors[name])
            for entry, name in self._state_entries
            if entry.init is None and entry.exists(group)
        }

    def _finish_group(
        self, group: dict[str, Any], tensors: TensorLists, before: dict[str, list] | None = None
    ) -> None:
        """Store state the reference update created (``State.init=None``: SGD's first momentum
        buffers): every entry, or with ``before`` (:meth:`_created_lists`) those the update
        replaced (a state-dict write per parameter costs a microsecond, on every step)."""
        if getattr(type(self), "rule", None) is None or not self._creates_state:
            return
        for entry, name in self._state_entries:
            if entry.init is None and entry.exists(group):
                values = tensors[name]
                old = before.get(name) if before is not None else None
                for index, (p, value) in enumerate(zip(tensors["params"], values, strict=True)):
                    if old is None or old[index] is not value:
                        self.state[p][entry.name] = value

    @_use_grad_in_graph
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One optimization step; ``closure`` re-evaluates the model and returns the loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if torch.compiler.is_compiling():
            return self._traced_step(loss)
        if self.record_norms:
            fused_state = self.__dict__.get("_fused_state")
            if fused_state is not None:
                fused_state.norms.clear()  # this step's norms only, from either path
        if repeat_step(self):
            return loss
        groups = [(group, self._group_tensors(group)) for group in self.param_groups]
        if self.max_grad_norm is not None and any(
            grad.is_sparse for _, tensors in groups for grad in tensors["grads"]
        ):
            # NotImplementedError is what clip_grad_norm_ raises from deep inside torch here.
            raise NotImplementedError(
                f"{type(self).__name__}: max_grad_norm cannot clip sparse gradients (torch has "
                "no norm for them); clip the dense gradients yourself or drop max_grad_norm"
            )
        parts = self._dispatch(groups)
        fused = [part for part in parts if part.backend == "triton"]
        reference = [part for part in parts if part.backend == "torch"]
        total_norm = clip_coefficient = inverse_scale = None
        if reference:
            # Some tensors take the torch path: one norm over all gradients, computed by torch, is
            # used by both paths (the kernels then skip their own norm pass).
            controls = self._torch_path_controls(
                [grad for part in parts for grad in part.tensors["grads"]]
            )
            if controls is None:
                return loss  # skipped: nothing changes, on either path
            inverse_scale, total_norm, clip_coefficient = controls
        for part in reference:
            # State the update creates is stored as soon as its part ran (as torch.optim stores
            # a group's buffers right after the group's update): an interrupted step keeps it.
            self._reference_step(part, clip_coefficient, inverse_scale)
        dropped: list[Tensor] = []
        if fused:
            with_grads = sum(len(tensors["params"]) for _, tensors in groups)
            dropped = fused_step(
                self,
                fused,
                total_norm=total_norm,
                complete=not reference
                and sum(len(part.tensors["params"]) for part in fused) == with_grads,
            )
            for part in fused:
                self._finish_group(part.group, part.tensors)
        for p in dropped:
            # State created for a step the kernels skipped: the next step is the first again.
            p_state = self.state[p]
            for key in [key for key, value in p_state.items() if value is None]:
                del p_state[key]
            if not p_state:
                del self.state[p]
        return loss

    def _torch_path_controls(
        self, grads: list[Tensor]
    ) -> tuple[Tensor | None, Tensor | None, Tensor | None] | None:
        """What a step with tensors on the torch path needs beside the gradients: GradScaler's
        inverse scale, the global gradient norm and the clip coefficient (each None where not
        asked for); or None when the step is skipped (GradScaler's ``found_inf``, or
        ``skip_nonfinite`` with a non-finite norm: decided on the host, one synchronisation).

        GradScaler.step hands ``grad_scale``/``found_inf`` over when
        ``_step_supports_amp_scaling``; the torch path honours them as the kernels do.
        """
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        if found_inf is not None and found_inf.item():
            return None
        # GradScaler.unscale_'s factor: float32(1 / float64(scale)).
        inverse_scale = None if grad_scale is None else (1.0 / grad_scale.double()).float()
        total_norm = clip_coefficient = None
        if self.max_grad_norm is not None and grads:
            total_norm = _total_norm(grads)
            if self.skip_nonfinite and not torch.isfinite(total_norm).item():
                self._skipped_on_host += 1
                return None
            clip_coefficient = self._unscaled_clip_coefficient(total_norm, inverse_scale)
        return inverse_scale, total_norm, clip_coefficient

    def _unscaled_clip_coefficient(
        self, total_norm: Tensor, inverse_scale: Tensor | None
    ) -> Tensor:
        """``max_grad_norm``'s clip coefficient from the norm of the (possibly GradScaler-scaled)
        gradients: as the kernels do, the norm unscaled in float64 first."""
        if inverse_scale is not None:
            total_norm = (total_norm.double() * inverse_scale.double().to(total_norm.device)).to(
                total_norm.dtype
            )
        return _clip_coefficient(total_norm, self.max_grad_norm)

    def _traced_step(self, loss: Any) -> Any:
        """The step under ``torch.compile``: the torch reference update, traced by Dynamo.

        The Triton kernels are opaque to Dynamo, and the backend decision and the fused path's
        host-side plan would break the trace, so a compiled step runs the reference update
        (which Inductor then fuses) on every device; this is recorded in ``backend_info()``.
        GradScaler's ``grad_scale``/``found_inf``, clipping and ``skip_nonfinite`` are honoured
        as on the eager paths.
        """
        component = f"optim.{type(self).__name__}"
        self._init_groups()  # the state, created outside the graph (see _init_group)
        groups = [(group, self._group_tensors(group)) for group in self.param_groups]
        inverse_scale, clip_coefficient, skip = self._traced_controls(
            [grad for _, tensors in groups for grad in tensors["grads"]]
        )
        kept: list[tuple[Tensor, Tensor]] = []
        if skip is not None:
            # A data-dependent skip without a host read (which would break the graph): every
            # tensor the step updates is selected back to its value before the step where
            # ``skip`` is set (Inductor fuses the selection into the update's kernels).
            kept = [
                (t, t.clone())
                for _, tensors in groups
                for name, values in tensors.items()
                if name != "grads"
                for t in values
                if t is not None
            ]
        for group_index, (group, tensors) in enumerate(groups):
            by_kind: dict[tuple[torch.device, torch.dtype], list[int]] = {}
            for index, param in enumerate(tensors["params"]):
                by_kind.setdefault((param.device, param.dtype), []).append(index)
            for (device, dtype), indices in by_kind.items():
                if self.backend != "torch":
                    _backend.record_traced(component, self.backend, device.type, device.index)
                count = len(tensors["params"])
                part_tensors = {
                    name: [values[i] for i in indices] if len(values) == count else values
                    for name, values in tensors.items()
                }
                part = Part(group, group_index, indices, part_tensors, device, dtype, "torch")
                # stores the state it creates
                self._reference_step(part, clip_coefficient, inverse_scale)
        if skip is not None:
            for tensor, before in kept:
                tensor.copy_(torch.where(skip, before, tensor))
            held = {id(tensor) for tensor, _ in kept}
            for _, tensors in groups:
                for p in tensors["params"]:
                    for value in self.state[p].values():
                        if torch.is_tensor(value) and id(value) not in held:
                            # State the skipped step created (SGD's first momentum buffers):
                            # zero, not the non-finite direction.
                            value.copy_(torch.where(skip, torch.zeros_like(value), value))
        return loss

    def _traced_controls(
        self, grads: list[Tensor]
    ) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        """:meth:`_torch_path_controls` under ``torch.compile``: GradScaler's inverse scale, the
        clip coefficient, and whether to skip the step as a 0-dim bool tensor (GradScaler's
        ``found_inf``, or ``skip_nonfinite`` with a non-finite norm; None when neither can skip),
        decided in the graph instead of on the host. ``skipped_steps`` counts it on the device."""
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        skip = None if found_inf is None else found_inf != 0
        inverse_scale = None if grad_scale is None else (1.0 / grad_scale.double()).float()
        clip_coefficient = None
        if self.max_grad_norm is not None and grads:
            total_norm = _total_norm(grads)
            if self.skip_nonfinite:
                nonfinite = ~torch.isfinite(total_norm)
                counted = nonfinite if skip is None else nonfinite & ~skip.to(nonfinite.device)
                self._skipped_in_graph().add_(counted.to(torch.int64).cpu())
                skip = nonfinite if skip is None else skip.to(nonfinite.device) | nonfinite
            clip_coefficient = self._unscaled_clip_coefficient(total_norm, inverse_scale)
        return inverse_scale, clip_coefficient, skip

    def _skipped_in_graph(self) -> Tensor:
        """The count of steps ``skip_nonfinite`` skipped in compiled steps (a CPU tensor)."""
        counter = self.__dict__.get("_skipped_traced")
        if counter is None:
            counter = self._skipped_traced = torch.zeros((), dtype=torch.int64)
        return counter

    def _dispatch(self, groups: list[tuple[dict[str, Any], TensorLists]]) -> list[Part]:
        """The one dispatch point: split each param group's tensors by (device, dtype) and ask
        :func:`torchopt_lab.backend.resolve` which backend runs each part.

        Tensors the kernels cannot update through a flat pointer (complex, or with gaps in
        memory) leave a Triton part: under ``backend="auto"`` they run the torch path and the
        reason is recorded; an explicit ``backend="triton"`` raises instead.
        """
        component = f"optim.{type(self).__name__}"
        # Which parameters overlap in memory matters only to the kernels (one launch would update
        # that memory twice at once): found when a Triton part first needs it (an address sort
        # over every parameter costs microseconds each, a third of a small CPU step's host time).
        shared: set[int] | None = None
        parts = []
        for group_index, (group, tensors) in enumerate(groups):
            if not tensors["params"]:
                continue
            self._float_steps(tensors)
            names = list(tensors)
            count = len(tensors["params"])
            # Lists not kept for this group (max_exp_avg_sqs without amsgrad) stay empty.
            full = [name for name in names if len(tensors[name]) == count]
            split = torch.optim.Optimizer._group_tensors_by_device_and_dtype(
                [tensors[name] for name in full], with_indices=True
            )
            for (device, dtype), (lists, indices) in split.items():
                chosen = _backend.resolve(component, self.backend, device)
                if group.get("differentiable") and chosen == "triton":
                    # The kernels update in place outside autograd: a differentiable step is
                    # torch.optim's differentiable update (and says so).
                    if self.backend == "triton":
                        raise RuntimeError(
                            f"{component}: backend='triton' cannot run differentiable=True (the "
                            "kernels update outside autograd); use backend='auto' or 'torch'"
                        )
                    chosen = "torch"
                if chosen == "triton" and self._without_kernel():
                    if self.backend == "triton":
                        raise RuntimeError(
                            f"{component}: backend='triton' cannot run: the rule declares no kernel"
                        )
                    _backend.record(
                        component, self.backend, "torch", device, "the rule declares no kernel"
                    )
                    chosen = "torch"
                by_backend = {chosen: list(range(len(indices)))}
                if chosen == "triton":
                    if shared is None:
                        shared = _sharing_memory(
                            [p for _, tensors in groups for p in tensors["params"]]
                        )
                    by_backend = self._kernel_eligible(
                        component,
                        lists[full.index("params")],
                        lists[full.index("grads")],
                        device,
                        shared,
                    )
                for backend, positions in by_backend.items():
                    if not positions:
                        continue
                    part_tensors = {name: [] for name in names}
                    if len(split) == 1 and len(positions) == len(indices):
                        # The usual case, the whole group: the update gets the group's own
                        # lists (no copies; state it creates lands in them directly).
                        part_tensors = dict(tensors)
                        part_indices = indices
                    elif len(positions) == len(indices):
                        part_tensors.update(zip(full, lists, strict=True))
                        part_indices = indices
                    else:
                        for name, values in zip(full, lists, strict=True):
                            part_tensors[name] = [values[position] for position in positions]
                        part_indices = [indices[position] for position in positions]
                    parts.append(
                        Part(group, group_index, part_indices, part_tensors, device, dtype, backend)
                    )
        return parts

    def _kernel_eligible(
        self,
        component: str,
        params: list[Tensor],
        grads: list[Tensor],
        device: torch.device,
        shared: set[int],
    ) -> dict[str, list[int]]:
        """Positions of ``params`` the kernels can update, and of those they cannot.

        ``shared``: ids of parameters that share memory with another parameter (duplicates,
        aliasing views); one launch would update that memory from two programs at once.
        """
        kernels = importlib.import_module("triton_kernels.optim")
        if (
            not shared
            and params[0].dtype in kernels.SUPPORTED_DTYPES
            and all(p.is_contiguous() for p in params)
            and all(g.is_contiguous() and not g.is_sparse for g in grads)
            and all(
                g.shape == p.shape and g.dtype == p.dtype
                for p, g in zip(params, grads, strict=True)
            )
            and not any(map(Tensor.is_neg, params))
            and not any(map(Tensor.is_neg, grads))
        ):
            return {"triton": list(range(len(params)))}  # the usual case, checked in bulk
        eligible: dict[str, list[int]] = {"triton": [], "torch": []}
        for position, (param, grad) in enumerate(zip(params, grads, strict=True)):
            ok, why = kernels.updatable_in_place(param)
            if ok and grad.is_sparse:
                ok, why = False, "its gradient is sparse; the kernels update dense tensors"
            elif ok and not kernels.same_layout(grad, param):
                ok, why = (
                    False,
                    (
                        f"its gradient (shape {tuple(grad.shape)}, strides {grad.stride()}, "
                        f"{grad.dtype}) is laid out differently from the parameter (shape "
                        f"{tuple(param.shape)}, strides {param.stride()}, {param.dtype}); the "
                        "kernels read both at the same offsets"
                    ),
                )
            elif ok and (param.is_neg() or grad.is_neg()):
                ok, why = False, _NEGATIVE_BIT
            elif ok and id(param) in shared:
                ok, why = (
                    False,
                    (
                        f"a parameter of shape {tuple(param.shape)} shares memory with another "
                        "parameter of this optimizer (a duplicate or an aliasing view); one launch "
                        "would update that memory twice at once"
                    ),
                )
            if ok:
                eligible["triton"].append(position)
                continue
            if self.backend == "triton":
                raise RuntimeError(
                    f"{component}: backend='triton' cannot update a parameter: {why}"
                )
            _backend.record(
                f"{component} (tensors the kernels cannot update)",
                self.backend,
                "torch",
                device,
                why,
            )
            eligible["torch"].append(position)
        return eligible

    def _float_steps(self, tensors: TensorLists) -> None:
        """Make every ``state["step"]`` of a group's lists a float tensor (an int64 step set by
        hand; loaded ones are converted by ``__setstate__``), stored back into the state."""
        steps = tensors.get("state_steps", [])
        if all(map(Tensor.is_floating_point, steps)):
            return
        for index, param in enumerate(tensors["params"]):
            state = self.state[param]
            state["step"] = _as_float_step(state["step"])
            steps[index] = state["step"]

    def _reference_step(
        self, part: Part, clip_coefficient: Tensor | None, inverse_scale: Tensor | None = None
    ) -> None:
        """Run the torch reference update on one part (complex tensors as real views), one run of
        distinct parameters at a time, storing the state it creates after each run; its
        gradients are first multiplied by GradScaler's ``inverse_scale`` when given."""
        if part.group.get("fused"):
            # torch.optim's own check and message for fused=True (floating-point parameters on
            # a device with fused kernels): complex or meta ones are refused, not run on views.
            # It reads only the device and dtype, which a part's parameters share: one call.
            _device_dtype_check_for_fused(part.tensors["params"][0])
        hyperparameters = self._hyperparameters(part.group)
        if inverse_scale is not None:
            factor = inverse_scale.to(part.device)
            scaled = [grad * factor for grad in part.tensors["grads"]]
            part = dataclasses.replace(part, tensors={**part.tensors, "grads": scaled})
        before = None
        if self.record_norms:
            before = [p.detach().clone() for p in part.tensors["params"]]
        float32 = self.float32_state and part.dtype in _LOW_PRECISION
        if float32:
            self._upcast_state(part.tensors)
        for tensors in _without_repeats(part.tensors):
            unfilled = self._created_lists(part.group, tensors)
            if float32:
                self._float32_update(part.group, tensors, hyperparameters, clip_coefficient)
            elif self._views_complex_as_real and part.dtype.is_complex:
                viewed = {name: [_real_view(t) for t in values] for name, values in tensors.items()}
                self._torch_update(part.group, viewed, hyperparameters, clip_coefficient)
            else:
                self._torch_update(part.group, tensors, hyperparameters, clip_coefficient)
            self._finish_group(part.group, tensors, unfilled)
        if before is not None:
            self._record_norms(part, before, clip_coefficient)

    def _record_norms(
        self, part: Part, before: list[Tensor], clip_coefficient: Tensor | None
    ) -> None:
        """``record_norms`` on the torch path: what the kernels record, per parameter: squared
        norms of the gradient used (unscaled, clipped), of the update and of the parameter
        before it, float32 on the parameter's device (see :meth:`norm_diagnostics`)."""
        state = self.__dict__.get("_fused_state")
        if state is None:
            state = self.__dict__["_fused_state"] = FusedState()
        with torch.no_grad():
            for p, grad, old in zip(
                part.tensors["params"], part.tensors["grads"], before, strict=True
            ):
                used = grad.to_dense() if grad.is_sparse else grad.detach()
                if clip_coefficient is not None:
                    used = used * clip_coefficient.to(used.device, used.dtype)
                values = [used, p.detach() - old, old]
                norms = torch.stack([_real_view(v).double().square().sum() for v in values])
                state.norms[id(p)] = (norms.float().reshape(1, 3), 0)

    def _state_lists(self, tensors: TensorLists) -> list[str]:
        """The names of the per-parameter state lists kept for this group (not the steps)."""
        count = len(tensors["params"])
        return [
            name
            for name, values in tensors.items()
            if name not in ("params", "grads", "state_steps") and len(values) == count
        ]

    def _upcast_state(self, tensors: TensorLists) -> None:
        """``float32_state``: replace low-precision state tensors of the lists, and in
        ``self.state``, by float32 copies (state created or loaded in the parameter's dtype)."""
        upcast: dict[int, Tensor] = {}  # a parameter listed twice shares its state tensors
        for name in self._state_lists(tensors):
            values = tensors[name]
            for index, (param, value) in enumerate(zip(tensors["params"], values, strict=True)):
                if value is None or value.dtype == torch.float32:
                    continue
                if id(value) not in upcast:
                    upcast[id(value)] = value.float()
                    state = self.state[param]
                    for key, held in state.items():
                        if held is value:
                            state[key] = upcast[id(value)]
                values[index] = upcast[id(value)]

    def _float32_update(
        self,
        group: dict[str, Any],
        tensors: TensorLists,
        hyperparameters: dict[str, Any],
        clip_coefficient: Tensor | None,
    ) -> None:
        """``float32_state`` on the torch path: the update torch computes in float32 on float32
        copies of the parameters and gradients with the float32 state, each parameter then
        rounded back to its dtype (what the fused kernels do in registers)."""
        params = tensors["params"]
        work = dict(tensors)
        work["params"] = [param.float() for param in params]
        work["grads"] = [grad.float() for grad in tensors["grads"]]
        for name in self._state_lists(tensors):
            work[name] = list(tensors[name])  # state the update creates lands here
        self._torch_update(group, work, hyperparameters, clip_coefficient)
        torch._foreach_copy_(params, work["params"])
        for name in self._state_lists(tensors):
            tensors[name][:] = work[name]

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
        if clip_coefficient is not None:
            scaled = torch._foreach_mul(tensors["grads"], clip_coefficient.to(device))
            tensors = {**tensors, "grads": scaled}
        flags = {key: True for key in _TORCH_FLAGS if group.get(key)}
        if self._fused_extension() and not flags and device.type == "cpu":
            # fused=True where torch's optimizer has none (an attribute): compiled on the CPU as
            # below; on other devices the Triton kernels run it, and _check_torch_path refuses it.
            flags = {"fused": True}
        if (
            flags == {"fused": True}
            and device.type == "cpu"
            and not torch.compiler.is_compiling()
            and _cpu_fused.compiles_builtin(self)
        ):
            # fused=True on CPU tensors: the rule's update compiled by Inductor (_cpu_fused.py);
            # what it leaves (a first step that creates state, ...) takes the torch update.
            self._compiled_cpu_update(group, tensors, hyperparameters)
            return
        if flags and not torch.compiler.is_compiling():
            # fused, capturable or differentiable on the torch path: torch.optim's own update
            # with the same flag (its fused CPU/CUDA kernels; its differentiable single-tensor
            # update, which keeps tensor hyperparameters in the graph), on our lists and state.
            self._torch_optim_update(device, tensors, hyperparameters, flags)
            return
        self._check_torch_path(group, device)
        type(self)._reference(*tensors.values(), **hyperparameters)

    def _compiled_cpu_update(
        self, group: dict[str, Any], tensors: TensorLists, hyperparameters: dict[str, Any]
    ) -> None:
        """``fused=True`` on CPU tensors by the compiled rule update (:func:`_cpu_fused.\
builtin_step`); the parameters it leaves take torch.optim's fused kernel where torch has one,
        else the reference, and state they create is written back into the part's lists."""
        left, rest = _cpu_fused.builtin_step(self, group, tensors)
        if not left:
            return
        device = rest["params"][0].device
        if type(self)._reference.__name__ in _cpu_fused._TORCH_FUSED_CPU:
            self._torch_optim_update(device, rest, hyperparameters, {"fused": True})
        else:
            type(self)._reference(*rest.values(), **hyperparameters)
        count = len(tensors["params"])
        for key, values in tensors.items():
            if len(values) == count and key not in ("params", "grads"):
                for index, value in zip(left, rest[key], strict=True):
                    values[index] = value

    def _torch_optim_update(
        self,
        device: torch.device,
        tensors: TensorLists,
        hyperparameters: dict[str, Any],
        flags: dict[str, bool],
    ) -> None:
        """One part's update by torch.optim's functional update with ``flags`` set; torch raises
        its own error where it cannot honour one (capturable on the CPU, for example)."""
        name = type(self)._reference.__name__
        function = getattr(importlib.import_module(f"torch.optim.{name}"), name)
        accepted = inspect.signature(function).parameters
        # The state lists go by name (torch's names for them), so a reference may take them in
        # its state's declaration order (torch's state_dict order): RMSprop's functional update
        # takes grad_avgs before momentum_buffer_list, its state_dict the other way round. The
        # parameters and gradients go by position (SGD's gradients are torch's d_p_list).
        params, grads, *_ = tensors.values()
        lists = dict(list(tensors.items())[2:])
        keywords = {**hyperparameters, **flags, "foreach": False}
        decoupled = keywords.pop("decoupled_weight_decay", False)
        if decoupled and "decoupled_weight_decay" in accepted:
            keywords["decoupled_weight_decay"] = True
        elif decoupled:  # torch < 2.6: AdamW is its own function
            function = importlib.import_module("torch.optim.adamw").adamw
            accepted = inspect.signature(function).parameters
        if "differentiable" not in accepted:
            keywords.pop("differentiable", None)  # SGD's update is differentiable by grad mode
        if "has_complex" in accepted:
            keywords["has_complex"] = any(p.is_complex() for p in tensors["params"])
        unknown = (set(keywords) | set(lists)) - set(accepted)
        if unknown:
            raise RuntimeError(
                f"{type(self).__name__}: {', '.join(sorted(flags))}=True needs torch.optim's "
                f"{name}() to accept {sorted(unknown)}; this torch {torch.__version__} does not"
            )
        _backend.record(
            f"optim.{type(self).__name__} ({', '.join(sorted(flags))})",
            self.backend,
            "torch",
            device,
            f"{', '.join(sorted(flags))}=True on the torch path runs torch.optim's own update",
        )
        function(params, grads, **lists, **keywords)

    def _check_torch_path(self, group: dict[str, Any], device: torch.device) -> None:
        """Refuse what the torch reference path cannot honour, instead of ignoring it."""
        name = type(self).__name__
        if torch.compiler.is_compiling():
            # A compiled step: Inductor fuses the traced update, and Dynamo itself sets
            # capturable=True on the groups of the optimizers it traces.
            return
        if group.get("fused") or self._fused_extension():
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
