"""The RMSNorm kernels (``triton_kernels.nn.rms_norm``, under the interpreter) against
``torch.nn.functional.rms_norm``, value and gradient (input and weight), with ``normalized_shape``
flattened into the last dimension as the layer does.

Tolerances: float64 rtol = atol = 1e-12 (both sides compute in float64; they differ only in the
order of the sums); float32 rtol = atol = 1e-6 (about 8 float32 ulps: torch's ``mean`` and the
kernel's ``tl.sum`` add in different orders); float16 and bfloat16 at ``torch.testing``'s own
tolerances for the dtype (both compute in float32 and round ``y = x r w`` once to the dtype, so
they differ by at most an ulp where the float32 sums round differently)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import triton_kernels.nn as K
from triton_kernels.nn import rms_norm

TOLERANCES = {
    torch.float64: {"rtol": 1e-12, "atol": 1e-12},
    torch.float32: {"rtol": 1e-6, "atol": 1e-6},
    torch.float16: {},
    torch.bfloat16: {},
}
# (input shape, normalized_shape): odd widths, one element, several normalised dims, rows past
# 32 KB of float32 (the wide, column-sliced kernels), many narrow rows (several per program).
SHAPES = [
    ((4, 37), (37,)),
    ((1, 1), (1,)),
    ((7, 1), (1,)),
    ((3, 4, 5), (4, 5)),
    ((2, 1025), (1025,)),
    ((3, 9000), (9000,)),
    ((130, 3), (3,)),
    ((33,), (33,)),
]


def _run(
    x: torch.Tensor,
    normalized_shape: tuple[int, ...],
    weight: torch.Tensor | None,
    eps: float | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """``(y, dL/dx, dL/dw, grad_output, rstd)`` of the kernels on ``x`` flattened to
    ``[rows, prod(normalized_shape)]``."""
    columns = math.prod(normalized_shape)
    rows = x.reshape(-1, columns)
    flat_weight = None if weight is None else weight.reshape(columns)
    output, rstd = K.rms_norm_forward(rows, flat_weight, eps)
    torch.manual_seed(1)
    grad_output = torch.randn(x.shape, dtype=x.dtype)
    grad_input, grad_weight = K.rms_norm_backward(
        grad_output.reshape(-1, columns), rows, flat_weight, rstd
    )
    grad_weight = None if grad_weight is None else grad_weight.reshape(normalized_shape)
    return output.reshape(x.shape), grad_input.reshape(x.shape), grad_weight, grad_output, rstd


def _cases() -> list[tuple[tuple[int, ...], tuple[int, ...], torch.dtype, bool, float | None]]:
    """Every shape x dtype x weight x eps, the wide rows (9000 values, slow in the interpreter)
    in float64 and float32 with eps None and 1e-5 only."""
    cases = []
    for shape, normalized_shape in SHAPES:
        for dtype in TOLERANCES:
            for weighted in (True, False):
                for eps in (None, 1e-5, 0.3):
                    wide = shape[-1] >= 9000
                    if wide and (dtype in (torch.float16, torch.bfloat16) or eps == 0.3):
                        continue
                    cases.append((shape, normalized_shape, dtype, weighted, eps))
    return cases


@pytest.mark.parametrize(("shape", "normalized_shape", "dtype", "weighted", "eps"), _cases())
def test_rms_norm_value_and_gradients_match_torch(
    shape: tuple[int, ...],
    normalized_shape: tuple[int, ...],
    dtype: torch.dtype,
    weighted: bool,
    eps: float | None,
) -> None:
    torch.manual_seed(0)
    x = torch.randn(shape, dtype=dtype, requires_grad=True)
    weight = torch.randn(normalized_shape, dtype=dtype, requires_grad=True) if weighted else None
    output, grad_input, grad_weight, grad_output, _ = _run(
        x.detach(), normalized_shape, None if weight is None else weight.detach(), eps
    )
    expected = F.rms_norm(x, normalized_shape, weight, eps)
    expected.backward(grad_output)
    tolerance = TOLERANCES[dtype]
    torch.testing.assert_close(output, expected.detach(), **tolerance)
    torch.testing.assert_close(grad_input, x.grad, **tolerance)
    if weight is None:
        assert grad_weight is None
    else:
        torch.testing.assert_close(grad_weight, weight.grad, **tolerance)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
def test_default_eps_is_the_compute_dtypes_epsilon_as_torch(dtype: torch.dtype) -> None:
    # torch's eps=None is float32's epsilon (2⁻²³) for half inputs, not the input dtype's
    # (bfloat16's 2⁻⁷ would dominate mean(x²) ~ 1e-6 here)
    expected_eps = torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).eps
    assert rms_norm.default_eps(dtype) == expected_eps
    torch.manual_seed(0)
    x = (torch.randn(4, 16) * 1e-3).to(dtype)
    output, rstd = K.rms_norm_forward(x)
    torch.testing.assert_close(output, F.rms_norm(x, (16,)), **TOLERANCES[dtype])
    compute = x.double()
    expected_rstd = torch.rsqrt(compute.pow(2).mean(-1) + expected_eps)
    torch.testing.assert_close(rstd.double(), expected_rstd, rtol=1e-6, atol=0)
    assert rstd.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)


def test_rms_norm_without_weight_gradient_returns_none_and_the_same_input_gradient() -> None:
    torch.manual_seed(0)
    x, weight, g = torch.randn(5, 12), torch.randn(12), torch.randn(5, 12)
    _, rstd = K.rms_norm_forward(x, weight)
    grad_input, grad_weight = K.rms_norm_backward(g, x, weight, rstd)
    only_input, none = K.rms_norm_backward(g, x, weight, rstd, compute_weight_grad=False)
    assert grad_weight is not None and none is None
    torch.testing.assert_close(only_input, grad_input, rtol=0, atol=0)


@pytest.mark.parametrize("shape", [(0, 8), (3, 0), (0,)])
def test_empty_inputs_launch_nothing_and_match_torch(shape: tuple[int, ...]) -> None:
    x = torch.randn(shape, requires_grad=True)
    weight = torch.randn(shape[-1], requires_grad=True)
    expected = F.rms_norm(x, (shape[-1],), weight)
    expected.sum().backward()
    output, rstd = K.rms_norm_forward(x.detach(), weight.detach())
    grad_input, grad_weight = K.rms_norm_backward(
        torch.ones_like(output), x.detach(), weight.detach(), rstd
    )
    assert output.shape == expected.shape and grad_input.shape == x.shape
    torch.testing.assert_close(grad_weight, weight.grad)


def test_rms_norm_launchers_refuse_bad_inputs_naming_the_bad_value() -> None:
    x, weight = torch.randn(3, 4), torch.randn(4)
    with pytest.raises(NotImplementedError, match=r"torch\.int64"):
        K.rms_norm_forward(torch.ones(3, 4, dtype=torch.int64))
    with pytest.raises(RuntimeError, match=r"weight of shape \[4\], got \[5\]"):
        K.rms_norm_forward(x, torch.randn(5))
    with pytest.raises(RuntimeError, match=r"weight of dtype torch\.float32, got torch\.float64"):
        K.rms_norm_forward(x, weight.double())
    with pytest.raises(RuntimeError, match="must be contiguous"):
        K.rms_norm_forward(x.t())
    with pytest.raises(RuntimeError, match="0-D"):
        K.rms_norm_forward(torch.tensor(1.0))
    _, rstd = K.rms_norm_forward(x, weight)
    with pytest.raises(RuntimeError, match=r"rstd of dtype torch\.float32, got torch\.float64"):
        K.rms_norm_backward(torch.ones(3, 4), x, weight, rstd.double())
    with pytest.raises(RuntimeError, match=r"rstd of shape \[3\], got \[2\]"):
        K.rms_norm_backward(torch.ones(3, 4), x, weight, rstd[:2])
    with pytest.raises(RuntimeError, match=r"grad_output of shape \[3, 4\], got \[4, 3\]"):
        K.rms_norm_backward(torch.ones(4, 3), x, weight, rstd)
