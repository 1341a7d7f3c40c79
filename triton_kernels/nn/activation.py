"""Bias + activation, fused, forward and backward: the epilogue of a GEMM (``linear``).

``h`` of shape ``[*, columns]`` (the GEMM's output, or any tensor when ``bias`` is None), ``b`` of
shape ``[columns]``: ``z = h + b``, ``y = f(z)``. The backward turns ``g = dL/dy`` into
``dL/dz = g f'(z)`` (which is ``dL/dh``) and, in the same pass, each program's partial column sums
of ``dL/dz``; ``dL/db = Σ_rows dL/dz`` adds those partials after. The derivative is read from
``y`` where ``f'`` is a function of ``y`` (relu, sigmoid, tanh: nothing more is kept than the
output the next layer keeps anyway), from ``z = h + b`` otherwise (leaky_relu, both GELUs).

Activations (``a`` the negative slope, ``Φ``/``φ`` the standard normal CDF/density,
``u = √(2/π) (z + 0.044715 z³)``); the formulas are those of ``torchopt_lab/nn/_activation.py``:

====================  =========================  =============================================
``activation``        ``f(z)``                   ``f'``
====================  =========================  =============================================
``"identity"``        ``z``                      ``1``
``"relu"``            ``max(z, 0)``              ``1[y > 0 or y is NaN]``
``"leaky_relu"``      ``z if z > 0 else a z``    ``1 if z > 0 else a``
``"sigmoid"``         ``1 / (1 + e^{-z})``       ``y (1 - y)``
``"tanh"``            ``tanh z``                 ``1 - y²``
``"gelu"``            ``z Φ(z)``                 ``Φ(z) + z φ(z)``
``"gelu_tanh"``       ``z (1 + tanh u) / 2``     ``s + 2 z s (1 - s) u'``, ``s = σ(2u)``
``"silu"``            ``z σ(z)``                 ``σ(z) (1 + z (1 - σ(z)))``
====================  =========================  =============================================
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from triton_kernels.nn._common import (
    check_contiguous,
    check_floating,
    check_numel,
    check_same,
    check_shape,
    compute_dtype,
    statistics_dtype,
    tanh,
    warps,
)

ACTIVATIONS = ("identity", "relu", "leaky_relu", "sigmoid", "tanh", "gelu", "gelu_tanh", "silu")
# Activations whose derivative is a function of the output y (the rest need z = h + b).
OUTPUT_DERIVATIVE = ("identity", "relu", "sigmoid", "tanh")
_TILE = 2048
_MAX_BLOCK_COLUMNS = 1024


@triton.jit
def _activate(z, negative_slope, ACTIVATION: tl.constexpr):
    if ACTIVATION == "relu":
        # z where not negative: NaN stays NaN (as torch's clamp; tl.maximum(NaN, 0) would be 0)
        y = tl.where(z < 0, 0.0, z)
    elif ACTIVATION == "leaky_relu":
        y = tl.where(z > 0, z, z * negative_slope)
    elif ACTIVATION == "sigmoid":
        y = tl.sigmoid(z)
    elif ACTIVATION == "tanh":
        y = tanh(z)
    elif ACTIVATION == "gelu":
        # z Φ(z), Φ(z) = (1 + erf(z / √2)) / 2
        y = 0.5 * z * (1.0 + tl.erf(z * 0.7071067811865476))
    elif ACTIVATION == "gelu_tanh":
        # z (1 + tanh u) / 2 = z σ(2u), u = √(2/π) (z + 0.044715 z³); σ(2u) keeps its precision
        # where 1 + tanh u would cancel (large negative z)
        y = z * tl.sigmoid(1.5957691216057308 * (z + 0.044715 * z * z * z))
    elif ACTIVATION == "silu":
        y = z * tl.sigmoid(z)
    else:
        y = z
    return y


@triton.jit
def _derivative(saved, negative_slope, ACTIVATION: tl.constexpr):
    """``f'`` from ``saved``: ``y`` for the activations of OUTPUT_DERIVATIVE, ``z`` otherwise
    (relu's backward selects ``g`` instead, see the backward kernel)."""
    if ACTIVATION == "leaky_relu":
        one = tl.full(saved.shape, 1.0, saved.dtype)
        d = tl.where(saved > 0, one, tl.full(saved.shape, negative_slope, saved.dtype))
    elif ACTIVATION == "sigmoid":
        d = saved * (1.0 - saved)
    elif ACTIVATION == "tanh":
        d = 1.0 - saved * saved
    elif ACTIVATION == "gelu":
        # Φ(z) + z φ(z), φ(z) = exp(-z² / 2) / √(2π)
        cdf = 0.5 * (1.0 + tl.erf(saved * 0.7071067811865476))
        d = cdf + saved * 0.3989422804014327 * tl.exp(-0.5 * saved * saved)
    elif ACTIVATION == "gelu_tanh":
        # s = σ(2u) = (1 + t) / 2, so (1 - t²) / 2 = 2 s (1 - s)
        s = tl.sigmoid(1.5957691216057308 * (saved + 0.044715 * saved * saved * saved))
        # u' = √(2/π) (1 + 3 · 0.044715 z²)
        du = 0.7978845608028654 * (1.0 + 0.134145 * saved * saved)
        d = s + 2.0 * saved * s * (1.0 - s) * du
    elif ACTIVATION == "silu":
        # σ(z) (1 + z (1 - σ(z)))
        s = tl.sigmoid(saved)
        d = s * (1.0 + saved * (1.0 - s))
    else:
        d = tl.full(saved.shape, 1.0, saved.dtype)
    return d


@triton.jit
def _bias_activation_forward_kernel(
    input_pointer,
    bias_pointer,
    output_pointer,
    rows,
    columns,
    negative_slope: tl.float64,
    ACTIVATION: tl.constexpr,
    add_bias: tl.constexpr,
    COMPUTE_DTYPE: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_COLUMNS: tl.constexpr,
):
    """``y = f(h + b)`` on a ``[BLOCK_ROWS, BLOCK_COLUMNS]`` tile of the row-major ``[rows,
    columns]`` ``h``; the tiles are numbered row-major along grid axis 0 (:func:`launch_grid`)."""
    column_tiles = tl.cdiv(columns, BLOCK_COLUMNS)
    # int64 rows: the last tile's masked rows may pass 2³¹ - 1, and a wrapped (negative) row
    # would pass the row < rows mask
    row_start = ((tl.program_id(0) // column_tiles) * BLOCK_ROWS).to(tl.int64)
    row = row_start + tl.arange(0, BLOCK_ROWS)
    column = (tl.program_id(0) % column_tiles) * BLOCK_COLUMNS + tl.arange(0, BLOCK_COLUMNS)
    mask = (row[:, None] < rows) & (column[None, :] < columns)
    offsets = row[:, None] * columns + column[None, :]
    z = tl.load(input_pointer + offsets, mask=mask).to(COMPUTE_DTYPE)
    if add_bias:
        bias = tl.load(bias_pointer + column, mask=column < columns).to(COMPUTE_DTYPE)
        z += bias[None, :]
    # the slope in the compute dtype (a float64 scalar would promote z)
    y = _activate(z, tl.full((), negative_slope, COMPUTE_DTYPE), ACTIVATION)
    tl.store(output_pointer + offsets, y.to(output_pointer.dtype.element_ty), mask=mask)


@triton.jit
def _bias_activation_backward_kernel(
    grad_output_pointer,
    saved_pointer,
    bias_pointer,
    grad_input_pointer,
    grad_bias_partial_pointer,
    rows,
    columns,
    negative_slope: tl.float64,
    ACTIVATION: tl.constexpr,
    add_bias: tl.constexpr,
    reduce_bias: tl.constexpr,
    COMPUTE_DTYPE: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_COLUMNS: tl.constexpr,
):
    """``dL/dz = g f'`` on one tile (numbered as in the forward); with ``reduce_bias``, the tile's
    column sums of ``dL/dz`` go to its row tile's row of the ``[row_tiles, columns]`` partial
    sums."""
    column_tiles = tl.cdiv(columns, BLOCK_COLUMNS)
    row_tile = tl.program_id(0) // column_tiles
    # int64 rows, as in the forward
    row = (row_tile * BLOCK_ROWS).to(tl.int64) + tl.arange(0, BLOCK_ROWS)
    column = (tl.program_id(0) % column_tiles) * BLOCK_COLUMNS + tl.arange(0, BLOCK_COLUMNS)
    mask = (row[:, None] < rows) & (column[None, :] < columns)
    offsets = row[:, None] * columns + column[None, :]
    g = tl.load(grad_output_pointer + offsets, mask=mask).to(COMPUTE_DTYPE)
    saved = tl.load(saved_pointer + offsets, mask=mask).to(COMPUTE_DTYPE)
    if add_bias:
        bias = tl.load(bias_pointer + column, mask=column < columns).to(COMPUTE_DTYPE)
        saved += bias[None, :]
    if ACTIVATION == "relu":
        # dL/dz = g where y > 0 or y is NaN, exactly 0 where y <= 0 even for a non-finite g
        # (torch's threshold_backward; g · 1[y > 0] would be NaN there and 0 at a NaN y)
        grad = tl.where(mask & ~(saved <= 0), g, 0.0)
    else:
        # dL/dz = g f'
        slope = tl.full((), negative_slope, COMPUTE_DTYPE)
        grad = tl.where(mask, g * _derivative(saved, slope, ACTIVATION), 0.0)
    tl.store(grad_input_pointer + offsets, grad.to(grad_input_pointer.dtype.element_ty), mask=mask)
    if reduce_bias:
        partial = tl.sum(grad, axis=0)
        tl.store(
            grad_bias_partial_pointer + row_tile * columns + column,
            partial,
            mask=column < columns,
        )


def _check_activation(name: str, activation: str) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(
            f"{name}: unknown activation {activation!r}; expected one of {ACTIVATIONS}"
        )


def launch_grid(rows: int, columns: int) -> tuple[tuple[int], int, int]:
    """``(grid, BLOCK_ROWS, BLOCK_COLUMNS)`` of the bias + activation kernels on ``[rows,
    columns]``: tiles of about ``_TILE`` elements (whole short rows), one program each, all along
    grid axis 0, whose CUDA limit is 2³¹ - 1 (axes 1 and 2 stop at 65535, which the 97657 column
    tiles of a 1e8-element row would pass). Every program holds at least one element, so a
    launch within :data:`~triton_kernels.nn._common.MAX_NUMEL` stays within the limit."""
    block_columns = min(triton.next_power_of_2(max(columns, 1)), _MAX_BLOCK_COLUMNS)
    block_rows = min(max(_TILE // block_columns, 1), triton.next_power_of_2(max(rows, 1)))
    tiles = triton.cdiv(rows, block_rows) * triton.cdiv(columns, block_columns)
    return (tiles,), block_rows, block_columns


def _as_rows(name: str, input: torch.Tensor, bias: torch.Tensor | None) -> tuple[int, int]:
    check_floating(name, "input", input)
    check_contiguous(name, input=input, bias=bias)
    check_numel(name, input)
    columns = input.shape[-1] if input.dim() else 1
    if bias is not None:
        if input.dim() == 0:
            raise RuntimeError(f"{name}: a bias needs an input of at least 1 dimension, got 0-D")
        check_same(name, input, bias=bias)
        check_shape(name, "bias", bias, (columns,))
    rows = input.numel() // columns if columns else 0
    return rows, columns


def bias_activation_forward(
    input: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str = "identity",
    negative_slope: float = 0.01,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``f(input + bias)``, ``input`` contiguous of shape ``[*, columns]``, ``bias`` of shape
    ``[columns]`` or None; written into ``out`` when given (which may be ``input`` itself)."""
    name = "bias_activation_forward"
    _check_activation(name, activation)
    rows, columns = _as_rows(name, input, bias)
    if out is None:
        out = torch.empty_like(input)
    else:
        check_same(name, input, out=out)
        check_shape(name, "out", out, tuple(input.shape))
        check_contiguous(name, out=out)
    if input.numel() == 0:
        return out
    grid, block_rows, block_columns = launch_grid(rows, columns)
    _bias_activation_forward_kernel[grid](
        input,
        input if bias is None else bias,
        out,
        rows,
        columns,
        negative_slope=float(negative_slope),
        ACTIVATION=activation,
        add_bias=bias is not None,
        COMPUTE_DTYPE=compute_dtype(input.dtype),
        BLOCK_ROWS=block_rows,
        BLOCK_COLUMNS=block_columns,
        num_warps=warps(block_rows * block_columns, input.dtype),
    )
    return out


def bias_activation_backward(
    grad_output: torch.Tensor,
    saved: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str = "identity",
    negative_slope: float = 0.01,
    compute_grad_bias: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(dL/dz, dL/db)`` from ``grad_output`` and ``saved``: the forward's output ``y`` for the
    activations in :data:`OUTPUT_DERIVATIVE`, else its input ``h`` (``bias`` then added again).
    ``dL/db`` is None unless ``compute_grad_bias``."""
    name = "bias_activation_backward"
    _check_activation(name, activation)
    rows, columns = _as_rows(name, saved, bias)
    bias_to_add = None if activation in OUTPUT_DERIVATIVE else bias
    check_same(name, saved, grad_output=grad_output)
    check_shape(name, "grad_output", grad_output, tuple(saved.shape))
    check_contiguous(name, grad_output=grad_output)
    if compute_grad_bias and (saved.dim() == 0 or bias is None):
        raise RuntimeError(f"{name}: compute_grad_bias needs a bias and an input of at least 1-D")
    grad_input = torch.empty_like(saved)
    if saved.numel() == 0:
        grad_bias = saved.new_zeros(columns) if compute_grad_bias else None
        return grad_input, grad_bias
    grid, block_rows, block_columns = launch_grid(rows, columns)
    row_tiles = triton.cdiv(rows, block_rows)
    partial = (
        torch.empty(row_tiles, columns, dtype=statistics_dtype(saved.dtype), device=saved.device)
        if compute_grad_bias
        else grad_input
    )
    _bias_activation_backward_kernel[grid](
        grad_output,
        saved,
        saved if bias_to_add is None else bias_to_add,
        grad_input,
        partial,
        rows,
        columns,
        negative_slope=float(negative_slope),
        ACTIVATION=activation,
        add_bias=bias_to_add is not None,
        reduce_bias=compute_grad_bias,
        COMPUTE_DTYPE=compute_dtype(saved.dtype),
        BLOCK_ROWS=block_rows,
        BLOCK_COLUMNS=block_columns,
        num_warps=warps(block_rows * block_columns, saved.dtype),
    )
    grad_bias = partial.sum(0).to(saved.dtype) if compute_grad_bias else None
    return grad_input, grad_bias
