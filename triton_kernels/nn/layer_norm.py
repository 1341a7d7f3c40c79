"""Layer normalisation over the last dimension, forward and backward, several rows per program.

For a row ``x`` of ``n`` elements (the formulas and names of ``torchopt_lab/nn/_norm.py`` and
Triton's layer-norm tutorial): ``μ = mean(x)``, ``σ² = mean((x - μ)²)``, ``r = 1 / √(σ² + eps)``,
``x̂ = (x - μ) r``, ``y = w x̂ + b``. The forward keeps ``μ`` and ``r`` per row. With ``g = dL/dy``:

``dL/dx = r (w g - x̂ c_1 - c_2)``, ``c_1 = mean(x̂ ⊙ w g)``, ``c_2 = mean(w g)``,
``dL/dw = Σ_rows g x̂``, ``dL/db = Σ_rows g``.

Design: a program holds a ``[BLOCK_ROWS, BLOCK_COLUMNS]`` tile, ``BLOCK_COLUMNS`` the whole row
(so a row is read once, its statistics in registers) and ``BLOCK_ROWS`` as many rows as keep the
tile near 4096 elements (narrow rows: many rows per program). The backward runs a fixed number of
programs that stride over the row tiles, each accumulating its ``dL/dw`` and ``dL/db`` partial
sums in registers and writing them once; the ``[programs, n]`` partials are added after.

Rows wider than 32 KB in the compute dtype (8192 float32 values) would spill registers held
whole, so they take the wide kernels: the forward reads a row twice in slices (``μ`` and ``σ²``
merged slice by slice with Chan's update, then the output); the backward finds ``c_1`` and
``c_2`` per row in one pass, then a grid of (programs, column slices) writes ``dL/dx`` and the
partial parameter sums, each program striding over the rows of its column slice.

RMSNorm (:mod:`triton_kernels.nn.rms_norm`) is this normalisation with ``μ = 0``, no bias and
``c_2 = 0``: the kernels take the constexpr ``CENTERED`` (True here, False there), so both
share one set of kernels, tilings and grids (the shared helpers are in ``_common``), and the
uncentred variant compiles without the mean's reduction, loads and stores.
"""

from __future__ import annotations

from typing import cast

import torch
import triton
import triton.language as tl

from triton_kernels.nn._common import (
    backward_grid,
    backward_program_limit,
    block_shape,
    chan_merge,
    check_contiguous,
    check_rows,
    check_same,
    check_shape,
    compute_dtype,
    row_norm_grids,
    statistics_dtype,
    warps,
)


@triton.jit
def _layer_norm_forward_kernel(
    input_pointer,
    weight_pointer,
    bias_pointer,
    output_pointer,
    mean_pointer,
    rstd_pointer,
    rows,
    columns,
    eps: tl.float64,
    CENTERED: tl.constexpr,
    has_weight: tl.constexpr,
    has_bias: tl.constexpr,
    COMPUTE_DTYPE: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_COLUMNS: tl.constexpr,
):
    """``y = w (x - μ) r + b`` for ``BLOCK_ROWS`` rows of the ``[rows, columns]`` input; saves
    ``μ`` and ``r`` per row. Not ``CENTERED`` (RMSNorm): ``μ = 0``, neither computed nor saved."""
    row = tl.program_id(0).to(tl.int64) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    column = tl.arange(0, BLOCK_COLUMNS)
    row_mask = row < rows
    column_mask = column < columns
    mask = row_mask[:, None] & column_mask[None, :]
    offsets = row[:, None] * columns + column[None, :]
    x = tl.load(input_pointer + offsets, mask=mask, other=0.0).to(COMPUTE_DTYPE)
    if CENTERED:
        # μ = mean(x)
        mean = tl.sum(x, axis=1) / columns
        centered = tl.where(mask, x - mean[:, None], 0.0)
    else:
        centered = x
    # σ² = mean((x - μ)²), r = 1 / √(σ² + eps)
    variance = tl.sum(centered * centered, axis=1) / columns
    rstd = 1.0 / tl.sqrt(variance + tl.full((), eps, COMPUTE_DTYPE))
    y = centered * rstd[:, None]
    if has_weight:
        y *= tl.load(weight_pointer + column, mask=column_mask).to(COMPUTE_DTYPE)[None, :]
    if has_bias:
        y += tl.load(bias_pointer + column, mask=column_mask).to(COMPUTE_DTYPE)[None, :]
    tl.store(output_pointer + offsets, y.to(output_pointer.dtype.element_ty), mask=mask)
    if CENTERED:
        tl.store(mean_pointer + row, mean, mask=row_mask)
    tl.store(rstd_pointer + row, rstd, mask=row_mask)


