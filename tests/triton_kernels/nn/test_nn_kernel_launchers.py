"""Each layer launcher, run by the Triton interpreter on the CPU, against torch.nn.functional and
its autograd gradients, in float32 and float64, on small and odd shapes (one row, widths that are
not powers of two, rows wider than one block, masked tails); bad input raises torch's error type
quoting the bad value."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F

import triton_kernels.nn as K

# Stated tolerances: float32 ~ a few ulp of the result, float64 ~1e-10 (never loosened to pass).
# σ(z) = 1 / (1 + exp(-z)) overflows exp to inf (and σ correctly to 0) for very negative z; the
# interpreter's numpy warns where a GPU would not.
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")


# On a machine with CUDA the same tests run the compiled kernels on the GPU: every tensor a test
# makes lands there (tests/triton_kernels/conftest.py).

TOLERANCES = {
    torch.float32: {"rtol": 1e-5, "atol": 1e-6},
    torch.float64: {"rtol": 1e-10, "atol": 1e-12},
}
DTYPES = list(TOLERANCES)


def close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    torch.testing.assert_close(actual, expected.to(actual.dtype), **TOLERANCES[dtype])


ACTIVATION_REFERENCES: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "identity": lambda z: z,
    "relu": F.relu,
    "leaky_relu": lambda z: F.leaky_relu(z, 0.2),
    "sigmoid": torch.sigmoid,
    "tanh": torch.tanh,
    "gelu": F.gelu,
    "gelu_tanh": lambda z: F.gelu(z, approximate="tanh"),
    "silu": F.silu,
}
# (shape, bias): one row; odd widths; a width past one 1024-column block with a masked tail.
ACTIVATION_SHAPES = [((1, 5), True), ((7, 33), True), ((3, 2, 1030), False)]


def _activation_input(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    h = 3 * torch.randn(shape, dtype=dtype)
    # Values near 0 (tanh's series branch) and far out (saturation, GELU's tails).
    special = torch.tensor([1e-3, -1e-5, 0.09, -0.11, 12.0, -12.0], dtype=dtype)
    count = min(h.numel(), special.numel())
    h.view(-1)[:count] = special[:count]
    return h


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("shape", "with_bias"), ACTIVATION_SHAPES)
@pytest.mark.parametrize("activation", K.ACTIVATIONS)
def test_bias_activation_matches_torch_value_and_gradients(
    activation: str, shape: tuple[int, ...], with_bias: bool, dtype: torch.dtype
) -> None:
    torch.manual_seed(0)
    # The oracle runs in float64: torch's float32 GELU-tanh computes 1 + tanh(u), which cancels
    # to 0 in the far negative tail, where the kernel's equal σ(2u) keeps its digits.
    h = _activation_input(shape, dtype).double().requires_grad_()
    bias = torch.randn(shape[-1], dtype=dtype).double().requires_grad_() if with_bias else None
    expected = ACTIVATION_REFERENCES[activation](h + bias if with_bias else h)
    grad_output = torch.randn_like(expected)
    expected.backward(grad_output)

    detached_bias = None if bias is None else bias.detach().to(dtype)
    output = K.bias_activation_forward(h.detach().to(dtype), detached_bias, activation, 0.2)
    saved = output if activation in K.OUTPUT_DERIVATIVE else h.detach().to(dtype)
    grad_input, grad_bias = K.bias_activation_backward(
        grad_output.to(dtype), saved, detached_bias, activation, 0.2, compute_grad_bias=with_bias
    )
    close(output, expected.detach(), dtype)
    close(grad_input, h.grad, dtype)
    if with_bias:
        close(grad_bias, bias.grad, dtype)
    else:
        assert grad_bias is None


def test_bias_activation_writes_in_place_into_out() -> None:
    h = torch.randn(4, 9)
    expected = F.relu(h + 1)
    result = K.bias_activation_forward(h, torch.ones(9), "relu", out=h)
    assert result is h
    torch.testing.assert_close(h, expected, rtol=0, atol=0)


# (shape, dim): one element; one row; a row wider than a block (4096 float32 / 2048 float64
# values) with a masked tail; a middle dimension (moved last and back); a 0-D input.
SOFTMAX_CASES = [
    ((1, 1), -1),
    ((3, 7), 1),
    ((2, 5001), -1),
    ((4, 3, 5), 1),
    ((4, 3, 5), 0),
    ((), 0),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("log", [False, True], ids=["softmax", "log_softmax"])
@pytest.mark.parametrize(("shape", "dim"), SOFTMAX_CASES)
def test_softmax_matches_torch_value_and_gradient(
    shape: tuple[int, ...], dim: int, log: bool, dtype: torch.dtype
) -> None:
    torch.manual_seed(0)
    x = 4 * torch.randn(shape, dtype=dtype)
    # The oracle is torch in float64 on the same (float32-representable) values: torch's own
    # float32 log-softmax gradient over a 5001-wide row is off by up to 1.9e-5 (its row sum
    # rounded), as far from the exact value as the stated tolerance, where the kernel's is 3e-6.
    exact = x.double().requires_grad_()
    reference = F.log_softmax if log else F.softmax
    expected = reference(exact, dim)
    grad_output = torch.randn_like(expected).to(dtype)
    expected.backward(grad_output.double())
    output, lse = K.softmax_forward(x, dim, log)
    close(output, expected.detach(), dtype)
    close(lse, torch.logsumexp(exact.detach(), dim if x.dim() else 0), dtype)
    close(K.softmax_backward(grad_output, output, dim, log), exact.grad, dtype)


@pytest.mark.parametrize("log", [False, True], ids=["softmax", "log_softmax"])
def test_softmax_is_stable_for_large_and_infinite_logits(log: bool) -> None:
    x = torch.tensor([[1000.0, 999.0, -math.inf, 998.0], [-1e4, 0.0, 1e4, -math.inf]])
    output, _ = K.softmax_forward(x, -1, log)
    expected = F.log_softmax(x, -1) if log else F.softmax(x, -1)
    torch.testing.assert_close(output, expected, rtol=1e-6, atol=1e-6)


# (rows, classes, weighted, ignore a row, label_smoothing): one class; odd widths; a row wider
# than one block.
CROSS_ENTROPY_CASES = [
    (1, 1, False, False, 0.0),
    (6, 11, False, False, 0.0),
    (6, 11, True, True, 0.0),
    (6, 11, False, True, 0.3),
    (6, 11, True, True, 0.3),
    (2, 5001, True, False, 0.1),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("rows", "classes", "weighted", "ignore", "label_smoothing"), CROSS_ENTROPY_CASES
)
def test_cross_entropy_matches_torch_per_row_loss_and_gradient(
    rows: int,
    classes: int,
    weighted: bool,
    ignore: bool,
    label_smoothing: float,
    dtype: torch.dtype,
) -> None:
    torch.manual_seed(0)
    x = (3 * torch.randn(rows, classes, dtype=dtype)).requires_grad_()
    target = torch.randint(0, classes, (rows,))
    if ignore:
        target[1] = 7 if classes > 7 else -100
    ignore_index = 7 if ignore and classes > 7 else -100
    weight = torch.rand(classes, dtype=dtype) + 0.1 if weighted else None
    expected = F.cross_entropy(
        x,
        target,
        weight,
        ignore_index=ignore_index,
        reduction="none",
        label_smoothing=label_smoothing,
    )
    grad_loss = torch.randn(rows, dtype=dtype)
    expected.backward(grad_loss)
    loss, lse = K.cross_entropy_forward(x.detach(), target, weight, ignore_index, label_smoothing)
    # Only per-row values come back from the forward: no [rows, classes] softmax is kept.
    assert loss.shape == lse.shape == (rows,)
    close(loss, expected.detach(), dtype)
    close(lse, torch.logsumexp(x.detach(), 1), dtype)
    grad_input = K.cross_entropy_backward(
        grad_loss, x.detach(), target, lse, weight, ignore_index, label_smoothing
    )
    close(grad_input, x.grad, dtype)


# (rows, classes, weighted, label_smoothing): one class; odd widths; a row wider than one block.
PROBABILITY_CASES = [
    (1, 1, False, 0.0),
    (5, 7, False, 0.0),
    (5, 7, True, 0.2),
    (2, 5001, True, 0.1),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("rows", "classes", "weighted", "label_smoothing"), PROBABILITY_CASES)
def test_cross_entropy_with_probabilities_matches_torch_per_row_loss_and_gradient(
    rows: int, classes: int, weighted: bool, label_smoothing: float, dtype: torch.dtype
) -> None:
    torch.manual_seed(0)
    x = (3 * torch.randn(rows, classes, dtype=dtype)).requires_grad_()
    target = torch.softmax(torch.randn(rows, classes, dtype=dtype), 1)
    weight = torch.rand(classes, dtype=dtype) + 0.5 if weighted else None
    expected = F.cross_entropy(x, target, weight, reduction="none", label_smoothing=label_smoothing)
    grad_loss = torch.randn(rows, dtype=dtype)
    expected.backward(grad_loss)
    loss, lse, mass = K.cross_entropy_probabilities_forward(
        x.detach(), target, weight, label_smoothing
    )
    assert loss.shape == lse.shape == mass.shape == (rows,)
    close(loss, expected.detach(), dtype)
    close(lse, torch.logsumexp(x.detach(), 1), dtype)
    grad_input = K.cross_entropy_probabilities_backward(
        grad_loss, x.detach(), target, lse, mass, weight, label_smoothing
    )
    close(grad_input, x.grad, dtype)


def test_cross_entropy_backward_broadcasts_one_gradient_to_every_row() -> None:
    x = torch.randn(5, 4, requires_grad=True)
    target = torch.tensor([0, 1, 2, 3, 0])
    F.cross_entropy(x, target, reduction="sum").backward()
    _, lse = K.cross_entropy_forward(x.detach(), target)
    grad_input = K.cross_entropy_backward(torch.tensor(1.0), x.detach(), target, lse)
    torch.testing.assert_close(grad_input, x.grad, **TOLERANCES[torch.float32])


# (shape, affine): one row; odd width; several rows per program with a masked row tile;
# more row tiles than backward programs (each strides over several); a row past 1024 columns.
LAYER_NORM_CASES = [
    ((1, 9), True),
    ((3, 7), True),
    ((70, 5), False),
    ((1000, 3), True),
    ((2, 3, 40), True),
    ((2, 1500), True),
    # Wider than 32 KB in the compute dtype: the wide kernels, a masked last slice, and more row
    # tiles (4 rows each) than backward programs.
    ((37, 8195), True),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("shape", "affine"), LAYER_NORM_CASES)
def test_layer_norm_matches_torch_value_and_gradients(
    shape: tuple[int, ...], affine: bool, dtype: torch.dtype
) -> None:
    torch.manual_seed(0)
    x = (2 * torch.randn(shape, dtype=dtype) + 1).requires_grad_()
    width = shape[-1]
    weight = torch.randn(width, dtype=dtype, requires_grad=True) if affine else None
    bias = torch.randn(width, dtype=dtype, requires_grad=True) if affine else None
    expected = F.layer_norm(x, (width,), weight, bias, 1e-5)
    grad_output = torch.randn_like(expected)
    expected.backward(grad_output)
    detached = [None if t is None else t.detach() for t in (weight, bias)]
    output, mean, rstd = K.layer_norm_forward(x.detach(), *detached, eps=1e-5)
    close(output, expected.detach(), dtype)
    variance, expected_mean = torch.var_mean(x.detach(), -1, correction=0)
    close(mean, expected_mean.reshape(-1), dtype)
    close(rstd, torch.rsqrt(variance + 1e-5).reshape(-1), dtype)
    grad_input, grad_weight, grad_bias = K.layer_norm_backward(
        grad_output, x.detach(), detached[0], mean, rstd
    )
    close(grad_input, x.grad, dtype)
    if affine:
        normalized = (x.detach() - expected_mean[..., None]) * rstd.reshape(x.shape[:-1])[..., None]
        terms = {"weight": grad_output * normalized, "bias": grad_output}
        for name, grad, expected_grad in (
            ("weight", grad_weight, weight.grad),
            ("bias", grad_bias, bias.grad),
        ):
            if dtype == torch.float64:
                close(grad, expected_grad, dtype)
                continue
            # dL/dw and dL/db sum over every row: float32 summation (ours and torch's, in different
            # orders) is good to a few eps times the sum of the terms' magnitudes, which is the
            # bound here (the elementwise tolerance would fail a sum that cancels to near zero).
            rows = terms[name].reshape(-1, width)
            bound = 1e-5 * expected_grad.abs() + 8 * torch.finfo(dtype).eps * rows.abs().sum(0)
            assert ((grad - expected_grad).abs() <= bound).all(), name


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_dropout_keeps_a_binomial_fraction_and_scales_by_one_over_keep(p: float) -> None:
    n = 20000
    x = torch.rand(n, dtype=torch.float64) + 0.5
    output = K.dropout_forward(x, p, seed=1234)
    kept = output != 0
    # The kept count is Binomial(n, 1 - p): within 5 standard deviations (fails ~1 in 1.7 million).
    assert abs(kept.sum().item() - n * (1 - p)) <= 5 * math.sqrt(n * p * (1 - p))
    torch.testing.assert_close(output[kept], x[kept] / (1 - p), rtol=1e-15, atol=0)


def test_dropout_mask_is_determined_by_the_seed() -> None:
    x = torch.randn(3, 1001)
    first = K.dropout_forward(x, 0.5, seed=7)
    assert torch.equal(first, K.dropout_forward(x, 0.5, seed=7))
    assert not torch.equal(first != 0, K.dropout_forward(x, 0.5, seed=8) != 0)
    torch.manual_seed(3)
    seed = K.new_seed()
    torch.manual_seed(3)
    assert K.new_seed() == seed


@pytest.mark.parametrize("dtype", DTYPES)
def test_dropout_backward_regenerates_exactly_the_forward_mask(dtype: torch.dtype) -> None:
    x = torch.rand(2, 999, dtype=dtype) + 0.5
    output = K.dropout_forward(x, 0.3, seed=99)
    grad_output = torch.rand_like(x) + 0.5
    grad_input = K.dropout_backward(grad_output, 0.3, seed=99)
    assert torch.equal(grad_input != 0, output != 0)
    close(grad_input, grad_output * (output != 0) / 0.7, dtype)


def test_dropout_writes_in_place_into_out() -> None:
    x = torch.rand(100) + 0.5
    expected = K.dropout_forward(x, 0.4, seed=5)
    assert K.dropout_forward(x, 0.4, seed=5, out=x) is x
    assert torch.equal(x, expected)


# Shapes [N, C, *]: no spatial dims; odd sizes; a spatial extent past one 1024 block.
BATCH_NORM_SHAPES = [(4, 3), (5, 3, 7, 3), (2, 2, 1030), (1, 1, 2)]


def _channel(vector: torch.Tensor, ndim: int) -> torch.Tensor:
    return vector.reshape([1, -1] + [1] * (ndim - 2))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", BATCH_NORM_SHAPES)
def test_batch_norm_kernels_match_torch(shape: tuple[int, ...], dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    x = 2 * torch.randn(shape, dtype=dtype) + 3
    dims = [0, *range(2, x.dim())]
    mean, variance = K.batch_norm_statistics(x)
    expected_variance, expected_mean = torch.var_mean(x, dims, correction=0)
    close(mean, expected_mean, dtype)
    close(variance, expected_variance, dtype)
    grad_output = torch.randn_like(x)
    total, dot = K.batch_norm_gradient_sums(grad_output, x, mean)
    close(total, grad_output.sum(dims), dtype)
    close(dot, (grad_output * (x - _channel(expected_mean, x.dim()))).sum(dims), dtype)
    scale, shift, second_scale = (torch.randn(shape[1], dtype=dtype) for _ in range(3))
    expected = (
        x * _channel(scale, x.dim())
        + _channel(shift, x.dim())
        + grad_output * _channel(second_scale, x.dim())
    )
    close(K.channel_affine(x, scale, shift, grad_output, second_scale), expected, dtype)
    close(
        K.channel_affine(x, scale, shift),
        expected - grad_output * _channel(second_scale, x.dim()),
        dtype,
    )


def test_batch_norm_variance_survives_a_large_mean_in_float32() -> None:
    torch.manual_seed(0)
    # E[x²] - μ² would lose every digit here (μ² ~ 1e8 against σ² ~ 1 in float32).
    x = 1e4 + torch.randn(64, 2, 33, dtype=torch.float64)
    _, variance = K.batch_norm_statistics(x.float())
    # Oracle: the exact variance of the float32 inputs the kernel saw; float32 accumulation of
    # 2112 centred squares is good to a few 1e-6, measured 1.7e-5 worst case with this seed.
    expected = x.float().double().var((0, 2), correction=0)
    torch.testing.assert_close(variance.double(), expected, rtol=5e-5, atol=0)


ERRORS: list[tuple[str, Callable[[], Any], type[Exception], str]] = [
    (
        "integer input",
        lambda: K.bias_activation_forward(torch.ones(3, dtype=torch.long)),
        NotImplementedError,
        "torch.int64",
    ),
    (
        "unknown activation",
        lambda: K.bias_activation_forward(torch.ones(3), None, "swish"),
        ValueError,
        "'swish'",
    ),
    (
        "bias shape",
        lambda: K.bias_activation_forward(torch.ones(2, 4), torch.ones(5)),
        RuntimeError,
        r"\[5\]",
    ),
    (
        "bias dtype",
        lambda: K.bias_activation_forward(torch.ones(2, 4), torch.ones(4).double()),
        RuntimeError,
        "torch.float64",
    ),
    (
        "non-contiguous",
        lambda: K.bias_activation_forward(torch.ones(4, 6).t()),
        RuntimeError,
        r"strides \(1, 6\)",
    ),
    ("softmax dim", lambda: K.softmax_forward(torch.ones(2, 3), 2), IndexError, "got 2"),
    (
        "grad shape",
        lambda: K.softmax_backward(torch.ones(2, 4), torch.ones(2, 3)),
        RuntimeError,
        r"\[2, 4\]",
    ),
    (
        "target range",
        lambda: K.cross_entropy_forward(torch.ones(2, 3), torch.tensor([0, 3])),
        IndexError,
        "Target 3 is out of bounds",
    ),
    (
        "negative target",
        lambda: K.cross_entropy_forward(torch.ones(2, 3), torch.tensor([-1, 0])),
        IndexError,
        "Target -1 is out of bounds",
    ),
    (
        "target dtype",
        lambda: K.cross_entropy_forward(torch.ones(2, 3), torch.tensor([0, 1], dtype=torch.int32)),
        RuntimeError,
        "torch.int32",
    ),
    (
        "3-D logits",
        lambda: K.cross_entropy_forward(torch.ones(2, 3, 4), torch.zeros(2).long()),
        RuntimeError,
        r"\[2, 3, 4\]",
    ),
    (
        "label smoothing",
        lambda: K.cross_entropy_forward(
            torch.ones(2, 3), torch.tensor([0, 1]), label_smoothing=1.5
        ),
        RuntimeError,
        "1.5",
    ),
    (
        "probability target shape",
        lambda: K.cross_entropy_probabilities_forward(torch.ones(2, 3), torch.ones(2, 4)),
        RuntimeError,
        r"\[2, 4\]",
    ),
    (
        "probability target dtype",
        lambda: K.cross_entropy_probabilities_forward(torch.ones(2, 3), torch.ones(2, 3).double()),
        RuntimeError,
        "torch.float64",
    ),
    (
        "weight shape",
        lambda: K.cross_entropy_forward(torch.ones(2, 3), torch.tensor([0, 1]), torch.ones(4)),
        RuntimeError,
        r"\[4\]",
    ),
    ("0-D layer norm", lambda: K.layer_norm_forward(torch.tensor(1.0)), RuntimeError, "0-D"),
    (
        "stat dtype",
        lambda: K.layer_norm_backward(
            torch.ones(2, 3), torch.ones(2, 3), None, torch.ones(2).double(), torch.ones(2)
        ),
        RuntimeError,
        "torch.float64",
    ),
    ("dropout p", lambda: K.dropout_forward(torch.ones(3), 1.0, seed=0), ValueError, "1.0"),
    (
        "dropout negative p",
        lambda: K.dropout_forward(torch.ones(3), -0.1, seed=0),
        ValueError,
        "-0.1",
    ),
    ("dropout seed", lambda: K.dropout_forward(torch.ones(3), 0.5, seed=-2), ValueError, "-2"),
    ("batch norm 1-D", lambda: K.batch_norm_statistics(torch.ones(5)), RuntimeError, r"\[5\]"),
    (
        "empty batch norm",
        lambda: K.batch_norm_statistics(torch.ones(0, 3)),
        RuntimeError,
        r"\[0, 3\]",
    ),
    (
        "affine scale shape",
        lambda: K.channel_affine(torch.ones(2, 3), torch.ones(2), torch.ones(3)),
        RuntimeError,
        r"\[2\]",
    ),
]


@pytest.mark.parametrize(("case", "call", "error", "message"), ERRORS, ids=[e[0] for e in ERRORS])
def test_launcher_refuses_bad_input_quoting_it(
    case: str, call: Callable[[], Any], error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        call()


@pytest.mark.parametrize(
    "call",
    [
        lambda: K.bias_activation_forward(torch.ones(0, 4), torch.ones(4), "gelu"),
        lambda: K.softmax_forward(torch.ones(0, 4))[0],
        lambda: K.layer_norm_forward(torch.ones(0, 4))[0],
        lambda: K.dropout_forward(torch.ones(0), 0.5, seed=1),
        lambda: K.channel_affine(torch.ones(0, 3), torch.ones(3), torch.ones(3)),
    ],
    ids=["bias_activation", "softmax", "layer_norm", "dropout", "channel_affine"],
)
def test_launcher_returns_empty_for_zero_size_input_without_launching(call: Callable) -> None:
    assert call().numel() == 0


def test_launchers_give_torch_values_for_rows_without_columns() -> None:
    _, lse = K.softmax_forward(torch.ones(3, 0))
    assert torch.equal(lse, torch.logsumexp(torch.ones(3, 0), -1))
    target = torch.full((2,), -100)
    loss, lse = K.cross_entropy_forward(torch.ones(2, 0), target)
    assert torch.equal(loss, torch.zeros(2))
    assert torch.equal(lse, torch.full((2,), -torch.inf))


@pytest.mark.parametrize("smoothing", [0.0, 0.2])
@pytest.mark.parametrize("weighted", [False, True])
def test_unchecked_out_of_range_targets_are_never_read_and_give_nan_rows(
    smoothing: float, weighted: bool
) -> None:
    # check_target=False (no host sync): before, a target of 9 or -3 with 5 classes was loaded
    # as an index (weight[t], x[t]) out of bounds. Now those rows' loss and gradient are NaN, the
    # others exact, and an ignored row stays 0.
    torch.manual_seed(0)
    x = torch.randn(5, 5, dtype=torch.float64)
    target = torch.tensor([0, 9, -3, -100, 4])
    weight = torch.rand(5, dtype=torch.float64) + 0.5 if weighted else None
    loss, lse = K.cross_entropy_forward(
        x, target, weight, label_smoothing=smoothing, check_target=False
    )
    grad = K.cross_entropy_backward(
        torch.ones(5, dtype=torch.float64), x, target, lse, weight, -100, smoothing
    )
    bad = torch.tensor([False, True, True, False, False])
    assert loss[bad].isnan().all() and grad[bad].isnan().all()
    good = torch.tensor([0, 4])
    reference = x[good].requires_grad_()
    expected = F.cross_entropy(
        reference, target[good], weight, reduction="none", label_smoothing=smoothing
    )
    expected.sum().backward()
    torch.testing.assert_close(loss[good], expected.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad[good], reference.grad, rtol=1e-12, atol=1e-12)
    assert loss[3] == 0 and (grad[3] == 0).all()
