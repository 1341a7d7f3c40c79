"""Optimizers from one declaration: the public authoring API for element-wise update rules.

A :class:`Rule` states everything an element-wise optimizer is:

- its **hyperparameters** (:class:`Hyperparameter`: name, default, positional or keyword-only, in
  the order of the constructor's signature), torch's flags among them (``foreach``, ``maximize``,
  ``capturable``, ``differentiable``);
- its **checks** (:class:`Check`: the constructor's validation, in torch's order, with torch's
  exception type and message; the message names the bad value);
- its **state** (:class:`State`: the ``state_dict`` keys beside ``step``, each either a tensor
  shaped and typed like its parameter or a scalar kept like ``step``, with its initial value);
- its **per-step scalars**, ``scalars(group, step, state) -> dict``: computed on the host in
  float64 from the param group's hyperparameters and the step count (bias corrections), once per
  step value; it may update the rule's scalar state (NAdam's ``mu_product``) in place. Under
  ``torch.compile`` tensor hyperparameters reach it as 0-dim float64 tensors instead, and the
  step counts and scalar state of a param group's (device, dtype) part as 1-D tensors, one entry
  per parameter (:func:`scalar_value`), kept in the graph so that a compiled step is one graph
  reused on every step, and evaluated once for the part rather than once per parameter (the
  graph, and the compile time, would grow by the whole computation with each parameter): write
  it with element-wise operations valid on both Python numbers and tensors (``+ - * / **``; not
  ``math`` functions, ``float()`` or ``min``), select with ``torch.where`` rather than an ``if``
  on a value (RAdam's rectifier), and update scalar state in place in its own dtype (NAdam);
- its **element-wise update**, ``update(param, grad, *state, **scalars) -> (param, *state)``,
  written once, out of place, over tensors of one parameter (complex ones as real views);
- optionally the same update for the fused Triton kernel, ``triton_update(param, grad, states,
  scalars) -> (param, states)`` (a ``@triton_jit`` function over blocks, ``scalars`` the values of
  ``scalars()`` in its dict's order): Triton cannot run the torch update, so the two stand side by
  side in the declaration and a test binds them (:func:`torchopt_lab.testing.check_optimizer` with
  ``backend="triton"`` against ``backend="torch"``).

Subclassing :class:`RuleOptimizer` with a ``rule`` turns a declaration into a
``torch.optim.Optimizer``: the constructor and its signature, param groups, lazily created state
with torch's keys (so ``state_dict`` interchanges with torch.optim's), ``__setstate__`` defaults
for older state dicts, ``step(closure)`` with ``maximize``, complex parameters, tensor ``lr`` and
``differentiable=True`` (gradients flow through the step to tensor hyperparameters and to the
parameters before it), and the engine's options every built-in optimizer takes (``max_grad_norm``,
``skip_nonfinite``, ``float32_state``, ``record_norms``; GradScaler works as with torch.optim).
:func:`register` adds the class to :data:`REGISTRY`, which the tests,
``torchopt-lab compare`` and the benchmarks iterate.

What torch's own optimizers need is declared too: state kept only where an option holds
(``State.when``), state the update creates on the first step (``State.init=None``), no ``step``
(``Rule.step_state``), state made in the constructor (``Rule.eager_state``), checks of several
arguments (a tuple ``Check.name``), values converted once checked (``Hyperparameter.convert``),
group keys the constructor does not take (``Rule.fixed``), torch's group key order
(``Rule.group_order``) and its ``__setstate__`` keys (``Rule.setstate_defaults``). A built-in
(SGD, Momentum, Adagrad, RMSprop, Adam, AdamW) is a rule with a ``reference`` (its group-level
multi-tensor update) and a ``kernel`` (:class:`KernelSpec`), subclassed from the built-in engine
(``TorchoptOptimizer``) rather than :class:`RuleOptimizer`; both engines derive the class with
the same code (``DeclaredOptimizer``). See ``docs/authoring.md``.

What a rule cannot express: an update that is not element-wise (reads more than one element of a
tensor to update one: Muon's orthogonalisation, Adafactor's factored second moments, Shampoo's
preconditioners, LAMB/LARS trust ratios), or one that needs a reduction across tensors. See
``docs/authoring.md``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor
from torch.optim.optimizer import _get_capturable_supported_devices as _capturable_supported_devices

from torchopt_lab import backend as _backend
from torchopt_lab.optim import _cpu_fused
from torchopt_lab.optim._base import (
    _NEGATIVE_BIT,
    DeclaredOptimizer,
    TorchoptOptimizer,
    set_engine_options,
    split_stacked,
)
from torchopt_lab.optim._fused import KernelSpec
from torchopt_lab.optim._lifted import NotLiftable, TensorList, copy_into
from torchopt_lab.optim._scalars import as_number, increment, scalar_value, scalars_key
from torchopt_lab.optim.clip import _clip_coefficient, _total_norm

try:  # Triton is optional (Linux only): without it, rules run their torch update.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where Triton is absent
    triton = tl = None

__all__ = [
    "REGISTRY",
    "TORCH_FLAGS",
    "Check",
    "Hyperparameter",
    "KernelSpec",
    "Rule",
    "RuleOptimizer",
    "State",
    "adam_checks",
    "lr_checks",
    "register",
    "scalar_value",
    "tl",
    "triton_jit",
    "triton_lerp",
]


@dataclass(frozen=True)
class Hyperparameter:
    """One constructor argument, stored in every param group under ``name``.

    ``keyword_only`` places it after the ``*`` of the signature (torch's flags usually are).
    ``convert``, if given, maps the value given to the one stored in the param group, after every
    check has passed (Adam squeezes tensor ``betas`` to 0-dim tensors, as torch does).
    """

    name: str
    default: Any
    keyword_only: bool = False
    convert: Callable[[Any], Any] | None = None


@dataclass(frozen=True)
class Check:
    """One validation of the constructor: ``valid(value)`` must hold, else ``error`` is raised
    with ``message.format(value=value)`` (so ``"Invalid beta parameter at index 0: {value[0]}"``
    quotes the bad entry).

    ``name`` is a hyperparameter's name, or a tuple of names when the check reads several: then
    ``valid`` and the message's ``{value}`` get the tuple of their values, in that order (Adam's
    ``("lr", "foreach", "capturable")``: "lr as a Tensor is not supported for capturable=False
    and foreach=True"). Checks run in declaration order (torch's), before any ``convert``; a
    name may also be a key of :attr:`Rule.fixed`."""

    name: str | tuple[str, ...]
    valid: Callable[[Any], Any]
    message: str
    error: type[Exception] = ValueError

    @property
    def names(self) -> tuple[str, ...]:
        """The names the check reads (one, or the tuple's)."""
        return self.name if isinstance(self.name, tuple) else (self.name,)

    def value(self, values: Mapping[str, Any]) -> Any:
        """The value the check reads from the constructor's ``values``: one, or a tuple."""
        if isinstance(self.name, tuple):
            return tuple(values[name] for name in self.name)
        return values[self.name]

    def __call__(self, value: Any) -> None:
        if not self.valid(value):
            raise self.error(self.message.format(value=value))


@dataclass(frozen=True)
class State:
    """One entry of each parameter's state beside ``step``.

    ``scalar=False``: a tensor like the parameter (its shape, dtype, device and memory format),
    filled with ``init``; it is an argument and a result of the update, in declaration order.
    ``scalar=True``: a 0-dim tensor kept like ``step`` (float32, or float64 under a float64
    default dtype; on the CPU unless ``capturable``), read and updated by ``scalars``.

    ``init`` is a number, or a function of the param group returning one (Adagrad's
    ``initial_accumulator_value``), or None: the state is created by the update on the first
    step (torch's SGD sets its momentum buffer to a copy of the first gradient): the update then
    receives None in its place and returns the new tensor. A complex parameter's state, updated
    as a real view (``Rule.complex_as_real``), starts at ``init`` in both components.

    ``when(group)``, if given, says in which param groups the state exists (Adam's
    ``max_exp_avg_sq`` only with ``amsgrad``): elsewhere it is never created, the update
    receives None in its place and returns None there.
    """

    name: str
    init: float | Callable[[Mapping[str, Any]], float] | None = 0.0
    scalar: bool = False
    when: Callable[[Mapping[str, Any]], bool] | None = None

    def exists(self, group: Mapping[str, Any]) -> bool:
        """Whether this state is kept in ``group``'s parameters (see ``when``)."""
        return self.when is None or bool(self.when(group))

    def initial(self, group: Mapping[str, Any]) -> float | None:
        """The initial value in ``group``: ``init``, or ``init(group)``, or None."""
        return self.init(group) if callable(self.init) else self.init


@dataclass(frozen=True)
class Rule:
    """The declaration of an element-wise optimizer (see the module docstring)."""

    hyperparameters: tuple[Hyperparameter, ...]
    checks: tuple[Check, ...]
    state: tuple[State, ...]
    scalars: Callable[[Mapping[str, Any], float, dict[str, Tensor]], dict[str, Any]]
    update: Callable[..., tuple[Tensor, ...]]
    # The update as a @triton_jit function for the fused kernel, or None (torch path only).
    triton_update: Any = None
    # Whether complex parameters are updated as real views (torch.view_as_real), as torch.optim
    # does for rules that are not linear in the gradient.
    complex_as_real: bool = True
    # The param-group keys ``__setstate__`` fills in (with these values) when an older state
    # dict lacks them; None: every hyperparameter, with its default. A built-in lists torch's.
    setstate_defaults: Mapping[str, Any] | None = None
    # Whether each parameter's state has ``step`` (torch's SGD keeps none): without it,
    # ``scalars`` receives None as the step.
    step_state: bool = True
    # Whether the state is created in the constructor for every parameter (torch's Adagrad),
    # rather than on each parameter's first step; its initial values are then the constructor's
    # (``init`` receives the optimizer's defaults, not a param group's overrides, as torch's).
    eager_state: bool = False
    # Param-group keys with a value the constructor does not take (not in its signature), set
    # in every group and forced by ``__setstate__`` (AdamW's decoupled_weight_decay=True).
    fixed: Mapping[str, Any] = field(default_factory=dict)
    # The order of the param-group keys (every hyperparameter and fixed key) where it is not the
    # signature's: torch's repr and state_dict show the keys in the order its constructor
    # stores them (Adam stores maximize before foreach, its signature the other way round).
    group_order: tuple[str, ...] = ()
    # The RuntimeError a sparse gradient raises ({name}: the class name); None: the update
    # takes sparse gradients (only a rule with a ``reference`` that does: SGD, Adagrad).
    sparse_message: str | None = "{name} does not support sparse gradients"
    # A built-in's group-level multi-tensor update in torch.optim's functional shape (positional
    # lists: params, grads, one per tensor State in declaration order, then state_steps if
    # step_state; keywords read from the param group), run on the built-in engine
    # (TorchoptOptimizer: fused Triton kernels, capturable, GradScaler, torch's flags). None: a
    # rule run by RuleOptimizer.
    reference: Callable[..., None] | None = None
    # How the built-in engine's fused Triton kernel takes this rule's lists and param groups
    # (:class:`KernelSpec`), or None (no kernel). Only with a ``reference``.
    kernel: KernelSpec | None = None

    # Derived from ``state`` when the rule is made (a step reads them for every parameter). Plain
    # attributes, not functools.cached_property: on Python < 3.12 its first read takes a lock,
    # which Dynamo cannot trace, so a compiled step that read it first failed.
    tensor_state: tuple[str, ...] = field(init=False, repr=False, compare=False)
    scalar_state: tuple[str, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # The names of the state tensors the update takes and returns, in its argument order;
        # and of the scalar state ``scalars`` reads and updates.
        object.__setattr__(
            self, "tensor_state", tuple(entry.name for entry in self.state if not entry.scalar)
        )
        object.__setattr__(
            self, "scalar_state", tuple(entry.name for entry in self.state if entry.scalar)
        )


def triton_jit(fn: Callable[..., Any]) -> Any:
    """``triton.jit`` where Triton is installed, else None (the rule then runs its torch update
    everywhere): decorate a rule's ``triton_update`` with it to keep the rule importable
    without Triton. Inside the function, use :data:`tl` (``triton.language``)."""
    return triton.jit(fn) if triton is not None else None


def _lerp(start, end, weight):  # no annotations: Triton would read them as types
    """``torch.lerp(start, end, weight)`` inside a ``triton_update``, with torch's two formulas
    (``start + w (end - start)`` below 0.5, ``end - (end - start)(1 - w)`` from 0.5), so that
    results match it bit for bit, infinities and NaNs included."""
    if weight < 0.5:
        result = start + weight * (end - start)
    else:
        result = end - (end - start) * (1.0 - weight)
    return result


#: :func:`torch.lerp` for a rule's ``triton_update`` (a ``@triton.jit`` function; None without
#: Triton). The torch update uses ``torch.lerp`` itself.
triton_lerp = triton_jit(_lerp)


#: torch's flags, as most torch.optim optimizers declare them (keyword-only).
TORCH_FLAGS: tuple[Hyperparameter, ...] = (
    Hyperparameter("foreach", None, keyword_only=True),
    Hyperparameter("maximize", False, keyword_only=True),
    Hyperparameter("capturable", False, keyword_only=True),
    Hyperparameter("differentiable", False, keyword_only=True),
)


def lr_checks() -> tuple[Check, ...]:
    """torch.optim's checks of ``lr``: a 1-element tensor or a number, not negative."""
    return (
        Check(
            "lr",
            lambda lr: not isinstance(lr, Tensor) or lr.numel() == 1,
            "Tensor lr must be 1-element",
        ),
        Check("lr", lambda lr: lr >= 0.0, "Invalid learning rate: {value}"),
    )


def adam_checks() -> tuple[Check, ...]:
    """torch.optim's checks of Adam's family (Adam, NAdam, RAdam, Adamax), in torch's order:
    ``lr``, ``eps``, each beta in [0, 1), ``weight_decay``."""
    return (
        *lr_checks(),
        Check("eps", lambda eps: eps >= 0.0, "Invalid epsilon value: {value}"),
        Check(
            "betas",
            lambda b: 0.0 <= b[0] < 1.0,
            "Invalid beta parameter at index 0: {value[0]}",
        ),
        Check(
            "betas",
            lambda b: 0.0 <= b[1] < 1.0,
            "Invalid beta parameter at index 1: {value[1]}",
        ),
        Check("weight_decay", lambda wd: wd >= 0.0, "Invalid weight_decay value: {value}"),
    )


#: Every registered optimizer by class name: what tests, benchmarks and ``compare`` iterate.
#: Rule optimizers (:class:`RuleOptimizer`) and built-ins (``rule.reference`` set, run on the
#: built-in engine) alike.
REGISTRY: dict[str, type[DeclaredOptimizer]] = {}


def register(cls: type[DeclaredOptimizer]) -> type[DeclaredOptimizer]:
    """Class decorator: add an optimizer class derived from a ``rule`` (a
    :class:`RuleOptimizer` subclass, or a built-in) to :data:`REGISTRY`."""
    if not (
        isinstance(cls, type)
        and issubclass(cls, DeclaredOptimizer)
        and isinstance(getattr(cls, "rule", None), Rule)
    ):
        raise TypeError(f"register() takes a RuleOptimizer subclass with a rule, got {cls!r}")
    REGISTRY[cls.__name__] = cls
    return cls


def _scalar_dtype() -> torch.dtype:
    """The dtype torch.optim gives ``state["step"]``: float64 under a float64 default dtype."""
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


#: On the CPU, the parameter bytes one lifted update takes at most: every op of the update makes
#: a new tensor for each member, and while the members' intermediates stay in cache (as the
#: per-parameter update's do) a list is as fast as a loop or faster; a whole model's list is 2-5x
#: slower than the loop (measured on bench-optim's sets, 2 threads).
_CPU_CHUNK_BYTES = 1 << 18


def _chunks(
    members: list[tuple[Tensor, dict, dict]],
) -> list[list[tuple[Tensor, dict, dict]]]:
    """``members`` cut into lists of at most :data:`_CPU_CHUNK_BYTES` parameter bytes on the CPU,
    a larger parameter alone (the small ones packed together however the large ones interleave
    with them: a model's biases and norms sit between its matrices); whole elsewhere, where a
    foreach op is one kernel per list."""
    if members[0][0].device.type != "cpu":
        return [members]
    chunks: list[list[tuple[Tensor, dict, dict]]] = [[]]
    alone = []
    size = 0
    for member in members:
        nbytes = member[0].numel() * member[0].element_size()
        if nbytes >= _CPU_CHUNK_BYTES:
            alone.append([member])
            continue
        if size + nbytes > _CPU_CHUNK_BYTES:
            chunks.append([])
            size = 0
        chunks[-1].append(member)
        size += nbytes
    return [chunk for chunk in chunks if chunk] + alone


def _created_state(value: Tensor, real: bool) -> Tensor:
    """A state the update created (``State.init=None``), detached as torch's first buffers are,
    complex again if the update saw it as a real view."""
    value = value.detach().clone(memory_format=torch.preserve_format)
    return torch.view_as_complex(value) if real else value


def _real(tensor: Tensor) -> Tensor:
    return torch.view_as_real(tensor) if tensor.is_complex() else tensor


class RuleOptimizer(DeclaredOptimizer):
    """A ``torch.optim.Optimizer`` derived from the class attribute ``rule`` (a :class:`Rule`).

    Subclasses set ``rule`` and a docstring; the constructor, its signature, ``step`` and
    ``__setstate__`` come from here. The constructor takes torch's arguments plus, keyword-only,
    ``backend`` (``"auto"``, ``"torch"`` or ``"triton"``) and the options of every torchopt_lab
    optimizer: ``max_grad_norm`` (clip the global gradient norm as ``clip_grad_norm_`` before the
    update, the gradients left as they were), ``skip_nonfinite`` (skip a step whose norm is not
    finite; counted in ``skipped_steps``), ``float32_state`` (float16/bfloat16 parameters keep
    float32 state and are updated in float32) and ``record_norms`` (``norm_diagnostics()``); all
    attributes, not param-group keys. Each (device, dtype) part of a param group runs either the
    optimizer kernel skeleton with the rule's update inlined (one launch, clipping and diagnostics
    fused; :mod:`triton_kernels.optim.rule_kernels`) or ``rule.update`` (the torch reference
    path), as :func:`torchopt_lab.backend.resolve` decides. The torch path calls ``rule.update``
    once over lists of parameters, its ops as foreach ops (:mod:`torchopt_lab.optim._lifted`,
    the same results bit for bit), or per parameter with ``foreach=False`` (torch's for-loop),
    ``differentiable=True``, ``record_norms`` and under ``torch.compile``. ``fused=True``
    (keyword-only, before ``backend``; torch's Adam has it, torch's rule-like optimizers do not)
    runs the rule's update compiled by Inductor on CPU tensors
    (:mod:`torchopt_lab.optim._cpu_fused`; with clipping, float32 state or norm records the torch
    update runs instead, recorded) and the fused rule kernel on CUDA; with ``differentiable`` or
    ``foreach`` it raises as torch does.

    Steps are counted on the host, where the rule's per-step scalars are computed from them, so
    a step is skipped on the host before any count moves: ``skip_nonfinite`` reads the norm (one
    synchronisation per step), and GradScaler unscales and checks for infs itself (a rule does
    not set ``_step_supports_amp_scaling``).
    """

    rule: ClassVar[Rule]
    _adds_fused: ClassVar[bool] = True

    def _build(self, params: Any, defaults: dict[str, Any], engine: dict[str, Any]) -> None:
        self.fused = engine.pop("fused", defaults.get("fused"))
        set_engine_options(self, **engine)
        torch.optim.Optimizer.__init__(self, params, defaults)
        _cpu_fused.check_flags(self.fused, defaults)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            for p in group["params"]:
                p_state = self.state.get(p, {})
                for key in ("step", *self.rule.scalar_state):
                    # Older torch stored these as Python numbers; tensors since torch 1.12.
                    if key in p_state and not torch.is_tensor(p_state[key]):
                        device = p.device if group.get("capturable") else None
                        p_state[key] = torch.tensor(
                            float(p_state[key]), dtype=_scalar_dtype(), device=device
                        )

    def _init_state(self, p: Tensor, group: Mapping[str, Any]) -> dict[str, Any]:
        state = self.state[p]
        if len(state) == 0:
            # Host the step (and scalar state) on the CPU unless capturable, as torch.optim does.
            self._create_state(state, p, group, dtype=torch.float32 if self._float32(p) else None)
        elif self._float32(p):
            # State created or loaded in the parameter's low precision: float32 from now on.
            for name in self.rule.tensor_state:
                value = state.get(name)
                if value is not None and value.dtype != torch.float32:
                    state[name] = value.float()
        return state

    def _float32(self, p: Tensor) -> bool:
        """Whether ``float32_state`` keeps this parameter's state (and update) in float32."""
        return self.float32_state and p.dtype in (torch.float16, torch.bfloat16)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch.optim's ``load_state_dict``; with ``float32_state``, the state of low-precision
        parameters stays float32 (as for the built-in optimizers)."""
        super().load_state_dict(state_dict)
        _cpu_fused.forget_plans(self)  # they hold the replaced state's tensors
        if self.float32_state:
            TorchoptOptimizer._load_float32_state(self, state_dict)  # type: ignore[arg-type]

    # The engine's diagnostics and counters, shared with the built-in optimizers.
    norm_diagnostics = TorchoptOptimizer.norm_diagnostics
    skipped_steps = TorchoptOptimizer.skipped_steps

    def _check_capturable(self, p: Tensor, state: Mapping[str, Any]) -> None:
        supported = _capturable_supported_devices()
        devices = {
            p.device.type,
            *(state["step"].device.type for _ in ("step",) if "step" in state),
        }
        if len(devices) != 1 or p.device.type not in supported:
            # What torch.optim raises for capturable=True on an unsupported device.
            raise AssertionError(
                "If capturable=True, params and state_steps must be on supported devices: "
                f"{supported}."
            )
        raise RuntimeError(
            f"{type(self).__name__}: capturable=True is not supported: a rule's per-step scalars "
            "are computed on the host from the step count, which CUDA graph capture cannot "
            "replay; pass capturable=False"
        )

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One optimization step; ``closure`` re-evaluates the model and returns the loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if torch.compiler.is_compiling():
            self._init_groups()  # the state, created outside the graph (see _init_group)
        clip = self._clip()
        if clip is False:
            return loss  # skip_nonfinite: nothing changes, no step is counted
        if self.record_norms:
            self._norm_state().norms.clear()
        skip = self._traced_skip(clip)
        # As torch.optim: autograd records the update only when the optimizer is differentiable.
        with torch.set_grad_enabled(bool(self.defaults.get("differentiable", False))):
            for index, group in enumerate(self.param_groups):
                self._step_group(group, clip, index)
            if skip is not None:
                self._undo_where(*skip)
        return loss

    def _traced_skip(
        self, clip: tuple[Tensor, Tensor] | None
    ) -> tuple[Tensor, list[tuple[Tensor, Tensor]], list[tuple[Tensor, dict, bool, list]]] | None:
        """``skip_nonfinite`` under ``torch.compile``: whether to skip, as a 0-dim bool tensor
        (a host read would break the graph), counted in ``skipped_steps``, with the values the
        step will update (parameters and existing state) and, for the parameters whose state
        the step will create (all of it, or a ``State.init=None`` entry), whether their ``step``
        is new and the State entries that are; None when nothing can skip."""
        if not (self.skip_nonfinite and clip and torch.compiler.is_compiling()):
            return None
        skip = ~torch.isfinite(clip[0])
        self._skipped_traced.add_(skip.to(torch.int64).cpu())
        kept, fresh = [], []
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state.get(p) or {}
                new = [e for e in self.rule.state if e.exists(group) and e.name not in state]
                if new or "step" not in state:
                    fresh.append((p, group, "step" not in state, new))
                values = [p, *(v for v in state.values() if torch.is_tensor(v))]
                kept.extend((t, t.detach().clone()) for t in values)
        return skip, kept, fresh

    def _undo_where(
        self,
        skip: Tensor,
        kept: list[tuple[Tensor, Tensor]],
        fresh: list[tuple[Tensor, dict, bool, list]],
    ) -> None:
        """Where ``skip`` is set, put back what the step changed: the kept values, and the state
        the step created at its initial values (as if the next step were the first; zeros for
        state the update creates, as the built-in engine leaves SGD's first buffers)."""
        for tensor, before in kept:
            tensor.copy_(torch.where(skip, before, tensor))
        for p, group, new_step, entries in fresh:
            state = self.state[p]
            if new_step and "step" in state:
                state["step"].copy_(torch.where(skip, 0.0, state["step"]))
            for entry in entries:
                value = state.get(entry.name)
                if value is not None:
                    init = entry.initial(group)
                    value.copy_(torch.where(skip, 0.0 if init is None else init, value))

    def _clip(self) -> tuple[Tensor, Tensor] | bool | None:
        """``max_grad_norm``: the global gradient norm (torch's, as ``clip_grad_norm_``) and the
        clip coefficient; None without clipping; False when ``skip_nonfinite`` skips the step.

        The skip is decided here, on the host (one synchronisation), before any step count
        moves: a rule's per-step scalars are computed on the host from the step count, so a step
        skipped later, inside the kernel, would leave the counts ahead of the parameters.
        GradScaler likewise unscales and skips on the host for rules
        (``_step_supports_amp_scaling`` is not set)."""
        if self.max_grad_norm is None:
            return None
        grads = [
            p.grad for group in self.param_groups for p in group["params"] if p.grad is not None
        ]
        if not grads:
            return None
        if any(grad.is_sparse for grad in grads):
            raise NotImplementedError(
                f"{type(self).__name__}: max_grad_norm cannot clip sparse gradients (torch has "
                "no norm for them); clip the dense gradients yourself or drop max_grad_norm"
            )
        with torch.no_grad():
            total_norm = _total_norm([grad.detach() for grad in grads])
        if (
            self.skip_nonfinite
            and not torch.compiler.is_compiling()  # decided in the graph: _traced_skip
            and not torch.isfinite(total_norm).item()
        ):
            self._skipped_on_host += 1
            return False
        return total_norm, _clip_coefficient(total_norm, self.max_grad_norm)

    def _norm_state(self) -> Any:
        """Where ``record_norms`` keeps each parameter's norms (read by ``norm_diagnostics``)."""
        state = self.__dict__.get("_fused_state")
        if state is None:
            fused = importlib.import_module("torchopt_lab.optim._fused")
            state = self.__dict__["_fused_state"] = fused.FusedState()
        return state

    def _step_group(
        self, group: dict[str, Any], clip: tuple[Tensor, Tensor] | None = None, index: int = 0
    ) -> None:
        rule = self.rule
        differentiable = bool(group.get("differentiable", False))
        maximize = bool(group.get("maximize", False))
        # Hyperparameters as the scalars function reads them: Python numbers, except under
        # differentiable=True, where tensors stay tensors so that gradients reach them.
        hyperparameters = {
            key: value if differentiable else as_number(value)
            for key, value in group.items()
            if key != "params"
        }
        by_step: dict[float, dict[str, Any]] = {}
        # (device, dtype) -> [(param, its state, its scalars)], in the group's order.
        parts: dict[tuple[torch.device, torch.dtype], list[tuple[Tensor, dict, dict]]] = {}
        counted: list[tuple[Tensor, dict]] = []
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                message = rule.sparse_message or Rule.sparse_message
                raise RuntimeError(message.format(name=type(self).__name__))
            state = self._init_state(p, group)
            if group.get("capturable") and not torch.compiler.is_compiling():
                # (Dynamo sets capturable=True in the groups it traces.)
                self._check_capturable(p, state)
            if torch.compiler.is_compiling():
                # Counted and computed below, once per part (_traced_scalars).
                scalars = {}
                parts.setdefault((p.device, p.dtype), []).append((p, state, scalars))
                continue
            counted.append((p, state))
        if counted and rule.step_state:
            # One foreach add for the group's counts (a tensor op per count costs more than the
            # update of a small parameter).
            increment([state["step"] for _, state in counted])
        for p, state in counted:
            step = scalar_value(state["step"]) if rule.step_state else None
            if rule.scalar_state:
                scalars = rule.scalars(
                    hyperparameters, step, {name: state[name] for name in rule.scalar_state}
                )
            else:
                # Parameters on the same step share their scalars: computed once per step value.
                scalars = by_step.get(step)
                if scalars is None:
                    scalars = by_step[step] = rule.scalars(hyperparameters, step, {})
            parts.setdefault((p.device, p.dtype), []).append((p, state, scalars))
        if torch.compiler.is_compiling():
            for members in parts.values():
                self._traced_scalars(hyperparameters, members)
        for (device, dtype), members in parts.items():
            fused = self._kernel_members(device, dtype, members, differentiable)
            if fused:
                self._kernel_update(fused, maximize, clip, (index, device, dtype))
            rest = [m for m in members if not any(m[0] is q for q, _, _ in fused)]
            if rest and self.fused and not torch.compiler.is_compiling():
                rest = self._cpu_fused_update(group, device, rest, maximize, clip)
            self._torch_updates(group, rest, maximize, clip)

    def _traced_scalars(
        self, hyperparameters: dict[str, Any], members: list[tuple[Tensor, dict, dict]]
    ) -> None:
        """Under ``torch.compile``: count the steps of one (device, dtype) part and fill in each
        member's scalars with one trace of ``rule.scalars`` for the whole part, not one per
        parameter (the graph, and Inductor's compile time, would grow by the scalars' whole
        computation for every parameter).

        The step counts (and the rule's scalar state) are stacked into 1-D float64 tensors, one
        entry per parameter, which ``rule.scalars`` evaluates element-wise (its contract: ``+ - *
        / **`` and ``torch.where``); the 1-D results are then split among the parameters through
        one table (:func:`split_stacked`), and the scalar state it updated in place is copied
        back into each parameter's own, in its own dtype. Parameters whose counts or scalar
        state differ in device or dtype (loaded from elsewhere) are stacked apart."""
        rule = self.rule
        batches: dict[tuple[Any, ...], list[tuple[dict, dict]]] = {}
        for _, state, scalars in members:
            counted = ("step",) if rule.step_state else ()
            key = tuple(
                (state[name].device, state[name].dtype) for name in (*counted, *rule.scalar_state)
            )
            batches.setdefault(key, []).append((state, scalars))
        for batch in batches.values():
            step = None
            if rule.step_state:
                steps = [state["step"] for state, _ in batch]
                increment(steps)
                step = scalar_value(torch.stack(steps))
            steps_shape = (len(batch),)
            scalar_state = {
                name: torch.stack([state[name] for state, _ in batch]) for name in rule.scalar_state
            }
            values = rule.scalars(hyperparameters, step, scalar_state)
            for key, value in values.items():
                if isinstance(value, Tensor) and value.numel() != 1 and value.shape != steps_shape:
                    raise RuntimeError(
                        f"{type(self).__name__}: rule.scalars returned {key!r} of shape "
                        f"{tuple(value.shape)} for {len(batch)} stacked step counts; under "
                        "torch.compile it must compute element-wise (one value per count) or "
                        "return a single value"
                    )
            # The updated scalar state joins the table, read back per parameter.
            rows = split_stacked([*values.values(), *scalar_state.values()], len(batch))
            for (state, scalars), row in zip(batch, rows, strict=True):
                scalars.update(zip(values, row[: len(values)], strict=True))
                for name, entry in zip(scalar_state, row[len(values) :], strict=True):
                    state[name].copy_(entry)

    def _cpu_fused_update(
        self,
        group: dict[str, Any],
        device: torch.device,
        members: list[tuple[Tensor, dict, dict]],
        maximize: bool,
        clip: tuple[Tensor, Tensor] | None,
    ) -> list[tuple[Tensor, dict, dict]]:
        """``fused=True``'s compiled CPU update (:mod:`torchopt_lab.optim._cpu_fused`) of the
        members the Triton kernel did not take; returns those left to the torch update. The
        compiled update takes the gradient as it is: with clipping, float32 state or norm records
        the torch update runs instead, and :func:`torchopt_lab.backend_info` says so."""
        options = [
            name
            for name, active in (
                ("max_grad_norm", clip is not None),
                ("float32_state", self.float32_state),
                ("record_norms", self.record_norms),
            )
            if active
        ]
        if options and device.type == "cpu":
            _backend.record(
                f"optim.{type(self).__name__} (fused)",
                "fused",
                "torch",
                device,
                f"the fused CPU update does not take {', '.join(options)}: the torch update ran",
            )
            return members
        return _cpu_fused.fused_step(self, device, members, maximize, group)

    def _kernel_members(
        self,
        device: torch.device,
        dtype: torch.dtype,
        members: list[tuple[Tensor, dict, dict]],
        differentiable: bool,
    ) -> list[tuple[Tensor, dict, dict]]:
        """The members of one (device, dtype) part that the fused rule kernel updates: all of
        them when the backend is Triton and the kernel can, else none, with the reason recorded
        (an explicit ``backend="triton"`` raises instead of falling back)."""
        component = f"optim.{type(self).__name__}"
        if torch.compiler.is_compiling():
            # The kernels are opaque to Dynamo: a compiled step traces the torch update.
            _backend.record_traced(component, self.backend, device.type, device.index)
            return []
        if _backend.resolve(component, self.backend, device) != "triton":
            return []
        kernels = importlib.import_module("triton_kernels.optim.rule_kernels")
        real = dtype.to_real() if dtype.is_complex else dtype
        why = None
        if self.rule.triton_update is None:
            why = "the rule declares no triton_update"
        elif differentiable:
            why = "differentiable=True needs autograd, which the torch update records"
        elif real not in kernels.RULE_DTYPES or self._float32(members[0][0]):
            why = f"the rule kernel updates {list(kernels.RULE_DTYPES)}, not {dtype}"
        elif len(self.rule.tensor_state) > kernels.MAX_STATE:
            why = f"the rule kernel takes at most {kernels.MAX_STATE} state tensors"
        elif any(
            state.get(name) is None for _, state, _ in members for name in self.rule.tensor_state
        ):
            why = "a state tensor is absent (State.when) or created by the update (State.init=None)"
        elif not all(
            t.is_contiguous()
            for p, state, _ in members
            for t in (p, p.grad, *(state[name] for name in self.rule.tensor_state))
        ):
            why = "a parameter, gradient or state tensor is not contiguous"
        elif any(p.is_neg() or p.grad.is_neg() for p, _, _ in members):
            why = _NEGATIVE_BIT
        if why is None:
            return members
        if self.backend == "triton":
            raise RuntimeError(f"{component}: backend='triton' cannot run the rule kernel: {why}")
        _backend.record(component, self.backend, "torch", device, why)
        return []

    def _kernel_update(
        self,
        members: list[tuple[Tensor, dict, dict]],
        maximize: bool,
        clip: tuple[Tensor, Tensor] | None,
        key: tuple[int, torch.device, torch.dtype],
    ) -> None:
        """One launch of the kernel skeleton with the rule's update over ``members`` (one device
        and dtype of one param group): clipping (the norm computed by :meth:`_clip`) and
        ``record_norms`` happen inside it."""
        kernels = importlib.import_module("triton_kernels.optim.rule_kernels")
        launchers = importlib.import_module("triton_kernels.optim.launchers")
        self._check_scalar_order(list(members[0][2]))
        device = key[1]
        rows: dict[tuple[float, ...], int] = {}
        row_of = []
        for _, _, scalars in members:
            row = tuple(float(value) for value in scalars.values())
            row_of.append(rows.setdefault(row, len(rows)))
        controls = launchers.StepControls(record_norms=self.record_norms)
        if clip is not None:
            controls.square_norms = (clip[0].to(device, torch.float64) ** 2).reshape(1)
            controls.max_grad_norm = self.max_grad_norm
        tables = self.__dict__.setdefault("_rule_tables", {})
        names = self.rule.tensor_state
        tables[key] = kernels.rule_step(
            self.rule.triton_update,
            [_real(p.detach()) for p, _, _ in members],
            [_real(p.grad) for p, _, _ in members],
            [[_real(state[name]) for _, state, _ in members] for name in names],
            list(rows),
            row_of,
            maximize=maximize,
            table=tables.get(key),
            controls=controls,
        )
        if self.record_norms:
            norms = self._norm_state().norms
            for row, (p, _, _) in enumerate(members):
                norms[id(p)] = (tables[key].diagnostics, row)

    def _check_scalar_order(self, keys: list[str]) -> None:
        """Refuse a ``triton_update`` that unpacks ``scalars`` (``a, b, ... = scalars``) in
        another order than ``rule.scalars()`` returns them: the kernel reads them by position, so
        a mismatch would give wrong numbers, not an error. Checked once per class; an update that
        reads its scalars otherwise (by slices, say) is left to the tests binding the two paths."""
        cls = type(self)
        if cls.__dict__.get("_scalar_order_checked"):
            return
        kernels = importlib.import_module("triton_kernels.optim.kernels")
        names = kernels._unpackings(self.rule.triton_update).get("scalars")
        if names is not None and list(names) != keys:
            raise ValueError(
                f"{cls.__name__}.rule: triton_update unpacks scalars as {list(names)}, but "
                f"rule.scalars() returns {keys}; the kernel passes them in the dict's order"
            )
        cls._scalar_order_checked = True

    def _torch_updates(
        self,
        group: dict[str, Any],
        members: list[tuple[Tensor, dict, dict]],
        maximize: bool,
        clip: tuple[Tensor, Tensor] | None,
    ) -> None:
        """The rule's torch update of ``members`` (one (device, dtype) part of a param group):
        run once over lists (:meth:`_lifted_update`, torch's foreach ops) for the members that
        share their scalars and which state they lack, else per parameter (:meth:`_torch_update`).

        Per parameter always with ``foreach=False`` (torch's for-loop, as asked), with
        ``differentiable=True`` (autograd through foreach ops is not guaranteed on torch 2.4),
        with ``record_norms`` (the norms are recorded per parameter), under ``torch.compile``
        (Inductor fuses the per-parameter update anyway; a lifted trace, tried with per-parameter
        scalars as lists of 0-dim tensors, compiled no faster: Adamax over 40 tensors, 39.5 s
        against 39.4 s for the first two steps) and after an update that cannot run over lists
        (:class:`~torchopt_lab.optim._lifted.NotLiftable`, recorded)."""
        lift = not (
            group.get("foreach") is False
            or group.get("differentiable")
            or self.record_norms
            or torch.compiler.is_compiling()
            or self.__dict__.get("_not_liftable")
        )
        batches: dict[tuple[Any, ...], list[tuple[Tensor, dict, dict]]] = {}
        keys: dict[int, tuple[Any, ...]] = {}  # one key per scalars dict (shared by a step)
        for p, state, scalars in members:
            if lift:
                key = keys.get(id(scalars))
                if key is None:
                    key = keys[id(scalars)] = scalars_key(scalars)
                absent = tuple(state.get(name) is None for name in self.rule.tensor_state)
                batches.setdefault((key, absent), []).append((p, state, scalars))
            else:
                self._torch_update(p, state, scalars, maximize, clip)
        for batch in (chunk for part in batches.values() for chunk in _chunks(part)):
            if len(batch) > 1:
                try:
                    self._lifted_update(batch, maximize, clip)
                    continue
                except NotLiftable as error:
                    self.__dict__["_not_liftable"] = True
                    _backend.record(
                        f"optim.{type(self).__name__} (foreach)",
                        "foreach",
                        "torch",
                        batch[0][0].device,
                        f"the rule's update cannot run over lists ({error}): it runs per "
                        "parameter from now on",
                    )
            for p, state, scalars in batch:
                self._torch_update(p, state, scalars, maximize, clip)

    def _lifted_update(
        self,
        members: list[tuple[Tensor, dict, dict]],
        maximize: bool,
        clip: tuple[Tensor, Tensor] | None,
    ) -> None:
        """:meth:`_torch_update` of several parameters at once: the rule's update called once
        with :class:`~torchopt_lab.optim._lifted.TensorList` arguments, so that each of its ops
        is one foreach op over the members (or a loop where torch has none); the members share
        their scalars and lack the same state. Each tensor goes through the same ops in the same
        order as in :meth:`_torch_update`, so the results are the same bit for bit."""
        rule = self.rule
        params = [p for p, _, _ in members]
        grads = [p.grad for p in params]
        if clip is not None:
            grads = torch._foreach_mul(grads, clip[1].to(grads[0].device, grads[0].dtype))
        if maximize:
            grads = torch._foreach_neg(grads)
        names = rule.tensor_state
        targets: list[list[Tensor] | None] = [params]
        for name in names:
            values = [state.get(name) for _, state, _ in members]
            targets.append(None if values[0] is None else values)
        inputs = list(targets)
        if self._float32(params[0]):
            inputs[0] = [p.float() for p in params]
            grads = [grad.float() for grad in grads]
        real = rule.complex_as_real and params[0].is_complex()
        if real:
            targets = [None if t is None else [_real(x) for x in t] for t in targets]
            inputs = [None if t is None else [_real(x) for x in t] for t in inputs]
            grads = [_real(grad) for grad in grads]
        scalars = members[0][2]
        lifted = [None if t is None else TensorList(t) for t in inputs]
        results = rule.update(lifted[0], TensorList(grads), *lifted[1:], **scalars)
        self._check_results(results)
        written: list[Tensor] = []
        sources: list[Tensor] = []
        for index, (target, result) in enumerate(zip(targets, results, strict=True)):
            if result is None:
                continue
            values = result.tensors if isinstance(result, TensorList) else [result] * len(members)
            if target is not None:
                written.extend(target)
                sources.extend(values)
                continue
            for (_, state, _), value in zip(members, values, strict=True):
                state[names[index - 1]] = _created_state(value, real)
        copy_into(written, sources)

    def _check_results(self, results: tuple[Any, ...]) -> None:
        """``rule.update`` returns the parameter and each tensor state, in order."""
        if len(results) != 1 + len(self.rule.tensor_state):
            raise RuntimeError(
                f"{type(self).__name__}: rule.update returned {len(results)} tensors; "
                f"expected the parameter and {list(self.rule.tensor_state)}"
            )

    def _torch_update(
        self,
        p: Tensor,
        state: dict,
        scalars: dict[str, Any],
        maximize: bool,
        clip: tuple[Tensor, Tensor] | None = None,
    ) -> None:
        """The rule's torch update of one parameter, its results copied into place (computed in
        float32 under ``float32_state`` for a low-precision parameter); ``clip``'s coefficient
        scales the gradient first, out of place."""
        rule = self.rule
        grad = p.grad
        if clip is not None:
            grad = grad * clip[1].to(grad.device, grad.dtype)
        used = grad
        if maximize:
            grad = -grad
        names = rule.tensor_state
        targets = [p, *(state.get(name) for name in names)]
        inputs = [p.float(), *targets[1:]] if self._float32(p) else list(targets)
        if self._float32(p):
            grad = grad.float()
        before = p.detach().clone() if self.record_norms else None
        real = rule.complex_as_real and p.is_complex()
        if rule.complex_as_real:
            targets = [None if t is None else _real(t) for t in targets]
            inputs = [None if t is None else _real(t) for t in inputs]
            grad = _real(grad)
        results = rule.update(inputs[0], grad, *inputs[1:], **scalars)
        self._check_results(results)
        for index, (target, result) in enumerate(zip(targets, results, strict=True)):
            if target is not None:
                target.copy_(result)
            elif result is not None:
                state[names[index - 1]] = _created_state(result, real)
        if before is not None:
            # What the kernels record: squared norms of the gradient used (unscaled, clipped),
            # of the update and of the parameter before it, float32 on the parameter's device.
            with torch.no_grad():
                values = [used.detach(), p.detach() - before, before]
                norms = torch.stack([_real(v).double().square().sum() for v in values]).float()
            self._norm_state().norms[id(p)] = (norms.reshape(1, 3), 0)