@triton.jit
def _layer_norm_backward_kernel(
    grad_output_pointer,
    input_pointer,
    weight_pointer,
    mean_pointer,
    rstd_pointer,
    c1_pointer,
    c2_pointer,
    grad_input_pointer,
    grad_weight_partial_pointer,
    grad_bias_partial_pointer,
    rows,
    columns,
    CENTERED: tl.constexpr,
    has_weight: tl.constexpr,
    reduce_parameters: tl.constexpr,
    coefficients_given: tl.constexpr,
    COMPUTE_DTYPE: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_COLUMNS: tl.constexpr,
):
    """Program ``(j, p)``: ``dL/dx`` on column slice ``j`` of the row tiles ``p, p + programs,
    ...``; with ``reduce_parameters``, this slice of the program's partial ``Σ g x̂`` and ``Σ g``
    to its row of the ``[programs, columns]`` partials. The column slices go along grid axis 0
    (a wide row may have more than 65535) and the programs along axis 1 (:func:`backward_grid`).

    Whole rows (one column slice): ``c_1`` and ``c_2`` are computed here. Wide rows
    (``coefficients_given``): they are read from ``c1_pointer`` and ``c2_pointer``, which
    :func:`_layer_norm_wide_coefficients_kernel` filled. Not ``CENTERED`` (RMSNorm): ``μ = 0``
    and ``c_2 = 0``, neither read, and no bias partials.
    """
    program = tl.program_id(1)
    programs = tl.num_programs(1)
    column = tl.program_id(0) * BLOCK_COLUMNS + tl.arange(0, BLOCK_COLUMNS)
    column_mask = column < columns
    if has_weight:
        weight = tl.load(weight_pointer + column, mask=column_mask).to(COMPUTE_DTYPE)
    grad_weight = tl.zeros((BLOCK_COLUMNS,), COMPUTE_DTYPE)
    if CENTERED:
        grad_bias = tl.zeros((BLOCK_COLUMNS,), COMPUTE_DTYPE)
    for tile in range(program, tl.cdiv(rows, BLOCK_ROWS), programs):
        if coefficients_given:
            # Wide rows: fewer than 2³¹ / 8192 of them, so no row index nears 2³¹ (and the
            # int64 add below costs this variant an 8-byte spill on sm_80).
            row = (tile * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)).to(tl.int64)
        else:
            # The tile's first row (below rows, int32) added to an int64 arange: the last tile's
            # masked rows may pass 2³¹ - 1 (2³¹ - 1 rows of width 1), and an int32 row would
            # wrap to a negative one that passes row < rows
            row = tl.arange(0, BLOCK_ROWS).to(tl.int64) + tile * BLOCK_ROWS
        row_mask = row < rows
        mask = row_mask[:, None] & column_mask[None, :]
        offsets = row[:, None] * columns + column[None, :]
        x = tl.load(input_pointer + offsets, mask=mask, other=0.0).to(COMPUTE_DTYPE)
        g = tl.load(grad_output_pointer + offsets, mask=mask, other=0.0).to(COMPUTE_DTYPE)
        if CENTERED:
            mean = tl.load(mean_pointer + row, mask=row_mask, other=0.0)
        rstd = tl.load(rstd_pointer + row, mask=row_mask, other=0.0)
        if CENTERED:
            # x̂ = (x - μ) r
            normalized = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
        else:
            # x̂ = x r (masked lanes loaded as 0)
            normalized = x * rstd[:, None]
        # w g
        grad_normalized = g * weight[None, :] if has_weight else g
        if coefficients_given:
            c1 = tl.load(c1_pointer + row, mask=row_mask, other=0.0)
            if CENTERED:
                c2 = tl.load(c2_pointer + row, mask=row_mask, other=0.0)
        else:
            # c_1 = mean(x̂ ⊙ w g), c_2 = mean(w g)
            c1 = tl.sum(normalized * grad_normalized, axis=1) / columns
            if CENTERED:
                c2 = tl.sum(grad_normalized, axis=1) / columns
        if CENTERED:
            # dL/dx = r (w g - x̂ c_1 - c_2)
            grad_input = rstd[:, None] * (grad_normalized - normalized * c1[:, None] - c2[:, None])
        else:
            # dL/dx = r (w g - x̂ c_1)
            grad_input = rstd[:, None] * (grad_normalized - normalized * c1[:, None])
        tl.store(
            grad_input_pointer + offsets,
            grad_input.to(grad_input_pointer.dtype.element_ty),
            mask=mask,
        )
        if reduce_parameters:
            # dL/dw += Σ g x̂, dL/db += Σ g (this tile's rows)
            grad_weight += tl.sum(g * normalized, axis=0)
            if CENTERED:
                grad_bias += tl.sum(g, axis=0)
    if reduce_parameters:
        partial = program * columns + column
        tl.store(grad_weight_partial_pointer + partial, grad_weight, mask=column_mask)
        if CENTERED:
            tl.store(grad_bias_partial_pointer + partial, grad_bias, mask=column_mask)


