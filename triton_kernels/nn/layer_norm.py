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
sums in registers and writing them once; the ``[programs, n]`` partials are added after. Rows
wider than 64 KB refuse (as the tutorial's kernel does): they would not fit in registers.
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
    warps,
)

_MAX_ROW_BYTES = 65536
_TILE = 4096
_MAX_BLOCK_ROWS = 64


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
    EPS: tl.constexpr,
    has_weight: tl.constexpr,
    has_bias: tl.constexpr,
    COMPUTE_DTYPE: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_COLUMNS: tl.constexpr,
):
    """``y = w (x - μ) r + b`` for ``BLOCK_ROWS`` rows of the ``[rows, columns]`` input; saves
    ``μ`` and ``r`` per row."""
    row = tl.program_id(0).to(tl.int64) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    column = tl.arange(0, BLOCK_COLUMNS)
    row_mask = row < rows
    column_mask = column < columns
    mask = row_mask[:, None] & column_mask[None, :]
    offsets = row[:, None] * columns + column[None, :]
    x = tl.load(input_pointer + offsets, mask=mask, other=0.0).to(COMPUTE_DTYPE)
    # μ = mean(x)
    mean = tl.sum(x, axis=1) / columns
    centered = tl.where(mask, x - mean[:, None], 0.0)
    # σ² = mean((x - μ)²), r = 1 / √(σ² + eps)
    variance = tl.sum(centered * centered, axis=1) / columns
    rstd = 1.0 / tl.sqrt(variance + EPS)
    y = centered * rstd[:, None]
    if has_weight:
        y *= tl.load(weight_pointer + column, mask=column_mask).to(COMPUTE_DTYPE)[None, :]
    if has_bias:
        y += tl.load(bias_pointer + column, mask=column_mask).to(COMPUTE_DTYPE)[None, :]
    tl.store(output_pointer + offsets, y.to(output_pointer.dtype.element_ty), mask=mask)
    tl.store(mean_pointer + row, mean, mask=row_mask)
    tl.store(rstd_pointer + row, rstd, mask=row_mask)


@triton.jit
def _layer_norm_backward_kernel(
    grad_output_pointer,
    input_pointer,
    weight_pointer,
    mean_pointer,
    rstd_pointer,
    grad_input_pointer,
    grad_weight_partial_pointer,
    grad_bias_partial_pointer,
    rows,
    columns,
    has_weight: tl.constexpr,
    reduce_parameters: tl.constexpr,
    COMPUTE_DTYPE: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_COLUMNS: tl.constexpr,
):
    """``dL/dx`` for the row tiles ``program_id, program_id + programs, ...``; with
    ``reduce_parameters``, this program's partial ``Σ g x̂`` and ``Σ g`` to its row of the
    ``[programs, columns]`` partials."""
    program = tl.program_id(0)
    programs = tl.num_programs(0)
    column = tl.arange(0, BLOCK_COLUMNS)
    column_mask = column < columns
    if has_weight:
        weight = tl.load(weight_pointer + column, mask=column_mask).to(COMPUTE_DTYPE)
    grad_weight = tl.zeros((BLOCK_COLUMNS,), COMPUTE_DTYPE)
    grad_bias = tl.zeros((BLOCK_COLUMNS,), COMPUTE_DTYPE)
    for tile in range(program, tl.cdiv(rows, BLOCK_ROWS), programs):
        row = (tile * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)).to(tl.int64)
        row_mask = row < rows
        mask = row_mask[:, None] & column_mask[None, :]
        offsets = row[:, None] * columns + column[None, :]
        x = tl.load(input_pointer + offsets, mask=mask, other=0.0).to(COMPUTE_DTYPE)
        g = tl.load(grad_output_pointer + offsets, mask=mask, other=0.0).to(COMPUTE_DTYPE)
        mean = tl.load(mean_pointer + row, mask=row_mask, other=0.0)
        rstd = tl.load(rstd_pointer + row, mask=row_mask, other=0.0)
        # x̂ = (x - μ) r
        normalized = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
        # w g
        grad_normalized = g * weight[None, :] if has_weight else g
        # c_1 = mean(x̂ ⊙ w g), c_2 = mean(w g)
        c1 = tl.sum(normalized * grad_normalized, axis=1) / columns
        c2 = tl.sum(grad_normalized, axis=1) / columns
        # dL/dx = r (w g - x̂ c_1 - c_2)
        grad_input = rstd[:, None] * (grad_normalized - normalized * c1[:, None] - c2[:, None])
        tl.store(
            grad_input_pointer + offsets,
            grad_input.to(grad_input_pointer.dtype.element_ty),
            mask=mask,
        )
        if reduce_parameters:
            # dL/dw += Σ g x̂, dL/db += Σ g (this tile's rows)
            grad_weight += tl.sum(g * normalized, axis=0)
            grad_bias += tl.sum(g, axis=0)
    if reduce_parameters:
        partial = program * columns + column
        tl.store(grad_weight_partial_pointer + partial, grad_weight, mask=column_mask)
        tl.store(grad_bias_partial_pointer + partial, grad_bias, mask=column_mask)


