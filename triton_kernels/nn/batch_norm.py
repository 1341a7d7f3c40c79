"""Batch normalisation: per-channel statistics, per-channel gradient sums, and the per-channel
affine map that applies both the normalisation and its backward.

Input ``x`` of shape ``[N, C, *]`` (contiguous), ``S = Π *``, ``n = N S`` elements per channel. The
formulas are those of ``torchopt_lab/nn/_norm.py`` (``BatchNormFunction``):

- :func:`batch_norm_statistics`: ``μ_c`` and the biased ``σ²_c``. Each program reduces a slice of
  a channel block by block and merges the blocks with Chan et al.'s pairwise update
  (``δ = μ_b - μ``, ``μ ← μ + δ n_b / (n + n_b)``, ``M₂ ← M₂ + M₂_b + δ² n n_b / (n + n_b)``),
  which keeps the variance accurate where ``E[x²] - μ²`` would cancel; the slices are merged the
  same way after.
- :func:`batch_norm_gradient_sums`: ``Σ g`` and ``Σ g (x - μ)`` per channel (the backward's two
  reductions: ``dL/db = Σ g``, ``dL/dw = r Σ g (x - μ)``).
- :func:`channel_affine`: ``y = a_c x + b_c (+ e_c z)``. The forward is ``a = w r``,
  ``b = β - μ w r``; the training backward is ``dL/dx = (w r) g - (r² c_1) x + r (r c_1 μ - c_2)``
  (``x`` the input, ``z = g``); the per-channel coefficients are ``C`` numbers, computed in torch.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from triton_kernels.nn._common import (
    chan_merge,
    check_contiguous,
    check_floating,
    check_numel,
    check_same,
    check_shape,
    compute_dtype,
    statistics_dtype,
    warps,
)

_BLOCK = 1024
_TARGET_PROGRAMS = 512


@triton.jit
def _batch_norm_statistics_kernel(
    input_pointer,
    count_pointer,
    mean_pointer,
    m2_pointer,
    batch,
    channels,
    spatial,
    COMPUTE_DTYPE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Program ``(c, j)``: count, mean and ``M₂ = Σ (x - mean)²`` of channel ``c`` over the samples
    ``j, j + splits, ...``, written to slot ``[c, j]``."""
    channel = tl.program_id(0)
    split = tl.program_id(1)
    splits = tl.num_programs(1)
    count = tl.full((), 0.0, COMPUTE_DTYPE)
    mean = tl.full((), 0.0, COMPUTE_DTYPE)
    m2 = tl.full((), 0.0, COMPUTE_DTYPE)
    for sample in range(split, batch, splits):
        row_pointer = input_pointer + (sample * channels + channel).to(tl.int64) * spatial
        for start in range(0, spatial, BLOCK):
            offsets = start + tl.arange(0, BLOCK)
            mask = offsets < spatial
            x = tl.load(row_pointer + offsets, mask=mask, other=0.0).to(COMPUTE_DTYPE)
            block_count = tl.sum(mask.to(COMPUTE_DTYPE), axis=0)
            block_mean = tl.sum(x, axis=0) / block_count
            centered = tl.where(mask, x - block_mean, 0.0)
            block_m2 = tl.sum(centered * centered, axis=0)
            count, mean, m2 = chan_merge(count, mean, m2, block_count, block_mean, block_m2)
    slot = channel * splits + split
    tl.store(count_pointer + slot, count)
    tl.store(mean_pointer + slot, mean)
    tl.store(m2_pointer + slot, m2)


