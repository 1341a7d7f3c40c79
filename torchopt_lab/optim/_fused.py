"""The Triton branch of the optimizers' one dispatch point: their step as fused kernels.

:func:`fused_step` takes every (device, dtype) part that :mod:`torchopt_lab.backend` assigned to
Triton, across param groups, and updates each (device, dtype) in ONE kernel launch (plus one
launch for the gradient norm when ``max_grad_norm`` is set). Hyperparameters go to the device as a
small float64 table, re-uploaded only when a scheduler changes them; per-tensor pointer tables are
cached by ``data_ptr()`` (:class:`triton_kernels.optim.MultiTensorTable`). Nothing here reads a
device value on the host, so a step does not synchronise and can be captured in a CUDA graph.

The update rules live with the torch reference functions (``sgd.py``, ``adagrad.py``,
``rmsprop.py``, ``adam.py``); this module only maps an optimizer's tensor lists and param-group
options onto its kernel.
"""

from __future__ import annotations

import functools
import importlib
import itertools
import operator
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from torchopt_lab import backend as _backend
from torchopt_lab.optim.clip import _total_norm

_LOW_PRECISION = (torch.float16, torch.bfloat16)
_GRAD = operator.attrgetter("grad")


@dataclass(frozen=True)
class KernelSpec:
    """How one optimizer's tensor lists and param-group options map onto its kernel update.

    The update's hyperparameter fields, state and options, with their orders, are declared once,
    by its :class:`triton_kernels.optim.kernels.KernelUpdate` (``declaration``, imported when
    first needed: Triton is optional); this only says where each of them lives in a param group
    and in the optimizer's tensor lists.
    """

    update: str  # the KernelUpdate's name in triton_kernels.optim.kernels.UPDATES
    state_lists: dict[str, str]  # state key (a declared state) -> the TensorLists holding it
    options: Callable[[dict[str, Any]], dict[str, bool]]  # the update's options for a group
    # Fields not stored in a param group under their own name, and how to read them.
    readers: dict[str, Callable[[dict[str, Any]], Any]] = field(default_factory=dict)

    @functools.cached_property
    def declaration(self) -> Any:
        declaration = importlib.import_module("triton_kernels.optim.kernels").UPDATES[self.update]
        if set(self.state_lists) != set(declaration.states):
            raise ValueError(
                f"{self.update}: state lists for {sorted(self.state_lists)}, but the kernel "
                f"update declares {list(declaration.states)}"
            )
        return declaration

    @functools.cached_property
    def _field_readers(self) -> tuple[Callable[[dict[str, Any]], Any], ...]:
        return tuple(
            self.readers.get(name, operator.itemgetter(name)) for name in self.declaration.fields
        )

    def values(self, group: dict[str, Any]) -> list[float | Tensor]:
        """The hyperparameter row of a group, in the declared field order."""
        return [reader(group) for reader in self._field_readers]

    def flags(self, group: dict[str, Any]) -> dict[str, bool]:
        """The launch-level options of a group: the update's, and ``maximize``."""
        return {**self.options(group), "maximize": bool(group["maximize"])}

    @property
    def state_keys(self) -> tuple[str, ...]:
        return self.declaration.states

    @property
    def state_list_names(self) -> tuple[str, ...]:
        return tuple(self.state_lists[key] for key in self.declaration.states)

    @property
    def has_step(self) -> bool:
        return self.declaration.has_step


def kernel_spec(optimizer_class: type) -> KernelSpec:
    """The :class:`KernelSpec` of an optimizer class: its ``rule.kernel`` (each built-in declares
    its own, beside its reference, in its :class:`~torchopt_lab.optim.rules.Rule`)."""
    spec = getattr(getattr(optimizer_class, "rule", None), "kernel", None)
    if spec is None:
        raise TypeError(f"{optimizer_class.__name__} declares no fused kernel (rule.kernel)")
    return spec