@triton.jit
def _layer_norm_wide_forward_kernel(
    input_pointer,
    weight_pointer,
    bias_pointer,
    output_pointer,
    mean_pointer,
    rstd_pointer,
    columns,
    eps: tl.float64,
    CENTERED: tl.constexpr,
    has_weight: tl.constexpr,
    has_bias: tl.constexpr,
    COMPUTE_DTYPE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """One wide row in ``BLOCK`` slices: ``μ``, ``σ²`` merged slice by slice, then ``y``. Not
    ``CENTERED`` (RMSNorm): ``μ = 0`` and ``M₂ = Σ x²``, summed slice by slice."""
    row = tl.program_id(0).to(tl.int64)
    input_row = input_pointer + row * columns
    output_row = output_pointer + row * columns
    count = tl.full((), 0.0, COMPUTE_DTYPE)
    mean = tl.full((), 0.0, COMPUTE_DTYPE)
    m2 = tl.full((), 0.0, COMPUTE_DTYPE)
    squares = tl.zeros((BLOCK,), COMPUTE_DTYPE)
    for start in range(0, columns, BLOCK):
        column = start + tl.arange(0, BLOCK)
        mask = column < columns
        x = tl.load(input_row + column, mask=mask, other=0.0).to(COMPUTE_DTYPE)
        if CENTERED:
            block_count = tl.sum(mask.to(COMPUTE_DTYPE), axis=0)
            block_mean = tl.sum(x, axis=0) / block_count
            centered = tl.where(mask, x - block_mean, 0.0)
            count, mean, m2 = chan_merge(
                count, mean, m2, block_count, block_mean, tl.sum(centered * centered, axis=0)
            )
        else:
            # Σ x², lane by lane (no cancellation: every term is positive)
            squares += x * x
    if not CENTERED:
        m2 = tl.sum(squares, axis=0)
    # r = 1 / √(σ² + eps), σ² = M₂ / n
    rstd = 1.0 / tl.sqrt(m2 / columns + tl.full((), eps, COMPUTE_DTYPE))
    if CENTERED:
        tl.store(mean_pointer + row, mean)
    tl.store(rstd_pointer + row, rstd)
    for start in range(0, columns, BLOCK):
        column = start + tl.arange(0, BLOCK)
        mask = column < columns
        x = tl.load(input_row + column, mask=mask).to(COMPUTE_DTYPE)
        # y = w (x - μ) r + b
        y = (x - mean) * rstd
        if has_weight:
            y *= tl.load(weight_pointer + column, mask=mask).to(COMPUTE_DTYPE)
        if has_bias:
            y += tl.load(bias_pointer + column, mask=mask).to(COMPUTE_DTYPE)
        tl.store(output_row + column, y.to(output_pointer.dtype.element_ty), mask=mask)


@triton.jit
def _layer_norm_wide_coefficients_kernel(
    grad_output_pointer,
    input_pointer,
    weight_pointer,
    mean_pointer,
    rstd_pointer,
    c1_pointer,
    c2_pointer,
    columns,
    CENTERED: tl.constexpr,
    has_weight: tl.constexpr,
    COMPUTE_DTYPE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """One wide row in slices: ``c_1 = mean(x̂ ⊙ w g)`` and ``c_2 = mean(w g)`` (not
    ``CENTERED``: ``μ = 0``, and ``c_2`` is not needed)."""
    row = tl.program_id(0).to(tl.int64)
    mean = tl.load(mean_pointer + row) if CENTERED else tl.full((), 0.0, COMPUTE_DTYPE)
    rstd = tl.load(rstd_pointer + row)
    c1 = tl.zeros((BLOCK,), COMPUTE_DTYPE)
    c2 = tl.zeros((BLOCK,), COMPUTE_DTYPE)
    for start in range(0, columns, BLOCK):
        column = start + tl.arange(0, BLOCK)
        mask = column < columns
        x = tl.load(input_pointer + row * columns + column, mask=mask, other=0.0)
        g = tl.load(grad_output_pointer + row * columns + column, mask=mask, other=0.0)
        g = g.to(COMPUTE_DTYPE)
        if has_weight:
            g *= tl.load(weight_pointer + column, mask=mask, other=0.0).to(COMPUTE_DTYPE)
        # x̂ ⊙ w g and w g
        c1 += tl.where(mask, (x.to(COMPUTE_DTYPE) - mean) * rstd, 0.0) * g
        c2 += g
    tl.store(c1_pointer + row, tl.sum(c1, axis=0) / columns)
    if CENTERED:
        tl.store(c2_pointer + row, tl.sum(c2, axis=0) / columns)


__all__ = [
    "backward_grid",
    "block_shape",
    "layer_norm_backward",
    "layer_norm_forward",
    "row_norm_backward",
    "row_norm_forward",
    "row_norm_grids",
]


def row_norm_forward(
    name: str,
    input: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    centered: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``(y, μ, r)`` of layer norm (``centered``) or RMSNorm (``μ`` None, not computed) over
    the last dimension of ``input``, checked under ``name``."""
    check_rows(name, input, weight=weight, bias=bias)
    rows, columns, wide, block_rows, block_columns = block_shape(input.shape, input.dtype)
    grid, _ = row_norm_grids(input.shape, input.dtype, 1)
    output = torch.empty_like(input)
    dtype = statistics_dtype(input.dtype)
    # Rows of width 0 launch nothing: their statistics over no values stay NaN.
    mean = torch.full((rows,), float("nan"), dtype=dtype, device=input.device) if centered else None
    rstd = torch.full((rows,), float("nan"), dtype=dtype, device=input.device)
    common = {
        "eps": float(eps),
        "CENTERED": centered,
        "has_weight": weight is not None,
        "has_bias": bias is not None,
        "COMPUTE_DTYPE": compute_dtype(input.dtype),
    }
    pointers = (
        input,
        input if weight is None else weight,
        input if bias is None else bias,
        output,
        rstd if mean is None else mean,  # not read or written unless centered
        rstd,
    )
    if input.numel() and wide:
        _layer_norm_wide_forward_kernel[grid](
            *pointers,
            columns,
            **common,
            BLOCK=block_columns,
            num_warps=warps(block_columns, input.dtype),
        )
    elif input.numel():
        _layer_norm_forward_kernel[grid](
            *pointers,
            rows,
            columns,
            **common,
            BLOCK_ROWS=block_rows,
            BLOCK_COLUMNS=block_columns,
            num_warps=warps(block_rows * block_columns, input.dtype),
        )
    return output, mean, rstd


def row_norm_backward(
    name: str,
    grad_output: torch.Tensor,
    input: torch.Tensor,
    weight: torch.Tensor | None,
    mean: torch.Tensor | None,
    rstd: torch.Tensor,
    compute_parameter_grads: bool,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """``(dL/dx, dL/dw, dL/db)`` of layer norm (``mean`` given) or RMSNorm (``mean`` None; then
    ``dL/db`` is None); the parameter gradients are None unless ``compute_parameter_grads``."""
    check_rows(name, input, weight=weight)
    check_same(name, input, grad_output=grad_output)
    check_shape(name, "grad_output", grad_output, tuple(input.shape))
    check_contiguous(name, grad_output=grad_output)
    rows, columns, wide, block_rows, block_columns = block_shape(input.shape, input.dtype)
    dtype = statistics_dtype(input.dtype)
    centered = mean is not None
    for argument, tensor in (("mean", mean), ("rstd", rstd)):
        if tensor is None:
            continue
        check_shape(name, argument, tensor, (rows,))
        if tensor.dtype != dtype:
            raise RuntimeError(f"{name}: expected {argument} of dtype {dtype}, got {tensor.dtype}")
        if tensor.device != input.device:
            raise RuntimeError(
                f"{name}: expected {argument} on {input.device}, got {tensor.device}"
            )
    grad_input = torch.empty_like(input)
    _, grid = row_norm_grids(input.shape, input.dtype, backward_program_limit(input.device))
    programs = grid[1]
    partial_weight = torch.zeros(programs, columns, dtype=dtype, device=input.device)
    partial_bias = (
        torch.zeros(programs, columns, dtype=dtype, device=input.device) if centered else rstd
    )
    statistics = (rstd if mean is None else mean, rstd)  # the mean is read only if centered
    if input.numel() and wide:
        c1, c2 = (torch.empty(rows, dtype=dtype, device=input.device) for _ in range(2))
        _layer_norm_wide_coefficients_kernel[(rows,)](
            grad_output,
            input,
            input if weight is None else weight,
            *statistics,
            c1,
            c2,
            columns,
            CENTERED=centered,
            has_weight=weight is not None,
            COMPUTE_DTYPE=compute_dtype(input.dtype),
            BLOCK=block_columns,
            num_warps=warps(block_columns, input.dtype),
        )
    else:
        c1 = c2 = rstd  # not read: whole rows compute their coefficients in the kernel
    if input.numel():
        _layer_norm_backward_kernel[grid](
            grad_output,
            input,
            input if weight is None else weight,
            *statistics,
            c1,
            c2,
            grad_input,
            partial_weight,
            partial_bias,
            rows,
            columns,
            CENTERED=centered,
            has_weight=weight is not None,
            # layer norm's dL/db needs no weight; RMSNorm without a weight has no parameter
            reduce_parameters=compute_parameter_grads and (centered or weight is not None),
            coefficients_given=wide,
            COMPUTE_DTYPE=compute_dtype(input.dtype),
            BLOCK_ROWS=block_rows,
            BLOCK_COLUMNS=block_columns,
            num_warps=warps(block_rows * block_columns, input.dtype),
        )
    if not compute_parameter_grads:
        return grad_input, None, None
    if not centered:
        # RMSNorm's only parameter is its weight
        return grad_input, None if weight is None else partial_weight.sum(0).to(input.dtype), None
    return grad_input, partial_weight.sum(0).to(input.dtype), partial_bias.sum(0).to(input.dtype)


def layer_norm_forward(
    input: torch.Tensor,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(y, μ, r)`` normalising the last dimension of the contiguous ``input``; ``weight`` and
    ``bias`` of shape ``[columns]`` or None; ``μ`` and ``r`` of shape ``[rows]`` in the compute
    dtype."""
    output, mean, rstd = row_norm_forward(
        "layer_norm_forward", input, weight, bias, eps, centered=True
    )
    return output, cast(torch.Tensor, mean), rstd


def layer_norm_backward(
    grad_output: torch.Tensor,
    input: torch.Tensor,
    weight: torch.Tensor | None,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    compute_parameter_grads: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """``(dL/dx, dL/dw, dL/db)`` from ``grad_output`` and the forward's ``input``, ``weight``,
    ``μ`` and ``r``; the parameter gradients are None unless ``compute_parameter_grads``."""
    return row_norm_backward(
        "layer_norm_backward", grad_output, input, weight, mean, rstd, compute_parameter_grads
    )
