"""What every layer launcher shares: input checks that quote the bad value, the compute dtype, and
the device functions the interpreter lacks (``tanh``: ``libdevice.tanh`` returns None there).

Values that vary per call (``eps``, ``label_smoothing``, ``negative_slope``, dropout's ``p``) are
runtime kernel arguments, never ``tl.constexpr``: a constexpr is part of the kernel's cache key,
so each new value would compile the kernel again. They are annotated ``tl.float64`` (an
unannotated Python float is passed as float32, which would round ``0.1`` for the float64
kernels) and rounded once in the kernel to the compute dtype with ``tl.full((), value, dtype)``,
as torch rounds its host scalar to the accumulation type."""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# Offsets inside one kernel are int32: a tensor past this many elements is refused, not wrapped.
MAX_NUMEL = 2**31 - 1

# Row normalisation (layer norm, RMSNorm): a whole row in registers up to this many bytes of the
# compute dtype (ptxas spills beyond it); wider rows take the wide kernels' column slices.
_MAX_WHOLE_ROW_BYTES = 32768
_WIDE_BLOCK_BYTES = 8192
_TILE = 4096
_MAX_BLOCK_ROWS = 64
_WIDE_BLOCK_ROWS = 4


def compute_dtype(dtype: torch.dtype) -> tl.dtype:
    """float64 stays float64; float32, float16 and bfloat16 are computed in float32."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def warps(elements: int, dtype: torch.dtype) -> int:
    """Warps for a program that holds ``elements`` values per tensor of ``dtype``: 32 bytes of
    compute values per thread (8 float32 values, as Triton's layer-norm tutorial picks them; 4
    float64 ones, which need twice the registers each), between 1 and 8 warps."""
    values_per_thread = 4 if dtype == torch.float64 else 8
    return max(1, min(8, elements // (32 * values_per_thread)))


def statistics_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of saved per-row or per-channel statistics: the compute dtype, as a torch dtype."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_floating(name: str, argument: str, tensor: torch.Tensor) -> None:
    """Raise NotImplementedError (torch's type for a kernel without that dtype, as in
    ``"GeluKernelImpl" not implemented for 'Long'``) unless ``tensor`` is a float."""
    if tensor.dtype not in FLOAT_DTYPES:
        raise NotImplementedError(
            f"{name}: expected {argument} of dtype float16, bfloat16, float32 or float64, got "
            f"{tensor.dtype}"
        )


def check_same(name: str, reference: torch.Tensor, **tensors: torch.Tensor | None) -> None:
    """Raise RuntimeError unless every given tensor has ``reference``'s device and dtype."""
    for argument, tensor in tensors.items():
        if tensor is None:
            continue
        if tensor.device != reference.device:
            raise RuntimeError(
                f"{name}: expected {argument} on {reference.device}, got {tensor.device}"
            )
        if tensor.dtype != reference.dtype:
            raise RuntimeError(
                f"{name}: expected {argument} of dtype {reference.dtype}, got {tensor.dtype}"
            )


def check_contiguous(name: str, **tensors: torch.Tensor | None) -> None:
    """Raise RuntimeError unless every given tensor is contiguous (kernels index flat memory)."""
    for argument, tensor in tensors.items():
        if tensor is not None and not tensor.is_contiguous():
            raise RuntimeError(
                f"{name}: {argument} must be contiguous, got strides {tensor.stride()} for shape "
                f"{list(tensor.shape)}; call .contiguous() first"
            )


def check_shape(name: str, argument: str, tensor: torch.Tensor, shape: tuple[int, ...]) -> None:
    """Raise RuntimeError unless ``tensor`` has exactly ``shape``."""
    if tuple(tensor.shape) != tuple(shape):
        raise RuntimeError(
            f"{name}: expected {argument} of shape {list(shape)}, got {list(tensor.shape)}"
        )


def check_numel(name: str, tensor: torch.Tensor) -> None:
    """Raise RuntimeError for a tensor too large for int32 offsets."""
    if tensor.numel() > MAX_NUMEL:
        raise RuntimeError(
            f"{name}: at most {MAX_NUMEL} elements per launch, got {tensor.numel()} (shape "
            f"{list(tensor.shape)})"
        )


def check_rows(name: str, input: torch.Tensor, **parameters: torch.Tensor | None) -> None:
    """The checks of a row normalisation: a contiguous float ``input`` of at least 1 dimension
    within :data:`MAX_NUMEL`, and each given parameter of shape ``[columns]`` with its device and
    dtype."""
    check_floating(name, "input", input)
    if input.dim() == 0:
        raise RuntimeError(f"{name}: expected an input of at least 1 dimension, got a 0-D input")
    check_contiguous(name, input=input, **parameters)
    check_numel(name, input)
    check_same(name, input, **parameters)
    for argument, tensor in parameters.items():
        if tensor is not None:
            check_shape(name, argument, tensor, (input.shape[-1],))