@dataclass
class Part:
    """The tensors of one param group on one device and dtype, and the backend chosen for them."""

    group: dict[str, Any]
    group_index: int
    indices: list[int]  # positions of the part's tensors in the group's tensor lists
    tensors: dict[str, list[Any]]
    device: torch.device
    dtype: torch.dtype
    backend: str


@dataclass
class _Launch:
    """The cached device-side pieces of one launch group."""

    table: Any
    hyperparameters: Tensor | None = None
    uploaded: tuple | None = None


@dataclass
class FusedState:
    """What an optimizer keeps between fused steps (not part of its state dict)."""

    launches: dict[tuple, _Launch] = field(default_factory=dict)
    # device -> (norm buffer, launch groups filling it): rebuilt when that count changes, so no
    # slot keeps a square norm from a launch group that is gone.
    square_norms: dict[torch.device, tuple[Tensor, int]] = field(default_factory=dict)
    skipped_steps: dict[torch.device, Tensor] = field(default_factory=dict)
    norms: dict[int, tuple[Tensor, int]] = field(default_factory=dict)  # id(param) -> (buffer, row)
    plan: _Plan | None = None


@dataclass
class _Prepared:
    """One launch group, ready to launch: its cached pieces and the tensors it covers."""

    key: tuple
    launch: _Launch
    groups: list[dict[str, Any]]
    originals: list[Tensor]  # the optimizer's parameters (DTensors under FSDP2)
    params: list[Tensor]  # what the kernels update (their local shards)
    state_rows: list[list[Tensor | None]]
    steps: list[Tensor] | None
    group_rows: list[int]
    tensor_flags: list[int]


@dataclass
class _Plan:
    """A step that can repeat without re-collecting tensors: valid while the optimizer's param
    groups, their launch-level options, every parameter's state dict and the state tensors in it
    are the same objects, the parameters updated last time have dense gradients and the others
    (frozen or unused) still have none. Only the gradients are fetched anew. Every check is an
    identity comparison run by C loops (``map``), so that a step over thousands of small tensors
    costs little host time."""

    options: tuple
    state: Any
    param_groups: list[dict[str, Any]]
    group_params: list[list[Tensor]]
    group_lengths: list[int]
    group_flags: list[dict[str, bool]]
    originals: list[Tensor]  # every parameter with a gradient, in launch order
    gradless: list[Tensor]  # the others (frozen, unused): they must still have no gradient
    state_keys: list[Tensor]  # optimizer.state's keys and values, in order
    state_values: list[dict[str, Any]]
    state_dicts: list[dict[str, Any] | None]  # optimizer.state.get(p) of every parameter
    state_tensors: list[tuple[str, list[Any]]]  # (key, state_dicts[i][key] for every i)
    prepared: list[_Prepared]


def _device_value(value: Any) -> float | None:
    """A hyperparameter as a Python float, or None when it lives on a device (read it there)."""
    if isinstance(value, Tensor):
        return None if value.device.type != "cpu" else float(value)
    return float(value)


def _hyperparameters(
    launch: _Launch, spec: KernelSpec, groups: list[dict[str, Any]], device: torch.device
) -> Tensor:
    """The launch's float64 hyperparameter table, uploaded only when a value changed.

    Python numbers are uploaded with one asynchronous copy when they change (a scheduler step);
    device tensors (tensor ``lr``/``betas`` on the parameters' device) are copied device to device
    every step, so a CUDA graph replay reads their current value.
    """
    rows = [spec.values(group) for group in groups]
    host = tuple(tuple(_device_value(value) for value in row) for row in rows)
    if launch.hyperparameters is None or launch.hyperparameters.shape[0] != len(rows):
        launch.hyperparameters = torch.zeros(
            len(rows), len(rows[0]), dtype=torch.float64, device=device
        )
        launch.uploaded = None
    if host != launch.uploaded:
        values = [[0.0 if value is None else value for value in row] for row in host]
        source = torch.tensor(values, dtype=torch.float64, pin_memory=device.type == "cuda")
        launch.hyperparameters.copy_(source, non_blocking=True)
        launch.uploaded = host
    for row_index, row in enumerate(rows):
        for column, value in enumerate(row):
            if isinstance(value, Tensor) and value.device.type != "cpu":
                launch.hyperparameters[row_index, column].copy_(value.reshape(()))
    return launch.hyperparameters


