"""The grids every layer launcher would launch for extreme shapes, computed without launching: CUDA
allows 2³¹ - 1 programs along grid axis 0 but only 65535 along axes 1 and 2, and a grid past that
fails on the GPU only (the interpreter takes any grid). Then small launches under the interpreter
whose tiles are numbered the same way, against torch, so the flattened numbering covers every
element once."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
import triton

import triton_kernels.nn as K
from torchopt_lab import backend, backend_info
from torchopt_lab.nn import _dispatch
from triton_kernels.nn import activation, batch_norm, dropout, layer_norm, softmax
from triton_kernels.nn._common import MAX_NUMEL, row_norm_grids

AXIS_LIMITS = (2**31 - 1, 65535, 65535)
# Programs of the layer-norm backward on an H200: two per streaming multiprocessor (132).
H200_PROGRAMS = 2 * 132


def within_cuda_limits(grid: tuple[int, ...]) -> bool:
    return 1 <= len(grid) <= 3 and all(
        1 <= size <= limit for size, limit in zip(grid, AXIS_LIMITS, strict=False)
    )


# [rows, columns] of the activation kernels: a 1e8-element 1-D relu (one row of 1e8, 97657 column
# tiles), the widest single row, the most rows, a square at the element limit.
ACTIVATION_SHAPES = [(1, 10**8), (1, MAX_NUMEL), (MAX_NUMEL, 1), (46340, 46340), (3, 1030)]


@pytest.mark.parametrize(("rows", "columns"), ACTIVATION_SHAPES)
def test_activation_grid_stays_within_cuda_limits_for_extreme_shapes(
    rows: int, columns: int
) -> None:
    grid, block_rows, block_columns = activation.launch_grid(rows, columns)
    assert within_cuda_limits(grid), grid
    # one program per tile of the [rows, columns] tiling
    tiles = triton.cdiv(rows, block_rows) * triton.cdiv(columns, block_columns)
    assert grid == (tiles,)


# [N, C, S] of batch norm: an 8192x8200 image (65600 blocks of one row), many channels of a
# small image, one value per (n, c) row at the element limit.
BATCH_NORM_SHAPES = [
    (1, 1, 8192 * 8200),
    (2, 3, 8192 * 8200),
    (4096, 4096, 49),
    (MAX_NUMEL, 1, 1),
    (1, MAX_NUMEL, 1),
]


@pytest.mark.parametrize(("batch", "channels", "spatial"), BATCH_NORM_SHAPES)
def test_batch_norm_grids_stay_within_cuda_limits_for_extreme_shapes(
    batch: int, channels: int, spatial: int
) -> None:
    grid, block = batch_norm.channel_affine_grid(batch, channels, spatial)
    assert within_cuda_limits(grid), grid
    assert grid == (batch * channels * triton.cdiv(spatial, block),)
    assert within_cuda_limits(batch_norm.statistics_grid(batch, channels))


# (shape, dtype) of layer norm: a row of 2³¹ - 1 float32 values (1048576 column slices of the
# wide backward), one float64 row of 1e8, 2³¹ - 1 rows of width 1, many ordinary rows.
LAYER_NORM_SHAPES = [
    ((MAX_NUMEL,), torch.float32),
    ((10**8,), torch.float64),
    ((MAX_NUMEL, 1), torch.float32),
    ((2**20, 2048), torch.bfloat16),
]


@pytest.mark.parametrize(("shape", "dtype"), LAYER_NORM_SHAPES)
def test_layer_norm_grids_stay_within_cuda_limits_for_extreme_shapes(
    shape: tuple[int, ...], dtype: torch.dtype
) -> None:
    rows, columns, wide, block_rows, block_columns = layer_norm.block_shape(shape, dtype)
    forward = (rows,) if wide else (triton.cdiv(rows, block_rows),)
    assert within_cuda_limits(forward), forward
    backward = layer_norm.backward_grid(rows, columns, block_rows, block_columns, H200_PROGRAMS)
    assert within_cuda_limits(backward), backward
    assert backward[1] <= H200_PROGRAMS


@pytest.mark.parametrize(("shape", "dtype"), [*LAYER_NORM_SHAPES, ((4096, 32000), torch.float16)])
def test_rms_norm_grids_stay_within_cuda_limits_for_extreme_shapes(
    shape: tuple[int, ...], dtype: torch.dtype
) -> None:
    # RMSNorm launches the layer-norm kernels on the grids of row_norm_grids, the function its
    # launchers call (one row of 2³¹ - 1 values, 2³¹ - 1 rows of one value, ...)
    forward, backward = row_norm_grids(shape, dtype, H200_PROGRAMS)
    assert within_cuda_limits(forward), forward
    assert within_cuda_limits(backward), backward
    assert backward[1] <= H200_PROGRAMS
    rows, columns, wide, block_rows, block_columns = layer_norm.block_shape(shape, dtype)
    # every row in one forward program (whole rows) or its own (wide), every column in a slice
    assert forward[0] * (1 if wide else block_rows) >= rows
    assert backward[0] * block_columns >= columns


def test_rms_norm_wide_rows_with_column_slices_match_torch() -> None:
    # float64 rows of 4100 values are wide: the forward's two passes, the coefficients kernel and
    # 5 column slices of the backward along axis 0, as row_norm_grids gives them
    torch.manual_seed(0)
    x = torch.randn(3, 4100, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(4100, dtype=torch.float64, requires_grad=True)
    assert row_norm_grids(x.shape, x.dtype, 8) == ((3,), (5, 1))
    expected = F.rms_norm(x, [4100], weight)
    grad_output = torch.randn_like(expected)
    expected.backward(grad_output)
    output, rstd = K.rms_norm_forward(x.detach(), weight.detach())
    grad_input, grad_weight = K.rms_norm_backward(grad_output, x.detach(), weight.detach(), rstd)
    torch.testing.assert_close(output, expected.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad_input, x.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad_weight, weight.grad, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(("rows", "columns"), [(MAX_NUMEL, 1), (1, MAX_NUMEL), (46340, 46340)])
@pytest.mark.parametrize("element_size", [2, 4, 8])
def test_row_kernel_grids_stay_within_cuda_limits_for_extreme_shapes(
    rows: int, columns: int, element_size: int
) -> None:
    # softmax and cross-entropy: one program per row or per group of whole rows, along axis 0
    programs, _, _, _ = softmax._launch_shape(rows, columns, element_size)
    assert within_cuda_limits((programs,))
    assert within_cuda_limits((rows,))


@pytest.mark.parametrize("numel", [1, 1025, MAX_NUMEL])
def test_dropout_grid_stays_within_cuda_limits_and_its_offsets_within_int32(numel: int) -> None:
    grid, block = dropout.launch_grid(numel)
    assert within_cuda_limits(grid)
    (programs,) = grid
    # the last program's last offset (block start + BLOCK - 1) stays a valid int32
    assert (programs - 1) * block + block - 1 <= 2**31 - 1
    assert programs * block >= numel


def test_old_two_axis_grids_would_have_passed_65535() -> None:
    # The claim the flattened grids fix: [1, 1e8] had 97657 column tiles on axis 1, and an
    # 8192x8200 image 65600 blocks per row on axis 1.
    _, _, block_columns = activation.launch_grid(1, 10**8)
    assert triton.cdiv(10**8, block_columns) > AXIS_LIMITS[1]
    _, block = batch_norm.channel_affine_grid(1, 1, 8192 * 8200)
    assert triton.cdiv(8192 * 8200, block) > AXIS_LIMITS[1]


@pytest.mark.parametrize("activation_name", ["relu", "gelu"])
def test_flattened_activation_tiles_cover_every_element_once(activation_name: str) -> None:
    # 5 row tiles x 3 column tiles (1024 columns each, a masked tail) with a bias
    torch.manual_seed(0)
    h = torch.randn(9, 2100, dtype=torch.float64)
    bias = torch.randn(2100, dtype=torch.float64)
    grid, block_rows, block_columns = activation.launch_grid(9, 2100)
    assert (block_rows, block_columns) == (2, 1024) and grid == (15,)
    reference = F.relu if activation_name == "relu" else F.gelu
    z = (h + bias).requires_grad_()
    expected = reference(z)
    grad_output = torch.randn_like(expected)
    expected.backward(grad_output)
    output = K.bias_activation_forward(h, bias, activation_name)
    torch.testing.assert_close(output, expected.detach(), rtol=1e-12, atol=1e-12)
    saved = output if activation_name == "relu" else h
    grad_input, grad_bias = K.bias_activation_backward(
        grad_output, saved, bias, activation_name, compute_grad_bias=True
    )
    torch.testing.assert_close(grad_input, z.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad_bias, z.grad.sum(0), rtol=1e-12, atol=1e-12)


def test_flattened_channel_affine_blocks_cover_every_element_once() -> None:
    # [2, 3, 2500]: 6 rows x 3 blocks of 1024 (a masked tail)
    torch.manual_seed(0)
    x = torch.randn(2, 3, 2500, dtype=torch.float64)
    second = torch.randn_like(x)
    scale, shift, second_scale = (torch.randn(3, dtype=torch.float64) for _ in range(3))
    grid, block = batch_norm.channel_affine_grid(2, 3, 2500)
    assert grid == (18,) and block == 1024
    output = K.channel_affine(x, scale, shift, second, second_scale)
    expected = x * scale[:, None] + shift[:, None] + second * second_scale[:, None]
    torch.testing.assert_close(output, expected, rtol=1e-12, atol=1e-12)


def test_layer_norm_backward_with_column_slices_on_axis_zero_matches_torch() -> None:
    # float64 rows of 4100 values are wide (past 32 KB): 5 column slices of 1024, one program
    torch.manual_seed(0)
    x = torch.randn(3, 4100, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(4100, dtype=torch.float64, requires_grad=True)
    _, columns, wide, block_rows, block_columns = layer_norm.block_shape(x.shape, x.dtype)
    assert wide
    assert layer_norm.backward_grid(3, columns, block_rows, block_columns, 8) == (5, 1)
    expected = F.layer_norm(x, [4100], weight)
    grad_output = torch.randn_like(expected)
    expected.backward(grad_output)
    output, mean, rstd = K.layer_norm_forward(x.detach(), weight.detach())
    grad_input, grad_weight, _ = K.layer_norm_backward(
        grad_output, x.detach(), weight.detach(), mean, rstd
    )
    torch.testing.assert_close(output, expected.detach(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad_input, x.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad_weight, weight.grad, rtol=1e-10, atol=1e-12)


def test_every_launcher_refuses_more_elements_than_int32_offsets_address() -> None:
    # Offsets past 2³¹ - 1 would wrap; the launchers refuse such a tensor (checked on its shape:
    # an expanded view holds one element but reports the full count).
    huge = torch.zeros(1).expand(MAX_NUMEL + 1)
    assert huge.numel() == MAX_NUMEL + 1 and math.prod(huge.shape) > MAX_NUMEL
    with pytest.raises(RuntimeError, match=str(MAX_NUMEL + 1)):
        K.softmax_forward(huge)
    with pytest.raises(RuntimeError, match=str(MAX_NUMEL + 1)):
        K.rms_norm_forward(huge)


def test_auto_sends_a_tensor_past_the_int32_offsets_down_the_torch_path_and_records_why(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Before: "auto" chose the kernels on a GPU and their launcher raised for a tensor of 2³¹
    # elements, where torch computes. Here Triton is made the choice (as on a GPU) and the
    # tensor is an expanded view (one element in memory).
    assert _dispatch.MAX_KERNEL_NUMEL == MAX_NUMEL
    monkeypatch.setattr(backend, "resolve", lambda component, requested, device: "triton")
    huge = torch.zeros(1).expand(MAX_NUMEL + 1)
    small = torch.zeros(3)
    monkeypatch.setenv(backend.ENV_VAR, "auto")
    assert _dispatch.use_triton("relu", small)
    assert not _dispatch.use_triton("relu", huge)
    decision = backend_info()["decisions"]["nn.relu"]
    assert decision["backend"] == "torch" and str(MAX_NUMEL + 1) in decision["reason"]
    # Asked for explicitly, Triton stays chosen, and the launcher refuses the tensor clearly.
    monkeypatch.setenv(backend.ENV_VAR, "triton")
    assert _dispatch.use_triton("relu", huge)
