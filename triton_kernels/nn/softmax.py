"""Softmax and log-softmax over the last dimension, forward and backward, one program per row.

With ``m = max_j x_j`` and ``lse = m + log Σ_j exp(x_j - m)`` (found in one pass over the row,
rescaling the running sum whenever the running maximum grows, so rows of any width work):
``softmax: y = exp(x - lse)``, ``log_softmax: y = x - lse``. Backward, with ``g = dL/dy``:
``softmax: dL/dx = y ⊙ (g - Σ_j g_j y_j)``, ``log_softmax: dL/dx = g - exp(y) Σ_j g_j`` (the
formulas of ``torchopt_lab/nn/_softmax.py``).

Another dimension ``dim`` is handled by moving it last: the launchers take ``dim`` and run on
``input.movedim(dim, -1).contiguous()`` (one copy when ``dim`` is not already last), returning the
result moved back, so the output has the input's shape.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from triton_kernels.nn._common import (
    check_floating,
    check_numel,
    check_same,
    check_shape,
    compute_dtype,
    statistics_dtype,
    warps,
)

_MAX_BLOCK = 4096
_ROW_TILE = 2048


@triton.jit
def row_log_sum_exp(row_pointer, columns, COMPUTE_DTYPE: tl.constexpr, BLOCK: tl.constexpr):
    """``(m, log Σ_j exp(x_j - m))`` of the ``columns`` contiguous values at ``row_pointer``, in
    one pass: ``(m, s) ← (max(m, max(block)), s exp(m - m') + Σ exp(block - m'))``. Kept apart,
    as ``x - m - log s`` is exact where ``x - lse`` would round ``lse`` to ``x``'s magnitude."""
    maximum = tl.full((), float("-inf"), COMPUTE_DTYPE)
    total = tl.full((), 0.0, COMPUTE_DTYPE)
    for start in range(0, columns, BLOCK):
        column = start + tl.arange(0, BLOCK)
        x = tl.load(row_pointer + column, mask=column < columns, other=float("-inf"))
        x = x.to(COMPUTE_DTYPE)
        new_maximum = tl.maximum(maximum, tl.max(x, axis=0))
        # A row of -inf so far keeps the maximum at -inf; exp(-inf - -inf) would be NaN.
        shift = tl.where(new_maximum == float("-inf"), 0.0, new_maximum)
        total = total * tl.exp(maximum - shift) + tl.sum(tl.exp(x - shift), axis=0)
        maximum = new_maximum
    return maximum, tl.log(total)