def _prepare_state(
    optimizer: torch.optim.Optimizer, spec: KernelSpec, part: Part, float32_state: bool
) -> tuple[list[list[Tensor | None]], list[Tensor] | None, list[int]]:
    """State rows, device step counters and per-tensor flags of one part, in kernel form.

    ``step`` moves to the parameter's device as float32 (as torch's fused optimizers keep it);
    SGD's missing momentum buffers are created here (flag 1: start from this step's gradient)
    and handed to ``optimizer.state`` only after the launch, and only if the step was not
    skipped (:func:`fused_step`); with ``float32_state``, low-precision parameters get float32
    state.
    """
    params = part.tensors["params"]
    upcast = float32_state and part.dtype in _LOW_PRECISION
    rows: list[list[Tensor | None]] = []
    flags = [0] * len(params)
    for name, key in zip(spec.state_list_names, spec.state_keys, strict=True):
        values = part.tensors.get(name, [])
        if len(values) != len(params):
            rows.append([None] * len(params))
            continue
        if upcast or any(value is None for value in values):
            values = list(values)
            for index, (param, value) in enumerate(zip(params, values, strict=True)):
                if value is None:
                    values[index] = torch.zeros_like(param, dtype=torch.float32 if upcast else None)
                    flags[index] = 1
                elif upcast and value.dtype != torch.float32:
                    values[index] = value.float()
                    optimizer.state[param][key] = values[index]
            part.tensors[name] = values
        rows.append(values)
    steps = None
    if spec.has_step:
        steps = part.tensors["state_steps"]
        device = part.device
        if not all(s.dtype == torch.float32 and s.device == device for s in steps):
            steps = [step.to(device=device, dtype=torch.float32) for step in steps]
            for param, step in zip(params, steps, strict=True):
                optimizer.state[param]["step"] = step
            part.tensors["state_steps"] = steps
    return rows, steps, flags


def _local(values: list) -> list:
    """The local shards the kernels update: FSDP2 hands the optimizer DTensors, whose
    ``to_local()`` views share storage from step to step (so the tables stay cached)."""
    first = next((value for value in values if value is not None), None)
    if first is None or not hasattr(first, "to_local"):
        return values
    return [value if value is None else value.to_local() for value in values]


def _is_dtensor(value: Any) -> bool:
    """Whether ``value`` is a DTensor (FSDP2's parameters and gradients)."""
    return hasattr(value, "to_local") and hasattr(value, "full_tensor")


def _on(value: Tensor | None, device: torch.device) -> Tensor | None:
    """A GradScaler scalar on ``device`` as float32 (asynchronous; a no-op when already there)."""
    return None if value is None else value.to(device, torch.float32, non_blocking=True)


def _options(optimizer: torch.optim.Optimizer) -> tuple:
    return (
        optimizer.backend,
        optimizer.max_grad_norm,
        optimizer.skip_nonfinite,
        optimizer.float32_state,
        optimizer.record_norms,
    )


