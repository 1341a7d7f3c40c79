"""Element-wise rules declared with :mod:`torchopt_lab.optim.rules` on the one optimizer-step
kernel skeleton (:func:`triton_kernels.optim.kernels._optimizer_step_kernel`): the rule's update, a
``@triton.jit`` function, is handed to the skeleton through the :func:`~triton_kernels.optim.
kernels.rule_update` adapter as a constexpr, so each rule compiles its own variant with the update
inlined, and one launch updates every tensor of a (device, dtype) group, with the skeleton's
unscaling, clipping, skipping and diagnostics.

The update's contract (the rule's ``triton_update``; its math is documented once, in the rule's
optimizer class)::

    @triton.jit
    def update(param, grad, states, scalars):
        exp_avg, exp_avg_sq = states          # the rule's tensor state, in declaration order
        lr, beta1, ... = scalars              # the values of rule.scalars(), in its dict's order
        ...
        return param, (exp_avg, exp_avg_sq)

``param``, ``grad`` and the states are blocks in the compute dtype (float32, or float64 for
float64 tensors); ``scalars`` are the rule's per-step scalars, computed on the host in float64 and
read here in the compute dtype (as torch rounds a Python-number scalar to its op's dtype; flags
arrive as 0.0 or 1.0). The gradient arrives negated when ``MAXIMIZE``.

The rule's per-step scalars fill the rows of the skeleton's hyperparameter table (one row per
distinct step, each tensor pointing at its own); its state fills the state rows; the step count
stays on the host, where the scalars are computed.

:func:`rule_step` checks its inputs, builds the tables and launches once.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from triton_kernels.optim import kernels, launchers
from triton_kernels.optim.tables import DEFAULT_BLOCK_SIZE, MultiTensorTable

#: Parameter dtypes the rule kernel updates (state is kept in the parameter's dtype).
RULE_DTYPES: tuple[torch.dtype, ...] = (torch.float32, torch.float64)
#: The most tensor state entries a rule may have on the kernel path (the skeleton's state rows).
MAX_STATE = kernels.STATE_SLOTS
#: Elements per program: half the built-ins' (a rule's update loads every state before it
#: computes, so it holds more registers; at 2048 float64 Adadelta, NAdam and RAdam spill).
DEFAULT_BLOCK = DEFAULT_BLOCK_SIZE // 2


def rule_step(
    update: object,
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    states: Sequence[Sequence[torch.Tensor]],
    scalar_rows: Sequence[Sequence[float]] | torch.Tensor,
    rows: Sequence[int],
    *,
    maximize: bool = False,
    block: int = DEFAULT_BLOCK,
    table: MultiTensorTable | None = None,
    controls: launchers.StepControls | None = None,
) -> MultiTensorTable | None:
    """Update ``params`` and their state in place with one launch of the kernel skeleton.

    Args:
        update: the rule's ``@triton.jit`` update (see :mod:`torchopt_lab.optim.rules`).
        params, grads: contiguous tensors of one device and one dtype from :data:`RULE_DTYPES`
            (complex ones as real views), each gradient shaped like its parameter.
        states: one list per state entry, in the update's order, each with one tensor per param.
        scalar_rows: the per-step scalars, one row (a sequence of numbers) per distinct step, or
            a float64 tensor ``[rows, scalars]`` on the parameters' device.
        rows: for each parameter, its row in ``scalar_rows``.
        maximize: negate the gradients first.
        block: elements per program (a power of two).
        table: a :class:`MultiTensorTable` (of ``block`` elements per program) kept between
            calls, so that unchanged tensors are not described to the device again.
        controls: the skeleton's GradScaler, clipping, skipping and diagnostics inputs.

    Returns the table used (None when there was nothing to update).
    """
    count = len(params)
    if not (len(grads) == len(rows) == count and all(len(s) == count for s in states)):
        raise ValueError(
            f"rule_step: {count} params, {len(grads)} grads, {len(rows)} rows and state lists of "
            f"lengths {[len(s) for s in states]}; expected one of each per param"
        )
    if len(states) > MAX_STATE:
        raise ValueError(f"rule_step: {len(states)} state entries; at most {MAX_STATE}")
    if count == 0:
        return None
    device, dtype = params[0].device, params[0].dtype
    if dtype not in RULE_DTYPES:
        raise TypeError(f"rule_step: dtype {dtype} is not supported; expected one of {RULE_DTYPES}")
    if isinstance(scalar_rows, torch.Tensor):
        hyperparameters = scalar_rows
    else:
        widths = {len(row) for row in scalar_rows}
        if len(widths) != 1:
            raise ValueError(
                f"rule_step: scalar rows of lengths {sorted(widths)}; expected one length"
            )
        hyperparameters = torch.tensor([list(row) for row in scalar_rows], dtype=torch.float64).to(
            device
        )
    tensors = [params, grads, *states]
    for tensor in (t for column in tensors for t in column):
        if tensor.device != device or tensor.dtype != dtype or not tensor.is_contiguous():
            raise ValueError(
                f"rule_step: every tensor must be contiguous, on {device} and {dtype}; got one "
                f"on {tensor.device}, {tensor.dtype}, contiguous={tensor.is_contiguous()}"
            )
    for param, grad in zip(params, grads, strict=True):
        if grad.shape != param.shape:
            raise ValueError(
                f"rule_step: gradient of shape {tuple(grad.shape)} for a parameter "
                f"of shape {tuple(param.shape)}"
            )
    if table is None:
        table = MultiTensorTable(block)
    table.update(params, grads, states, None, rows)
    launchers._launch_step(
        kernels.rule_update,
        update,
        hyperparameters.shape[1],
        len(states),
        False,
        table,
        hyperparameters,
        controls,
        maximize,
    )
    return table