@triton.jit
def _softmax_forward_kernel(
    input_pointer,
    output_pointer,
    log_sum_exp_pointer,
    rows,
    columns,
    take_log: tl.constexpr,
    whole_row: tl.constexpr,
    COMPUTE_DTYPE: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Rows of ``[rows, columns]``: each row's ``lse`` (saved) and ``exp(x - lse)`` or ``x - lse``.
    With ``whole_row`` (``columns <= BLOCK``) a program holds ``BLOCK_ROWS`` whole rows, read once
    and kept in registers; otherwise one row, read in ``BLOCK`` slices."""
    if whole_row:
        row = tl.program_id(0).to(tl.int64) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
        column = tl.arange(0, BLOCK)
        mask = (row[:, None] < rows) & (column[None, :] < columns)
        offsets = row[:, None] * columns + column[None, :]
        x = tl.load(input_pointer + offsets, mask=mask, other=float("-inf")).to(COMPUTE_DTYPE)
        # Rows past the end read as zeros, which keeps their (unstored) arithmetic finite.
        x = tl.where(row[:, None] < rows, x, 0.0)
        maximum = tl.max(x, axis=1)
        log_total = tl.log(tl.sum(tl.exp(x - maximum[:, None]), axis=1))
        # x - lse, as (x - m) - log s
        shifted = (x - maximum[:, None]) - log_total[:, None]
        y = shifted if take_log else tl.exp(shifted)
        tl.store(output_pointer + offsets, y.to(output_pointer.dtype.element_ty), mask=mask)
        tl.store(log_sum_exp_pointer + row, maximum + log_total, mask=row < rows)
    else:
        row = tl.program_id(0).to(tl.int64)
        input_row = input_pointer + row * columns
        output_row = output_pointer + row * columns
        maximum, log_total = row_log_sum_exp(input_row, columns, COMPUTE_DTYPE, BLOCK)
        for start in range(0, columns, BLOCK):
            column = start + tl.arange(0, BLOCK)
            mask = column < columns
            x = tl.load(input_row + column, mask=mask).to(COMPUTE_DTYPE)
            # x - lse, as (x - m) - log s
            shifted = (x - maximum) - log_total
            y = shifted if take_log else tl.exp(shifted)
            tl.store(output_row + column, y.to(output_pointer.dtype.element_ty), mask=mask)
        tl.store(log_sum_exp_pointer + row, maximum + log_total)


@triton.jit
def _softmax_gradient(g, y, c, take_log: tl.constexpr):
    if take_log:  # noqa: SIM108 (one derivative comment per branch)
        # dL/dx = g - exp(y) Σ_j g_j
        grad = g - tl.exp(y) * c
    else:
        # dL/dx = y (g - Σ_j g_j y_j)
        grad = y * (g - c)
    return grad


@triton.jit
def _softmax_backward_kernel(
    grad_output_pointer,
    output_pointer,
    grad_input_pointer,
    rows,
    columns,
    take_log: tl.constexpr,
    whole_row: tl.constexpr,
    COMPUTE_DTYPE: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Per row: ``c = Σ_j g_j y_j`` (softmax) or ``c = Σ_j g_j`` (log_softmax), then
    ``dL/dx = y (g - c)`` or ``g - exp(y) c``. With ``whole_row``, ``BLOCK_ROWS`` rows per program,
    each read once."""
    if whole_row:
        row = tl.program_id(0).to(tl.int64) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
        column = tl.arange(0, BLOCK)
        mask = (row[:, None] < rows) & (column[None, :] < columns)
        offsets = row[:, None] * columns + column[None, :]
        g = tl.load(grad_output_pointer + offsets, mask=mask, other=0.0).to(COMPUTE_DTYPE)
        y = tl.load(output_pointer + offsets, mask=mask, other=0.0).to(COMPUTE_DTYPE)
        c = tl.sum(g, axis=1) if take_log else tl.sum(g * y, axis=1)
        grad = _softmax_gradient(g, y, c[:, None], take_log)
        tl.store(
            grad_input_pointer + offsets, grad.to(grad_input_pointer.dtype.element_ty), mask=mask
        )
    else:
        row = tl.program_id(0).to(tl.int64)
        grad_output_row = grad_output_pointer + row * columns
        output_row = output_pointer + row * columns
        grad_input_row = grad_input_pointer + row * columns
        c = tl.full((), 0.0, COMPUTE_DTYPE)
        for start in range(0, columns, BLOCK):
            column = start + tl.arange(0, BLOCK)
            mask = column < columns
            g = tl.load(grad_output_row + column, mask=mask, other=0.0).to(COMPUTE_DTYPE)
            if take_log:
                c += tl.sum(g, axis=0)
            else:
                y = tl.load(output_row + column, mask=mask, other=0.0).to(COMPUTE_DTYPE)
                c += tl.sum(g * y, axis=0)
        for start in range(0, columns, BLOCK):
            column = start + tl.arange(0, BLOCK)
            mask = column < columns
            g = tl.load(grad_output_row + column, mask=mask).to(COMPUTE_DTYPE)
            y = tl.load(output_row + column, mask=mask).to(COMPUTE_DTYPE)
            grad = _softmax_gradient(g, y, c, take_log)
            tl.store(
                grad_input_row + column, grad.to(grad_input_pointer.dtype.element_ty), mask=mask
            )


def block_size(columns: int, element_size: int) -> int:
    """Columns per loop step: the whole row when it fits in 16 KB, else 16 KB slices."""
    return min(triton.next_power_of_2(max(columns, 1)), _MAX_BLOCK * 4 // element_size)


def _launch_shape(rows: int, columns: int, element_size: int) -> tuple[int, int, bool, int]:
    """``(programs, BLOCK_ROWS, whole_row, BLOCK)``: narrow rows several to a program (tiles of
    about 2048 values), a row wider than one block alone in its program."""
    block = block_size(columns, element_size)
    whole_row = columns <= block
    block_rows = 1
    if whole_row:
        block_rows = min(max(_ROW_TILE // block, 1), triton.next_power_of_2(max(rows, 1)))
    return triton.cdiv(rows, block_rows), block_rows, whole_row, block


def _last(input: torch.Tensor, dim: int) -> torch.Tensor:
    """``input`` with ``dim`` moved last, contiguous (a copy unless it already was)."""
    if input.dim() == 0:
        return input.reshape(1)
    if not -input.dim() <= dim < input.dim():
        raise IndexError(
            f"Dimension out of range (expected to be in range of [{-input.dim()}, "
            f"{input.dim() - 1}], but got {dim})"
        )
    return input.movedim(dim, -1).contiguous()


def _back(result: torch.Tensor, like: torch.Tensor, dim: int) -> torch.Tensor:
    return result.reshape(()) if like.dim() == 0 else result.movedim(-1, dim)


def softmax_forward(
    input: torch.Tensor, dim: int = -1, log: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(softmax(input, dim), lse)`` (``log_softmax`` when ``log``), ``lse`` the per-row
    log-sum-exp in the compute dtype, of the input's shape without ``dim``."""
    name = "log_softmax_forward" if log else "softmax_forward"
    check_floating(name, "input", input)
    check_numel(name, input)
    rows_input = _last(input, dim)
    columns = rows_input.shape[-1]
    output = torch.empty_like(rows_input)
    # log Σ over no columns is -inf; rows of width 0 launch nothing and keep it
    lse = torch.full(
        rows_input.shape[:-1],
        float("-inf"),
        dtype=statistics_dtype(input.dtype),
        device=input.device,
    )
    rows = lse.numel()
    programs, block_rows, whole_row, block = _launch_shape(rows, columns, input.element_size())
    if rows_input.numel():
        _softmax_forward_kernel[(programs,)](
            rows_input,
            output,
            lse,
            rows,
            columns,
            take_log=log,
            whole_row=whole_row,
            COMPUTE_DTYPE=compute_dtype(input.dtype),
            BLOCK_ROWS=block_rows,
            BLOCK=block,
            num_warps=warps(block_rows * block, input.dtype),
        )
    return _back(output, input, dim), lse.reshape(()) if input.dim() == 0 else lse


def softmax_backward(
    grad_output: torch.Tensor, output: torch.Tensor, dim: int = -1, log: bool = False
) -> torch.Tensor:
    """``dL/dx`` from ``grad_output`` and the forward's ``output`` (softmax or, when ``log``,
    log_softmax along ``dim``)."""
    name = "log_softmax_backward" if log else "softmax_backward"
    check_floating(name, "output", output)
    check_same(name, output, grad_output=grad_output)
    check_shape(name, "grad_output", grad_output, tuple(output.shape))
    check_numel(name, output)
    rows_output = _last(output, dim)
    rows_grad = _last(grad_output, dim)
    columns = rows_output.shape[-1]
    grad_input = torch.empty_like(rows_output)
    rows = rows_output.numel() // columns if columns else 0
    programs, block_rows, whole_row, block = _launch_shape(rows, columns, output.element_size())
    if rows_output.numel():
        _softmax_backward_kernel[(programs,)](
            rows_grad,
            rows_output,
            grad_input,
            rows,
            columns,
            take_log=log,
            whole_row=whole_row,
            COMPUTE_DTYPE=compute_dtype(output.dtype),
            BLOCK_ROWS=block_rows,
            BLOCK=block,
            num_warps=warps(block_rows * block, output.dtype),
        )
    return _back(grad_input, output, dim)
