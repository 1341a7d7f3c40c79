"""Public launchers of the optimizer-step kernels: check the inputs, pick the variant, launch once.

Each ``*_step`` function updates every tensor described by a
:class:`~triton_kernels.optim.tables.MultiTensorTable` in ONE kernel launch, reading its
hyperparameters (a float64 tensor of shape ``[param_groups, len(FIELDS)]``, rows indexed by each
tensor's group) from device memory. :func:`grad_square_norm` is the one extra launch that clipping
needs. Nothing here synchronises with the host, so a step can be captured in a CUDA graph.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import triton.language as tl
from torch import Tensor

from triton_kernels.optim import kernels
from triton_kernels.optim.tables import MultiTensorTable

# Each algorithm's hyperparameter fields, in row order: read from its one declaration.
SGD_FIELDS = kernels.SGD.fields
ADAGRAD_FIELDS = kernels.ADAGRAD.fields
RMSPROP_FIELDS = kernels.RMSPROP.fields
ADAM_FIELDS = kernels.ADAM.fields

_TRITON_DTYPES = {
    torch.float32: tl.float32,
    torch.bfloat16: tl.bfloat16,
    torch.float16: tl.float16,
    torch.float64: tl.float64,
}
_REDUCE_BLOCK = 1024
# 8 warps for DEFAULT_BLOCK_SIZE (2048) elements: 8 per thread, two 128-bit accesses per float32
# array. ptxas then allocates ~60 registers for Adam (about half of what 4 warps need), which
# leaves room for 32 resident warps per SM to hide memory latency. float64 arithmetic needs twice
# the registers: with 8 warps ptxas caps them and Adam spills, so float64 launches 4 warps.
NUM_WARPS = 8
NUM_WARPS_FLOAT64 = 4


def _num_warps(dtype: torch.dtype) -> int:
    return NUM_WARPS_FLOAT64 if dtype == torch.float64 else NUM_WARPS


@dataclass
class StepControls:
    """The device-side inputs every step kernel takes besides the tensors and hyperparameters.

    - ``grad_scale`` (float32 scalar): gradients are multiplied by ``1 / grad_scale`` as they are
      loaded (GradScaler's unscale, fused). Gradients in memory are left as they were.
    - ``found_inf`` (float32 scalar): when nonzero, the step is skipped on the device (no
      parameter, state or step changes), as torch's fused optimizers do.
    - ``square_norms`` (float64, a power-of-two number of slots) and ``max_grad_norm``: clip with
      ``min(1, max_grad_norm / (norm + 1e-6))``, ``norm`` the square root of the slots' sum
      (filled by :func:`grad_square_norm`), unscaled by ``grad_scale``.
    - ``skip_nonfinite``: skip the step when that norm is NaN or infinite, and add one to
      ``skipped_steps`` (int32, one element) if given: of several launches making one step, only
      one passes the counter, so a skipped step counts once.
    - ``record_norms``: write per-tensor squared norms of the gradient (after unscaling and
      clipping), the update and the parameter (before the update) into ``table.diagnostics``.
    """

    grad_scale: Tensor | None = None
    found_inf: Tensor | None = None
    square_norms: Tensor | None = None
    max_grad_norm: float | None = None
    skip_nonfinite: bool = False
    skipped_steps: Tensor | None = None
    record_norms: bool = False


def _launch(kernel: Any, grid: tuple[int], *args: Any, **constexprs: Any) -> None:
    """Every kernel launch of this package goes through here (tests count them)."""
    kernel[grid](*args, **constexprs)


_dummies: dict[tuple[torch.device, torch.dtype], Tensor] = {}


def _dummy(device: torch.device, dtype: torch.dtype) -> Tensor:
    """A one-element tensor standing in for a pointer argument the chosen variant never reads."""
    key = (device, dtype)
    if key not in _dummies:
        _dummies[key] = torch.zeros(1, dtype=dtype, device=device)
    return _dummies[key]


def _check_scalar(name: str, tensor: Tensor, dtype: torch.dtype, device: torch.device) -> None:
    if tensor.device != device or tensor.dtype != dtype or tensor.numel() != 1:
        raise ValueError(
            f"{name} must be a one-element {dtype} tensor on {device}, got {tensor.dtype} of "
            f"shape {tuple(tensor.shape)} on {tensor.device}"
        )


def _check_table(table: MultiTensorTable) -> None:
    if table.key is None:
        raise ValueError("the table describes no tensors yet: call table.update(...) first")


def _check_hyperparameters(
    table: MultiTensorTable, hyperparameters: Tensor, fields: tuple[str, ...]
) -> None:
    groups = table.group_count
    if (
        hyperparameters.device != table.device
        or hyperparameters.dtype != torch.float64
        or hyperparameters.dim() != 2
        or hyperparameters.shape[0] < groups
        or hyperparameters.shape[1] != len(fields)
        or not hyperparameters.is_contiguous()
    ):
        raise ValueError(
            f"hyperparameters must be a contiguous float64 tensor of shape [>={groups}, "
            f"{len(fields)}] (fields {fields}) on {table.device}, got {hyperparameters.dtype} of "
            f"shape {tuple(hyperparameters.shape)} on {hyperparameters.device}"
        )


def _control_arguments(table: MultiTensorTable, controls: StepControls) -> tuple[list, dict]:
    """The control pointer arguments and constexpr flags shared by every step kernel."""
    device = table.device
    float32 = _dummy(device, torch.float32)
    clip = controls.max_grad_norm is not None
    if controls.grad_scale is not None:
        _check_scalar("grad_scale", controls.grad_scale, torch.float32, device)
    if controls.found_inf is not None:
        _check_scalar("found_inf", controls.found_inf, torch.float32, device)
    if clip:
        if not controls.max_grad_norm > 0:
            raise ValueError(f"max_grad_norm must be positive, got {controls.max_grad_norm}")
        norms = controls.square_norms
        if norms is None:
            raise ValueError("max_grad_norm needs square_norms filled by grad_square_norm()")
        slots = norms.numel()
        if norms.device != device or norms.dtype != torch.float64 or slots & (slots - 1):
            raise ValueError(
                f"square_norms must be float64 on {device} with a power-of-two size, got "
                f"{norms.dtype} of size {slots} on {norms.device}"
            )
    if controls.skip_nonfinite:
        if not clip:
            raise ValueError("skip_nonfinite needs max_grad_norm: the norm decides the skip")
        if controls.skipped_steps is not None:
            _check_scalar("skipped_steps", controls.skipped_steps, torch.int32, device)
    count_skipped = controls.skip_nonfinite and controls.skipped_steps is not None
    arguments = [
        controls.grad_scale if controls.grad_scale is not None else float32,
        controls.found_inf if controls.found_inf is not None else float32,
        controls.square_norms if clip else _dummy(device, torch.float64),
        float(controls.max_grad_norm) if clip else 1.0,
        controls.skipped_steps if count_skipped else _dummy(device, torch.int32),
        table.block_counters,
        table.diagnostic_sums,
        table.diagnostics,
    ]
    compute = tl.float64 if table.param_dtype == torch.float64 else tl.float32
    constexprs = {
        "PARAM_DTYPE": _TRITON_DTYPES[table.param_dtype],
        "STATE_DTYPE": _TRITON_DTYPES[table.state_dtype],
        "COMPUTE_DTYPE": compute,
        "BLOCK": table.block_size,
        "NUMEL_MULTIPLE": table.numel_multiple,
        "ASSUME_ALIGNED": table.aligned,
        "NORM_SLOTS": controls.square_norms.numel() if clip else 1,
        "UNSCALE_GRADS": controls.grad_scale is not None,
        "CHECK_FOUND_INF": controls.found_inf is not None,
        "CLIP_GRADS": clip,
        "SKIP_NONFINITE": controls.skip_nonfinite,
        "COUNT_SKIPPED": count_skipped,
        "RECORD_NORMS": controls.record_norms,
        "num_warps": _num_warps(table.param_dtype),
    }
    return arguments, constexprs


def step(
    kind: kernels.KernelUpdate,
    table: MultiTensorTable,
    hyperparameters: Tensor,
    *,
    options: dict[str, bool] | None = None,
    maximize: bool = False,
    controls: StepControls | None = None,
) -> None:
    """One step of ``kind`` (a :class:`~triton_kernels.optim.kernels.KernelUpdate`) for every
    tensor of ``table``: hyperparameters of shape ``[groups, len(kind.fields)]``, state rows in
    the order of ``kind.states`` (rows an option leaves out hold None), ``options`` by the names
    of ``kind.options`` (every one given)."""
    options = dict(options or {})
    if set(options) != set(kind.options):
        raise ValueError(
            f"{kind.name}: options {sorted(options)} given; expected exactly {list(kind.options)}"
        )
    _launch_step(
        kind.update,
        tuple(bool(options[name]) for name in kind.options),
        kind.fields,
        len(kind.states),
        kind.has_step,
        table,
        hyperparameters,
        controls,
        maximize,
    )


def _launch_step(
    update: Any,
    update_options: Any,
    fields: tuple[str, ...] | int,
    state_count: int,
    has_step: bool,
    table: MultiTensorTable,
    hyperparameters: Tensor,
    controls: StepControls | None,
    maximize: bool,
) -> None:
    """Check the inputs and launch :func:`kernels._optimizer_step_kernel` (then, when a recorded
    step may have been skipped, the skipped step's diagnostics)."""
    _check_table(table)
    if isinstance(fields, int):
        fields = tuple(f"scalar {k}" for k in range(fields))
    _check_hyperparameters(table, hyperparameters, fields)
    arguments, constexprs = _control_arguments(table, controls or StepControls())
    step_arguments = (table.tensor_table, table.block_table, table.tensor_count, table.block_count)
    _launch(
        kernels._optimizer_step_kernel,
        (table.block_count,),
        *step_arguments,
        hyperparameters,
        *arguments,
        UPDATE=update,
        OPTIONS=update_options,
        FIELD_COUNT=len(fields),
        STATE_COUNT=state_count,
        HAS_STEP=has_step,
        MAXIMIZE=maximize,
        **constexprs,
    )
    if constexprs["RECORD_NORMS"] and (
        constexprs["CHECK_FOUND_INF"] or constexprs["SKIP_NONFINITE"]
    ):
        # The step may have been skipped on the device: its diagnostics must say so.
        _launch(
            kernels._skipped_step_norms_kernel,
            (table.block_count,),
            *step_arguments,
            *arguments[:4],
            *arguments[5:],
            **{
                name: constexprs[name]
                for name in (
                    "COMPUTE_DTYPE",
                    "BLOCK",
                    "NUMEL_MULTIPLE",
                    "ASSUME_ALIGNED",
                    "NORM_SLOTS",
                    "UNSCALE_GRADS",
                    "CHECK_FOUND_INF",
                    "CLIP_GRADS",
                    "SKIP_NONFINITE",
                    "num_warps",
                )
            },
            PARAM_DTYPE=constexprs["PARAM_DTYPE"],
        )


def grad_square_norm(table: MultiTensorTable, square_norms: Tensor, slot: int = 0) -> None:
    """Write the sum of squares of all of the table's gradients to ``square_norms[slot]``.

    One launch, deterministic (partial sums added in a fixed order), no host synchronisation.
    ``square_norms`` is float64 on the table's device; several launch groups (say, float32 and
    bfloat16 parameters) fill several slots, and the step kernels add the slots up.
    """
    _check_table(table)
    if square_norms.device != table.device or square_norms.dtype != torch.float64:
        raise ValueError(
            f"square_norms must be float64 on {table.device}, got {square_norms.dtype} on "
            f"{square_norms.device}"
        )
    if not 0 <= slot < square_norms.numel():
        raise IndexError(f"slot {slot} is out of range for {square_norms.numel()} square_norms")
    _launch(
        kernels._grad_square_norm_kernel,
        (table.block_count,),
        table.tensor_table,
        table.block_table,
        table.tensor_count,
        table.block_count,
        table.partial_sums,
        table.done_counter,
        square_norms,
        slot,
        GRAD_DTYPE=_TRITON_DTYPES[table.param_dtype],
        COMPUTE_DTYPE=tl.float64 if table.param_dtype == torch.float64 else tl.float32,
        BLOCK=table.block_size,
        NUMEL_MULTIPLE=table.numel_multiple,
        ASSUME_ALIGNED=table.aligned,
        REDUCE_BLOCK=_REDUCE_BLOCK,
        num_warps=_num_warps(table.param_dtype),
    )


def sgd_step(
    table: MultiTensorTable,
    hyperparameters: Tensor,
    *,
    momentum: bool,
    nesterov: bool,
    maximize: bool,
    controls: StepControls | None = None,
) -> None:
    """One SGD step for every tensor of ``table`` (fields :data:`SGD_FIELDS`).

    ``momentum``: whether the groups use a momentum buffer (state row 0); a tensor whose table
    flag is 1 starts its buffer from this step's gradient, as torch does on the first step.
    """
    if nesterov and not momentum:
        raise ValueError("Nesterov momentum requires a momentum")
    step(
        kernels.SGD,
        table,
        hyperparameters,
        options={"momentum": momentum, "nesterov": nesterov},
        maximize=maximize,
        controls=controls,
    )


def adagrad_step(
    table: MultiTensorTable,
    hyperparameters: Tensor,
    *,
    maximize: bool,
    controls: StepControls | None = None,
) -> None:
    """One Adagrad step for every tensor of ``table`` (fields :data:`ADAGRAD_FIELDS`; state row
    0: ``sum``; every tensor needs a step)."""
    step(kernels.ADAGRAD, table, hyperparameters, maximize=maximize, controls=controls)


def rmsprop_step(
    table: MultiTensorTable,
    hyperparameters: Tensor,
    *,
    centered: bool,
    momentum: bool,
    maximize: bool,
    controls: StepControls | None = None,
) -> None:
    """One RMSprop step for every tensor of ``table`` (fields :data:`RMSPROP_FIELDS`; state rows:
    ``square_avg``, ``grad_avg`` when centered, ``momentum_buffer`` when momentum > 0)."""
    step(
        kernels.RMSPROP,
        table,
        hyperparameters,
        options={"centered": centered, "momentum": momentum},
        maximize=maximize,
        controls=controls,
    )


def adam_step(
    table: MultiTensorTable,
    hyperparameters: Tensor,
    *,
    amsgrad: bool,
    maximize: bool,
    decoupled_weight_decay: bool,
    controls: StepControls | None = None,
) -> None:
    """One Adam (or, with ``decoupled_weight_decay``, AdamW) step for every tensor of ``table``
    (fields :data:`ADAM_FIELDS`; state rows: ``exp_avg``, ``exp_avg_sq``, ``max_exp_avg_sq`` when
    amsgrad)."""
    step(
        kernels.ADAM,
        table,
        hyperparameters,
        options={"amsgrad": amsgrad, "decoupled_weight_decay": decoupled_weight_decay},
        maximize=maximize,
        controls=controls,
    )