def block_shape(
    shape: tuple[int, ...] | torch.Size, dtype: torch.dtype
) -> tuple[int, int, bool, int, int]:
    """``(rows, columns, wide, BLOCK_ROWS, BLOCK_COLUMNS)`` of a row normalisation of an input of
    ``shape`` and ``dtype`` over its last dimension: whole rows in registers up to 32 KB in the
    compute dtype, else the wide kernels with their column slices. The forward grids are
    ``(cdiv(rows, BLOCK_ROWS),)`` and, wide, ``(rows,)``: axis 0 only (CUDA's limit 2³¹ - 1)."""
    columns = shape[-1] if len(shape) else 1
    # counted from the leading dimensions, so rows of width 0 still count
    rows = math.prod(shape[:-1])
    compute_size = 8 if dtype == torch.float64 else 4
    wide = columns * compute_size > _MAX_WHOLE_ROW_BYTES
    if wide:
        return rows, columns, True, _WIDE_BLOCK_ROWS, _WIDE_BLOCK_BYTES // compute_size
    block_columns = triton.next_power_of_2(max(columns, 1))
    block_rows = max(1, min(_TILE // block_columns, _MAX_BLOCK_ROWS))
    block_rows = min(block_rows, triton.next_power_of_2(max(rows, 1)))
    return rows, columns, False, block_rows, block_columns


def backward_grid(
    rows: int, columns: int, block_rows: int, block_columns: int, program_limit: int
) -> tuple[int, int]:
    """A row normalisation's backward grid ``(column slices, programs)``: at most
    ``program_limit`` programs, each striding over row tiles, along axis 1 (limit 65535), and the
    column slices along axis 0 (limit 2³¹ - 1), as a row wider than 65535 slices (134M float32
    values) has more than axis 1 allows."""
    programs = max(1, min(triton.cdiv(rows, block_rows), program_limit))
    return triton.cdiv(columns, block_columns), programs


def row_norm_grids(
    shape: tuple[int, ...] | torch.Size, dtype: torch.dtype, program_limit: int
) -> tuple[tuple[int], tuple[int, int]]:
    """The ``(forward, backward)`` grids a row normalisation launches for an input of ``shape``
    and ``dtype`` (the backward at most ``program_limit`` programs): the launchers' own, so a
    test of the CUDA limits holds the launches."""
    rows, columns, wide, block_rows, block_columns = block_shape(shape, dtype)
    forward = (rows,) if wide else (triton.cdiv(rows, block_rows),)
    return forward, backward_grid(rows, columns, block_rows, block_columns, program_limit)


def backward_program_limit(device: torch.device) -> int:
    """Programs of a backward that reduces parameter gradients: two per streaming multiprocessor
    on a GPU, so the ``[programs, columns]`` partial sums stay small."""
    if device.type == "cuda":
        return 2 * torch.cuda.get_device_properties(device).multi_processor_count
    return 8


@triton.jit
def tanh(x):
    """``tanh(x)`` from ``tl.exp``: ``sign(x) (1 - e) / (1 + e)`` with ``e = exp(-2|x|)``, and its
    Taylor series below ``|x| < 0.1``, where ``1 - e`` would cancel (relative error ~1e-14)."""
    a = tl.abs(x)
    e = tl.exp(-2.0 * a)
    large = (1.0 - e) / (1.0 + e)
    a2 = a * a
    # a - a³/3 + 2a⁵/15 - 17a⁷/315 + 62a⁹/2835 - 1382a¹¹/155925
    small = a * (
        1.0
        + a2
        * (
            -1.0 / 3.0
            + a2
            * (2.0 / 15.0 + a2 * (-17.0 / 315.0 + a2 * (62.0 / 2835.0 + a2 * (-1382.0 / 155925.0))))
        )
    )
    magnitude = tl.where(a < 0.1, small, large)
    return tl.where(x < 0, -magnitude, magnitude)


@triton.jit
def chan_merge(count, mean, m2, block_count, block_mean, block_m2):
    """Merge ``(count, mean, M₂ = Σ (x - mean)²)`` with a block's (Chan, Golub & LeVeque):
    ``δ = μ_b - μ``, ``μ ← μ + δ n_b / (n + n_b)``, ``M₂ ← M₂ + M₂_b + δ² n n_b / (n + n_b)``;
    accurate where ``E[x²] - μ²`` would cancel. The block must not be empty."""
    total = count + block_count
    delta = block_mean - mean
    mean += delta * (block_count / total)
    m2 += block_m2 + delta * delta * (count * block_count / total)
    return total, mean, m2