@triton.jit
def _batch_norm_gradient_sums_kernel(
    grad_output_pointer,
    input_pointer,
    mean_pointer,
    sum_pointer,
    dot_pointer,
    batch,
    channels,
    spatial,
    COMPUTE_DTYPE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Program ``(c, j)``: ``Σ g`` and ``Σ g (x - μ_c)`` over the samples ``j, j + splits, ...``
    of channel ``c``, written to slot ``[c, j]``."""
    channel = tl.program_id(0)
    split = tl.program_id(1)
    splits = tl.num_programs(1)
    mean = tl.load(mean_pointer + channel).to(COMPUTE_DTYPE)
    total = tl.zeros((BLOCK,), COMPUTE_DTYPE)
    dot = tl.zeros((BLOCK,), COMPUTE_DTYPE)
    for sample in range(split, batch, splits):
        offset = (sample * channels + channel).to(tl.int64) * spatial
        for start in range(0, spatial, BLOCK):
            offsets = start + tl.arange(0, BLOCK)
            mask = offsets < spatial
            g = tl.load(grad_output_pointer + offset + offsets, mask=mask, other=0.0)
            x = tl.load(input_pointer + offset + offsets, mask=mask, other=0.0)
            g = g.to(COMPUTE_DTYPE)
            total += g
            dot += g * tl.where(mask, x.to(COMPUTE_DTYPE) - mean, 0.0)
    slot = channel * splits + split
    tl.store(sum_pointer + slot, tl.sum(total, axis=0))
    tl.store(dot_pointer + slot, tl.sum(dot, axis=0))


@triton.jit
def _channel_affine_kernel(
    input_pointer,
    second_pointer,
    output_pointer,
    scale_pointer,
    shift_pointer,
    second_scale_pointer,
    channels,
    spatial,
    add_second: tl.constexpr,
    COMPUTE_DTYPE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """``y = a_c x + b_c (+ e_c z)`` on one block of row ``(n, c)`` of the ``[N C, S]`` view; the
    blocks are numbered row-major along grid axis 0 (:func:`channel_affine_grid`)."""
    blocks = tl.cdiv(spatial, BLOCK)
    row = (tl.program_id(0) // blocks).to(tl.int64)
    channel = row % channels
    offsets = (tl.program_id(0) % blocks) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < spatial
    pointer_offsets = row * spatial + offsets
    x = tl.load(input_pointer + pointer_offsets, mask=mask).to(COMPUTE_DTYPE)
    scale = tl.load(scale_pointer + channel).to(COMPUTE_DTYPE)
    shift = tl.load(shift_pointer + channel).to(COMPUTE_DTYPE)
    y = x * scale + shift
    if add_second:
        z = tl.load(second_pointer + pointer_offsets, mask=mask).to(COMPUTE_DTYPE)
        y += z * tl.load(second_scale_pointer + channel).to(COMPUTE_DTYPE)
    tl.store(output_pointer + pointer_offsets, y.to(output_pointer.dtype.element_ty), mask=mask)


def _dimensions(name: str, input: torch.Tensor) -> tuple[int, int, int]:
    """``(N, C, S)`` of a contiguous float ``[N, C, *]`` input."""
    check_floating(name, "input", input)
    if input.dim() < 2:
        raise RuntimeError(f"{name}: expected an input of shape [N, C, *], got {list(input.shape)}")
    check_contiguous(name, input=input)
    check_numel(name, input)
    batch, channels = input.shape[:2]
    spatial = input.numel() // (batch * channels) if batch * channels else 0
    return batch, channels, spatial


def channel_affine_grid(batch: int, channels: int, spatial: int) -> tuple[tuple[int], int]:
    """``(grid, BLOCK)`` of :func:`channel_affine` on ``[N, C, S]``: blocks of up to ``_BLOCK``
    values of one ``(n, c)`` row, one program each, all along grid axis 0 (CUDA's limit 2³¹ - 1;
    axis 1 stops at 65535, which the 65600 blocks of an 8192x8200 image would pass). Every
    program holds at least one element, so a launch within
    :data:`~triton_kernels.nn._common.MAX_NUMEL` stays within the limit."""
    block = min(_BLOCK, triton.next_power_of_2(max(spatial, 1)))
    return (batch * channels * triton.cdiv(spatial, block),), block


def statistics_grid(batch: int, channels: int) -> tuple[int, int]:
    """The grid of the statistics and gradient-sum kernels: ``(C, splits)``, ``C`` along axis 0
    (limit 2³¹ - 1) and at most ``_TARGET_PROGRAMS`` splits along axis 1 (limit 65535)."""
    return channels, _splits(batch, channels)


def _splits(batch: int, channels: int) -> int:
    """Programs per channel: enough for about ``_TARGET_PROGRAMS`` in all, at most one per
    sample."""
    return max(1, min(batch, triton.cdiv(_TARGET_PROGRAMS, max(channels, 1))))


def batch_norm_statistics(input: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(μ, σ²)`` per channel (biased variance, ``[C]`` each, in the compute dtype) of the
    ``[N, C, *]`` ``input``; an empty input raises (there is nothing to average)."""
    name = "batch_norm_statistics"
    batch, channels, spatial = _dimensions(name, input)
    if batch * spatial == 0:
        raise RuntimeError(
            f"{name}: no values per channel in an input of shape {list(input.shape)}"
        )
    grid = statistics_grid(batch, channels)
    splits = grid[1]
    block = min(_BLOCK, triton.next_power_of_2(spatial))
    dtype = statistics_dtype(input.dtype)
    count, mean, m2 = (
        torch.empty(channels, splits, dtype=dtype, device=input.device) for _ in range(3)
    )
    _batch_norm_statistics_kernel[grid](
        input,
        count,
        mean,
        m2,
        batch,
        channels,
        spatial,
        COMPUTE_DTYPE=compute_dtype(input.dtype),
        BLOCK=block,
        num_warps=warps(block, input.dtype),
    )
    # Chan's merge of the slices: μ = Σ n_j μ_j / n, M₂ = Σ M₂_j + n_j (μ_j - μ)²
    total = count.sum(1)
    channel_mean = (count * mean).sum(1) / total
    channel_m2 = (m2 + count * (mean - channel_mean[:, None]) ** 2).sum(1)
    return channel_mean, channel_m2 / total


def batch_norm_gradient_sums(
    grad_output: torch.Tensor, input: torch.Tensor, mean: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(Σ g, Σ g (x - μ))`` per channel, ``[C]`` each in the compute dtype."""
    name = "batch_norm_gradient_sums"
    batch, channels, spatial = _dimensions(name, input)
    check_same(name, input, grad_output=grad_output)
    check_shape(name, "grad_output", grad_output, tuple(input.shape))
    check_contiguous(name, grad_output=grad_output, mean=mean)
    dtype = statistics_dtype(input.dtype)
    check_shape(name, "mean", mean, (channels,))
    grid = statistics_grid(batch, channels)
    splits = grid[1]
    total, dot = (torch.zeros(channels, splits, dtype=dtype, device=input.device) for _ in range(2))
    block = min(_BLOCK, triton.next_power_of_2(max(spatial, 1)))
    if input.numel():
        _batch_norm_gradient_sums_kernel[grid](
            grad_output,
            input,
            mean.to(dtype),
            total,
            dot,
            batch,
            channels,
            spatial,
            COMPUTE_DTYPE=compute_dtype(input.dtype),
            BLOCK=block,
            num_warps=warps(block, input.dtype),
        )
    return total.sum(1), dot.sum(1)


def channel_affine(
    input: torch.Tensor,
    scale: torch.Tensor,
    shift: torch.Tensor,
    second: torch.Tensor | None = None,
    second_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """``scale_c x + shift_c (+ second_scale_c second)`` for ``x`` of shape ``[N, C, *]``; the
    coefficients are ``[C]`` vectors (any float dtype, read in the compute dtype)."""
    name = "channel_affine"
    batch, channels, spatial = _dimensions(name, input)
    if (second is None) != (second_scale is None):
        raise RuntimeError(f"{name}: second and second_scale go together")
    if second is not None:
        check_same(name, input, second=second)
        check_shape(name, "second", second, tuple(input.shape))
        check_contiguous(name, second=second)
    for argument, tensor in (("scale", scale), ("shift", shift), ("second_scale", second_scale)):
        if tensor is not None:
            check_floating(name, argument, tensor)
            check_shape(name, argument, tensor, (channels,))
            check_contiguous(name, **{argument: tensor})
    output = torch.empty_like(input)
    if input.numel():
        grid, block = channel_affine_grid(batch, channels, spatial)
        _channel_affine_kernel[grid](
            input,
            input if second is None else second,
            output,
            scale,
            shift,
            scale if second_scale is None else second_scale,
            channels,
            spatial,
            add_second=second is not None,
            COMPUTE_DTYPE=compute_dtype(input.dtype),
            BLOCK=block,
            num_warps=warps(block, input.dtype),
        )
    return output