def fused_step(
    optimizer: torch.optim.Optimizer,
    parts: list[Part],
    *,
    total_norm: Tensor | None,
    complete: bool,
) -> list[Tensor]:
    """Update every part with the Triton kernels: one launch per (device, dtype) launch group.

    ``total_norm``: the global gradient norm when some tensors ran on the torch path (it already
    covers them); otherwise the kernels compute it (one reduction launch per launch group).
    ``complete``: the parts hold every parameter of the optimizer that has a gradient, so the step
    may be replayed by :func:`repeat_step` while nothing changes (the others keep no gradient).
    Returns the parameters whose state created for this step was dropped because the kernels
    skipped it (their entries in the parts' lists are None).
    """
    _backend.kernels()  # raises clearly if the triton_kernels found is not ours
    kernels = importlib.import_module("triton_kernels.optim")
    spec = kernel_spec(type(optimizer))
    state: FusedState = optimizer.__dict__.setdefault("_fused_state", FusedState())
    state.plan = None

    # Launch groups: one per (device, dtype, launch-level options); parts of several param groups
    # with the same options share a launch, each tensor reading its group's hyperparameter row.
    launches: dict[tuple, list[Part]] = {}
    for part in parts:
        key = (part.device, part.dtype, tuple(sorted(spec.flags(part.group).items())))
        launches.setdefault(key, []).append(part)

    prepared = []
    for key, members in launches.items():
        originals, params, grads, rows, steps, tensor_flags, group_rows = [], [], [], [], [], [], []
        for row_index, part in enumerate(members):
            part_rows, part_steps, part_flags = _prepare_state(
                optimizer, spec, part, optimizer.float32_state
            )
            originals += part.tensors["params"]
            params += _local(part.tensors["params"])
            grads += _local(part.tensors["grads"])
            rows.append([_local(row) for row in part_rows])
            steps += _local(part_steps or [])
            tensor_flags += part_flags
            group_rows += [row_index] * len(part.tensors["params"])
        if key not in state.launches:
            state.launches[key] = _Launch(kernels.MultiTensorTable())
        state_rows = [[t for part_rows in rows for t in part_rows[k]] for k in range(len(rows[0]))]
        entry = _Prepared(
            key,
            state.launches[key],
            [part.group for part in members],
            originals,
            params,
            state_rows,
            steps if spec.has_step else None,
            group_rows,
            tensor_flags,
        )
        entry.launch.table.update(params, grads, state_rows, entry.steps, group_rows, tensor_flags)
        prepared.append(entry)
    square_norms = _launch_all(optimizer, kernels, spec, state, prepared, parts, total_norm)
    dropped = _keep_fresh_state(optimizer, spec, parts, prepared, square_norms)
    if complete and not any(flag for entry in prepared for flag in entry.tensor_flags):
        originals = [p for entry in prepared for p in entry.originals]
        updated = set(map(id, originals))
        # .get: optimizer.state is a defaultdict, and SGD without momentum keeps no state.
        state_dicts = [optimizer.state.get(p) for p in originals]
        keys = [*spec.state_keys, "step"] if spec.has_step else list(spec.state_keys)
        state.plan = _Plan(
            options=_options(optimizer),
            state=optimizer.state,
            param_groups=optimizer.param_groups,
            group_params=[group["params"] for group in optimizer.param_groups],
            group_lengths=[len(group["params"]) for group in optimizer.param_groups],
            group_flags=[spec.flags(group) for group in optimizer.param_groups],
            originals=originals,
            gradless=[
                p
                for group in optimizer.param_groups
                for p in group["params"]
                if id(p) not in updated
            ],
            state_keys=list(optimizer.state.keys()),
            state_values=list(optimizer.state.values()),
            state_dicts=state_dicts,
            state_tensors=[
                (key, [values[key] for values in state_dicts])
                for key in keys
                if all(values is not None and key in values for values in state_dicts)
            ],
            prepared=prepared,
        )
    return dropped