def _blocks(name: str, input: torch.Tensor) -> tuple[int, int, int, int]:
    """``(rows, columns, BLOCK_ROWS, BLOCK_COLUMNS)``; refuses rows wider than 64 KB."""
    columns = input.shape[-1] if input.dim() else 1
    rows = input.numel() // columns if columns else 0
    if columns * input.element_size() > _MAX_ROW_BYTES:
        raise RuntimeError(
            f"{name}: a row of {columns} {input.dtype} elements is wider than the kernel's 64 KB "
            f"limit ({_MAX_ROW_BYTES // input.element_size()} elements); use the torch path"
        )
    block_columns = triton.next_power_of_2(max(columns, 1))
    block_rows = max(1, min(_TILE // block_columns, _MAX_BLOCK_ROWS))
    block_rows = min(block_rows, triton.next_power_of_2(max(rows, 1)))
    return rows, columns, block_rows, block_columns


def _check(
    name: str, input: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None
) -> None:
    check_floating(name, "input", input)
    if input.dim() == 0:
        raise RuntimeError(f"{name}: expected an input of at least 1 dimension, got a 0-D input")
    check_contiguous(name, input=input, weight=weight, bias=bias)
    check_numel(name, input)
    check_same(name, input, weight=weight, bias=bias)
    for argument, tensor in (("weight", weight), ("bias", bias)):
        if tensor is not None:
            check_shape(name, argument, tensor, (input.shape[-1],))


def layer_norm_forward(
    input: torch.Tensor,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(y, μ, r)`` normalising the last dimension of the contiguous ``input``; ``weight`` and
    ``bias`` of shape ``[columns]`` or None; ``μ`` and ``r`` of shape ``[rows]`` in the compute
    dtype."""
    name = "layer_norm_forward"
    _check(name, input, weight, bias)
    if eps < 0:
        raise ValueError(f"{name}: eps must be non-negative, got {eps}")
    rows, columns, block_rows, block_columns = _blocks(name, input)
    output = torch.empty_like(input)
    dtype = statistics_dtype(input.dtype)
    mean = torch.empty(rows, dtype=dtype, device=input.device)
    rstd = torch.empty(rows, dtype=dtype, device=input.device)
    if input.numel():
        _layer_norm_forward_kernel[(triton.cdiv(rows, block_rows),)](
            input,
            input if weight is None else weight,
            input if bias is None else bias,
            output,
            mean,
            rstd,
            rows,
            columns,
            EPS=float(eps),
            has_weight=weight is not None,
            has_bias=bias is not None,
            COMPUTE_DTYPE=compute_dtype(input.dtype),
            BLOCK_ROWS=block_rows,
            BLOCK_COLUMNS=block_columns,
            num_warps=warps(block_rows * block_columns),
        )
    return output, mean, rstd


def _programs(device: torch.device, tiles: int) -> int:
    """Backward programs: two per streaming multiprocessor on a GPU, so the partials stay small."""
    if device.type == "cuda":
        limit = 2 * torch.cuda.get_device_properties(device).multi_processor_count
    else:
        limit = 8
    return max(1, min(tiles, limit))


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
    name = "layer_norm_backward"
    _check(name, input, weight, None)
    check_same(name, input, grad_output=grad_output)
    check_shape(name, "grad_output", grad_output, tuple(input.shape))
    check_contiguous(name, grad_output=grad_output)
    rows, columns, block_rows, block_columns = _blocks(name, input)
    dtype = statistics_dtype(input.dtype)
    for argument, tensor in (("mean", mean), ("rstd", rstd)):
        check_shape(name, argument, tensor, (rows,))
        if tensor.dtype != dtype:
            raise RuntimeError(f"{name}: expected {argument} of dtype {dtype}, got {tensor.dtype}")
    grad_input = torch.empty_like(input)
    programs = _programs(input.device, triton.cdiv(rows, block_rows))
    partial_weight = torch.zeros(programs, columns, dtype=dtype, device=input.device)
    partial_bias = torch.zeros(programs, columns, dtype=dtype, device=input.device)
    if input.numel():
        _layer_norm_backward_kernel[(programs,)](
            grad_output,
            input,
            input if weight is None else weight,
            mean,
            rstd,
            grad_input,
            partial_weight,
            partial_bias,
            rows,
            columns,
            has_weight=weight is not None,
            reduce_parameters=compute_parameter_grads,
            COMPUTE_DTYPE=compute_dtype(input.dtype),
            BLOCK_ROWS=block_rows,
            BLOCK_COLUMNS=block_columns,
            num_warps=warps(block_rows * block_columns),
        )
    if not compute_parameter_grads:
        return grad_input, None, None
    return grad_input, partial_weight.sum(0).to(input.dtype), partial_bias.sum(0).to(input.dtype)
