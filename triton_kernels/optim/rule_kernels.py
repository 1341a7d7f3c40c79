"""One multi-tensor kernel for every element-wise rule declared with
:mod:`torchopt_lab.optim.rules`: the rule's update is a ``@triton.jit`` function handed to the
kernel as a constexpr (``UPDATE``), so each rule compiles its own variant with the update inlined,
and one launch updates every tensor of a (device, dtype) group.

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

**Tables.** ``tensor_table``, int64 ``[2 + NUM_STATE + 2, tensor_count]``: the addresses of the
parameter, its gradient and its ``NUM_STATE`` state tensors, then each tensor's element count and
its row of ``scalar_table`` (float64 ``[rows, NUM_SCALARS]``: parameters on different steps get
different rows). ``block_table``, int64 ``[2, block_count]``: each program's tensor and the offset
of its first element. A block inside its tensor loads and stores unmasked, and with every
address 16-byte aligned (``ALIGNED``, checked by the launcher) in 128-bit accesses.

Private: call :func:`rule_step`, which checks its inputs and builds the tables.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

#: Parameter dtypes the rule kernel updates (state is kept in the parameter's dtype).
RULE_DTYPES: tuple[torch.dtype, ...] = (torch.float32, torch.float64)
#: The most tensor state entries a rule may have on the kernel path.
MAX_STATE = 4
DEFAULT_BLOCK = 1024


@triton.jit
def _tensor_pointer(
    tensor_table, row, tensor, tensor_count, DTYPE: tl.constexpr, ALIGNED: tl.constexpr
):
    pointer = tl.load(tensor_table + row * tensor_count + tensor).to(tl.pointer_type(DTYPE))
    if ALIGNED:
        # The launcher checked every address is 16-byte aligned: 128-bit loads and stores.
        pointer = tl.multiple_of(pointer, 16)
    return pointer


@triton.jit
def _load(pointer, offsets, numel, full, COMPUTE_DTYPE: tl.constexpr):
    """The block's elements in ``COMPUTE_DTYPE``; unmasked when the block lies inside its tensor."""
    if full:
        values = tl.load(pointer + offsets)
    else:
        values = tl.load(pointer + offsets, mask=offsets < numel, other=0.0)
    return values.to(COMPUTE_DTYPE)


@triton.jit
def _store(pointer, offsets, numel, full, values):
    values = values.to(pointer.dtype.element_ty)
    if full:
        tl.store(pointer + offsets, values)
    else:
        tl.store(pointer + offsets, values, mask=offsets < numel)


@triton.jit
def _rule_step_kernel(
    tensor_table,
    block_table,
    tensor_count,
    block_count,
    scalar_table,
    UPDATE: tl.constexpr,
    NUM_STATE: tl.constexpr,
    NUM_SCALARS: tl.constexpr,
    MAXIMIZE: tl.constexpr,
    DTYPE: tl.constexpr,
    COMPUTE_DTYPE: tl.constexpr,
    BLOCK: tl.constexpr,
    ALIGNED: tl.constexpr,
):
    program = tl.program_id(0)
    tensor = tl.load(block_table + program)
    start = tl.multiple_of(tl.load(block_table + block_count + program), BLOCK)
    numel = tl.load(tensor_table + (2 + NUM_STATE) * tensor_count + tensor)
    row = tl.load(tensor_table + (3 + NUM_STATE) * tensor_count + tensor)
    offsets = start + tl.arange(0, BLOCK)
    full = start + BLOCK <= numel

    param_pointer = _tensor_pointer(tensor_table, 0, tensor, tensor_count, DTYPE, ALIGNED)
    grad_pointer = _tensor_pointer(tensor_table, 1, tensor, tensor_count, DTYPE, ALIGNED)
    param = _load(param_pointer, offsets, numel, full, COMPUTE_DTYPE)
    grad = _load(grad_pointer, offsets, numel, full, COMPUTE_DTYPE)
    if MAXIMIZE:
        grad = -grad
    # Tuples grow by concatenation: Triton's frontend has no starred unpacking in a tuple display.
    states = ()
    for k in tl.static_range(NUM_STATE):
        pointer = _tensor_pointer(tensor_table, 2 + k, tensor, tensor_count, DTYPE, ALIGNED)
        values = _load(pointer, offsets, numel, full, COMPUTE_DTYPE)
        states = states + (values,)  # noqa: RUF005
    scalars = ()
    for k in tl.static_range(NUM_SCALARS):
        value = tl.load(scalar_table + row * NUM_SCALARS + k).to(COMPUTE_DTYPE)
        scalars = scalars + (value,)  # noqa: RUF005

    param, states = UPDATE(param, grad, states, scalars)

    _store(param_pointer, offsets, numel, full, param)
    for k in tl.static_range(NUM_STATE):
        pointer = _tensor_pointer(tensor_table, 2 + k, tensor, tensor_count, DTYPE, ALIGNED)
        _store(pointer, offsets, numel, full, states[k])


_TRITON_DTYPES = {torch.float32: tl.float32, torch.float64: tl.float64}


def rule_step(
    update: triton.JITFunction,
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    states: Sequence[Sequence[torch.Tensor]],
    scalar_rows: Sequence[Sequence[float]],
    rows: Sequence[int],
    *,
    maximize: bool = False,
    block: int = DEFAULT_BLOCK,
) -> None:
    """Update ``params`` and their state in place with one launch of the rule kernel.

    Args:
        update: the rule's ``@triton.jit`` update (see the module docstring).
        params, grads: contiguous tensors of one device and one dtype from :data:`RULE_DTYPES`
            (complex ones as real views), each gradient shaped like its parameter.
        states: one list per state entry, in the update's order, each with one tensor per param.
        scalar_rows: the per-step scalars, one row (a sequence of numbers) per distinct step.
        rows: for each parameter, its row in ``scalar_rows``.
        maximize: negate the gradients first.
        block: elements per program (a power of two).
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
        return
    device, dtype = params[0].device, params[0].dtype
    if dtype not in RULE_DTYPES:
        raise TypeError(f"rule_step: dtype {dtype} is not supported; expected one of {RULE_DTYPES}")
    widths = {len(row) for row in scalar_rows}
    if len(widths) != 1:
        raise ValueError(f"rule_step: scalar rows of lengths {sorted(widths)}; expected one length")
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
    numels = [p.numel() for p in params]
    table = [[t.data_ptr() for t in column] for column in tensors] + [numels, list(rows)]
    tensor_table = torch.tensor(table, dtype=torch.int64).to(device)
    block_tensors, block_starts = [], []
    for index, numel in enumerate(numels):
        starts = range(0, numel, block)
        block_tensors += [index] * len(starts)
        block_starts += starts
    if not block_tensors:
        return
    block_table = torch.tensor([block_tensors, block_starts], dtype=torch.int64).to(device)
    scalar_table = torch.tensor([list(row) for row in scalar_rows], dtype=torch.float64).to(device)
    _rule_step_kernel[(len(block_tensors),)](
        tensor_table,
        block_table,
        count,
        len(block_tensors),
        scalar_table,
        UPDATE=update,
        NUM_STATE=len(states),
        NUM_SCALARS=widths.pop(),
        MAXIMIZE=maximize,
        DTYPE=_TRITON_DTYPES[dtype],
        COMPUTE_DTYPE=_TRITON_DTYPES[dtype],
        BLOCK=block,
        ALIGNED=all(t.data_ptr() % 16 == 0 for column in tensors for t in column),
    )