def _keep_fresh_state(
    optimizer: torch.optim.Optimizer,
    spec: KernelSpec,
    parts: list[Part],
    prepared: list[_Prepared],
    square_norms: dict[torch.device, Tensor],
) -> list[Tensor]:
    """Hand the state created for this step (SGD's first momentum buffers) to
    ``optimizer.state``, unless the kernels skipped the step: then drop it, so the next step is
    the first one again, as it is for torch.optim when GradScaler skips ``step()``.

    Whether the kernels skipped is known on the device; it is read (one synchronisation) only on
    a step that created state and could skip (``found_inf`` given, or ``skip_nonfinite``).
    """
    fresh = [
        (part, index)
        for part in parts
        for index, key in enumerate(spec.state_list_names)
        if len(part.tensors.get(key, [])) == len(part.tensors["params"])
    ]
    created = any(flag for entry in prepared for flag in entry.tensor_flags)
    if not created:
        return []
    found_inf = getattr(optimizer, "found_inf", None)
    skipped = False
    if found_inf is not None:
        skipped = bool(found_inf.item())
    if not skipped and optimizer.skip_nonfinite and square_norms:
        grad_scale = getattr(optimizer, "grad_scale", None)
        norm = next(iter(square_norms.values())).sum().sqrt()
        if grad_scale is not None:
            norm = norm * (1.0 / grad_scale.double()).float().double().to(norm.device)
        skipped = not bool(torch.isfinite(norm).item())
    dropped = []
    for part, index in fresh:
        key = spec.state_keys[index]
        values = part.tensors[spec.state_list_names[index]]
        for position, param in enumerate(part.tensors["params"]):
            if optimizer.state.get(param, {}).get(key) is not None:
                continue
            if skipped:
                values[position] = None
                dropped.append(param)
            else:
                optimizer.state[param][key] = values[position]
    return dropped


def _same_objects(values: Any, expected: list) -> bool:
    return len(values) == len(expected) and all(map(operator.is_, values, expected))


def repeat_step(optimizer: torch.optim.Optimizer) -> bool:
    """Run the step planned by the last :func:`fused_step` again with the current gradients, if
    nothing it depends on changed; return whether it ran.

    This skips collecting tensors and state group by group (``_group_tensors``), which dominates the
    host time of a step over thousands of small tensors. Any change (a param group added or its
    list edited, an option flipped, a state dict loaded or a parameter's state replaced, a missing
    or sparse gradient, a gradient where there was none, a different backend decision) falls back
    to the full step.
    """
    state: FusedState | None = optimizer.__dict__.get("_fused_state")
    plan = state.plan if state is not None else None
    if plan is None:
        return False
    spec = kernel_spec(type(optimizer))
    if (
        plan is None
        or plan.options != _options(optimizer)
        or plan.state is not optimizer.state
        or plan.param_groups is not optimizer.param_groups
        or len(plan.group_params) != len(optimizer.param_groups)
    ):
        return False
    for group, params, length, flags in zip(
        optimizer.param_groups, plan.group_params, plan.group_lengths, plan.group_flags, strict=True
    ):
        if group["params"] is not params or len(params) != length or spec.flags(group) != flags:
            return False
    component = f"optim.{type(optimizer).__name__}"
    for device in {entry.key[0] for entry in plan.prepared}:
        if _backend.resolve(component, optimizer.backend, device) != "triton":
            return False
    # No parameter's state dict replaced, added or removed, and no state tensor replaced in one.
    if not (
        _same_objects(optimizer.state.keys(), plan.state_keys)
        and _same_objects(optimizer.state.values(), plan.state_values)
    ):
        return False
    try:
        for key, tensors in plan.state_tensors:
            if not all(map(operator.is_, map(operator.itemgetter(key), plan.state_dicts), tensors)):
                return False
    except KeyError:  # a state entry was deleted
        return False
    if not all(map(operator.is_, map(_GRAD, plan.gradless), itertools.repeat(None))):
        return False
    grads = _local(list(map(_GRAD, plan.originals)))
    try:
        addresses = list(map(Tensor.data_ptr, grads))
    except (TypeError, RuntimeError):  # a missing (None) or sparse gradient
        return False
    kernels = importlib.import_module("triton_kernels.optim")
    start = 0
    for entry in plan.prepared:
        end = start + len(entry.params)
        # False: a parameter or state tensor resized or moved in place, or a gradient laid out
        # differently from its parameter; the full step re-decides and rebuilds.
        if not entry.launch.table.refresh(entry.params, grads[start:end], addresses[start:end]):
            return False
        start = end
    _launch_all(optimizer, kernels, spec, state, plan.prepared, None, None)
    return True


def _launch_all(
    optimizer: torch.optim.Optimizer,
    kernels: Any,
    spec: KernelSpec,
    state: FusedState,
    prepared: list[_Prepared],
    parts: list[Part] | None,
    total_norm: Tensor | None,
) -> dict[torch.device, Tensor]:
    """Upload changed hyperparameters, compute the gradient norm if clipping, launch the steps;
    return the square-norm buffer of each device (empty without clipping).

    ``optimizer.grad_scale`` / ``optimizer.found_inf``, set by ``GradScaler.step``, are unscaled
    and checked inside the kernels.
    """
    max_grad_norm = optimizer.max_grad_norm
    grad_scale = getattr(optimizer, "grad_scale", None)
    found_inf = getattr(optimizer, "found_inf", None)
    devices = {entry.key[0] for entry in prepared}
    square_norms: dict[torch.device, Tensor] = {}
    if max_grad_norm is not None:
        sharded = any(_is_dtensor(p) for entry in prepared for p in entry.originals)
        if total_norm is None and (len(devices) > 1 or sharded):
            # One global norm across devices, or across the ranks of a sharded (FSDP2) model,
            # whose kernels see only local shards: torch's (one small reduction per device).
            grads = [p.grad for entry in prepared for p in entry.originals]
            total_norm = _total_norm(grads)
        if total_norm is not None:
            if _is_dtensor(total_norm):
                total_norm = total_norm.full_tensor()  # a Partial norm: reduce across ranks
            for device in devices:
                square_norms[device] = (total_norm.to(device, torch.float64) ** 2).reshape(1)
        else:
            device = next(iter(devices))
            norms, filled = state.square_norms.get(device, (None, 0))
            if norms is None or filled != len(prepared):
                slots = 1 << max(0, (len(prepared) - 1).bit_length())
                norms = torch.zeros(slots, dtype=torch.float64, device=device)
                state.square_norms[device] = (norms, len(prepared))
            for slot, entry in enumerate(prepared):
                kernels.grad_square_norm(entry.launch.table, norms, slot)
            square_norms[device] = norms

    # (state.norms is cleared at the start of the optimizer's step: the torch path records too.)
    counted: set[torch.device] = set()
    for entry in prepared:
        device = entry.key[0]
        hyperparameters = _hyperparameters(entry.launch, spec, entry.groups, device)
        skip_nonfinite = optimizer.skip_nonfinite and max_grad_norm is not None
        skipped = None
        if skip_nonfinite and device not in counted:
            # The first launch on a device counts a skipped step, so it counts once.
            counted.add(device)
            if device not in state.skipped_steps:  # allocated once: a step launches nothing else
                state.skipped_steps[device] = torch.zeros(1, dtype=torch.int32, device=device)
            skipped = state.skipped_steps[device]
        controls = kernels.StepControls(
            grad_scale=_on(grad_scale, device),
            found_inf=_on(found_inf, device),
            square_norms=square_norms.get(device),
            max_grad_norm=max_grad_norm,
            skip_nonfinite=skip_nonfinite,
            skipped_steps=skipped,
            record_norms=optimizer.record_norms,
        )
        options = dict(entry.key[2])
        maximize = options.pop("maximize")
        kernels.step(
            spec.declaration,
            entry.launch.table,
            hyperparameters,
            options=options,
            maximize=maximize,
            controls=controls,
        )
        if optimizer.record_norms:
            for row, param in enumerate(entry.originals):
                state.norms[id(param)] = (entry.launch.table.diagnostics, row)
    return square_norms
