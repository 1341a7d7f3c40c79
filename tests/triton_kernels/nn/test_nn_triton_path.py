"""``torchopt_lab.nn.functional`` with the backend forced to Triton
(``TORCHOPT_LAB_BACKEND=triton``, kernels under the interpreter): it runs the kernels (the
recorded decision and the autograd node say so), matches the torch path in value and gradient in
float32 and float64, passes the gradcheck harness against torch.nn.functional, and raises when
differentiated twice; the ops without a kernel record that torch ran."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import torch
import torch.nn.functional as TF

import torchopt_lab.nn.functional as F
from torchopt_lab import backend, backend_info
from torchopt_lab import nn as our_nn
from torchopt_lab.nn import _dropout
from torchopt_lab.nn.fused import ACTIVATIONS, LinearActivationTritonFunction, linear_activation
from torchopt_lab.testing import CHECKS, check_function

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


@pytest.fixture(autouse=True)
def _one_torch_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@dataclass(frozen=True)
class Case:
    """``F.<name>(*inputs(dtype), **options)``; ``kernel`` is False for ops the Triton path runs
    on torch (it then records ``torch_component``)."""

    id: str
    name: str
    inputs: Callable[[torch.dtype], tuple[Any, ...]]
    options: dict[str, Any]
    kernel: bool = True
    torch_component: str | None = None


def leaf(dtype: torch.dtype, *shape: int) -> torch.Tensor:
    return torch.randn(shape, dtype=dtype, requires_grad=True)


def labels(classes: int, *shape: int, ignore: int = -100) -> torch.Tensor:
    target = torch.randint(0, classes, shape)
    target.view(-1)[0] = ignore
    return target


def case(
    id: str,
    name: str,
    inputs: Callable[[torch.dtype], tuple[Any, ...]],
    kernel: bool = True,
    torch_component: str | None = None,
    **options: Any,
) -> Case:
    return Case(id, name, inputs, options, kernel, torch_component)


CASES = [
    case("relu", "relu", lambda d: (leaf(d, 3, 37),)),
    case("leaky_relu", "leaky_relu", lambda d: (leaf(d, 3, 37), 0.2)),
    case("sigmoid", "sigmoid", lambda d: (leaf(d, 3, 37),)),
    case("tanh", "tanh", lambda d: (leaf(d, 3, 37),)),
    case("gelu", "gelu", lambda d: (leaf(d, 3, 37),)),
    case("gelu_tanh", "gelu", lambda d: (leaf(d, 3, 37),), approximate="tanh"),
    case("silu", "silu", lambda d: (leaf(d, 3, 37),)),
    case("softmax_last", "softmax", lambda d: (leaf(d, 4, 9),), dim=-1),
    case("softmax_middle", "softmax", lambda d: (leaf(d, 2, 5, 3),), dim=1),
    case("log_softmax_first", "log_softmax", lambda d: (leaf(d, 5, 3),), dim=0),
    case("cross_entropy_mean", "cross_entropy", lambda d: (leaf(d, 6, 7), labels(7, 6))),
    case(
        "cross_entropy_weighted_smoothed_sum",
        "cross_entropy",
        lambda d: (leaf(d, 6, 7), labels(7, 6, ignore=3), torch.rand(7, dtype=d) + 0.5),
        ignore_index=3,
        label_smoothing=0.2,
        reduction="sum",
    ),
    case(
        "cross_entropy_spatial_none",
        "cross_entropy",
        lambda d: (leaf(d, 2, 5, 3), labels(5, 2, 3)),
        reduction="none",
        label_smoothing=0.1,
    ),
    case("cross_entropy_one_sample", "cross_entropy", lambda d: (leaf(d, 5), torch.tensor(2))),
    case(
        "cross_entropy_probabilities",
        "cross_entropy",
        lambda d: (leaf(d, 4, 5), torch.softmax(torch.randn(4, 5, dtype=d), 1)),
    ),
    case(
        "cross_entropy_probabilities_weighted_smoothed_spatial",
        "cross_entropy",
        lambda d: (
            leaf(d, 2, 5, 3),
            torch.softmax(torch.randn(2, 5, 3, dtype=d), 1).requires_grad_(),
            (torch.rand(5, dtype=d) + 0.5).requires_grad_(),
        ),
        label_smoothing=0.2,
        reduction="none",
    ),
    case(
        "cross_entropy_probabilities_sum",
        "cross_entropy",
        lambda d: (leaf(d, 5), torch.softmax(torch.randn(5, dtype=d), 0)),
        reduction="sum",
    ),
    case(
        "layer_norm_affine",
        "layer_norm",
        lambda d: (leaf(d, 4, 9), [9], leaf(d, 9), leaf(d, 9)),
    ),
    case("layer_norm_two_dims", "layer_norm", lambda d: (leaf(d, 3, 2, 5), [2, 5])),
    case("rms_norm_weighted", "rms_norm", lambda d: (leaf(d, 4, 9), [9], leaf(d, 9))),
    case("rms_norm_two_dims", "rms_norm", lambda d: (leaf(d, 3, 2, 5), [2, 5]), eps=1e-3),
    case(
        "batch_norm_training",
        "batch_norm",
        lambda d: (
            leaf(d, 3, 2, 3),
            torch.zeros(2, dtype=d),
            torch.ones(2, dtype=d),
            leaf(d, 2),
            leaf(d, 2),
            True,
        ),
    ),
    case(
        "batch_norm_eval",
        "batch_norm",
        lambda d: (
            leaf(d, 2, 3, 2, 2),
            torch.randn(3, dtype=d),
            torch.rand(3, dtype=d) + 0.5,
            leaf(d, 3),
            None,
            False,
        ),
    ),
    case(
        "linear",
        "linear",
        lambda d: (leaf(d, 4, 5), leaf(d, 3, 5), leaf(d, 3)),
        kernel=False,
        torch_component="nn.linear.gemm",
    ),
    case(
        "conv2d",
        "conv2d",
        lambda d: (leaf(d, 1, 2, 5, 5), leaf(d, 3, 2, 3, 3), leaf(d, 3)),
        kernel=False,
        torch_component="nn.conv2d.convolution",
        padding=1,
    ),
    case(
        "mse_loss",
        "mse_loss",
        lambda d: (leaf(d, 4, 3), leaf(d, 4, 3)),
        kernel=False,
        torch_component="nn.mse_loss.loss",
    ),
]
IDS = [c.id for c in CASES]
KERNEL_CASES = [c for c in CASES if c.kernel]
KERNEL_IDS = [c.id for c in KERNEL_CASES]


def _copy(value: Any) -> Any:
    if not isinstance(value, torch.Tensor):
        return value
    return value.detach().clone().requires_grad_(value.requires_grad)


def _run(
    case: Case, inputs: tuple[Any, ...]
) -> tuple[torch.Tensor, tuple[torch.Tensor | None, ...], torch.Tensor]:
    """The output, the gradients of every input that requires grad, and the grad_output."""
    inputs = tuple(_copy(value) for value in inputs)
    output = getattr(F, case.name)(*inputs, **case.options)
    torch.manual_seed(1)
    grad_output = torch.randn_like(output)
    differentiable = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    grads = torch.autograd.grad(output, differentiable, grad_output)
    return output.detach(), grads, inputs


def _use(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    monkeypatch.setenv(backend.ENV_VAR, name)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_triton_path_matches_torch_path_value_and_gradient(
    case: Case, dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    torch.manual_seed(0)
    inputs = case.inputs(dtype)
    _use(monkeypatch, "torch")
    expected, expected_grads, torch_inputs = _run(case, inputs)
    _use(monkeypatch, "triton")
    output, grads, triton_inputs = _run(case, inputs)
    torch.testing.assert_close(output, expected, **TOLERANCES[dtype])
    for grad, expected_grad in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(grad, expected_grad, **TOLERANCES[dtype])
    for ours, theirs in zip(triton_inputs, torch_inputs, strict=True):
        # Batch norm's running statistics, updated in place, agree too.
        if isinstance(ours, torch.Tensor) and not ours.requires_grad:
            torch.testing.assert_close(ours, theirs, **TOLERANCES[dtype])


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_triton_path_runs_the_kernels_or_records_that_torch_ran(
    case: Case, monkeypatch: pytest.MonkeyPatch
) -> None:
    _use(monkeypatch, "triton")
    output = getattr(F, case.name)(*case.inputs(torch.float32), **case.options)
    decisions = backend_info()["decisions"]
    assert decisions[f"nn.{case.name}"]["backend"] == "triton"
    function = output.grad_fn._forward_cls
    # The op module's own Triton-path Function (named *TritonFunction) ran, or its torch path.
    if case.kernel:
        assert function.__name__.endswith("TritonFunction")
    else:
        assert not function.__name__.endswith("TritonFunction")
        assert decisions[case.torch_component]["backend"] == "torch"


@pytest.mark.parametrize("case", KERNEL_CASES, ids=KERNEL_IDS)
def test_triton_path_raises_when_differentiated_twice(
    case: Case, monkeypatch: pytest.MonkeyPatch
) -> None:
    _use(monkeypatch, "triton")
    inputs = case.inputs(torch.float64)
    output = getattr(F, case.name)(*inputs, **case.options)
    differentiable = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    with pytest.raises(RuntimeError, match="differentiable once"):
        torch.autograd.grad(output.sum(), differentiable, create_graph=True)
    # A grad_output that requires grad (the other way into a second derivative) meets
    # once_differentiable.
    vector = torch.randn_like(output, requires_grad=True)
    with pytest.raises(RuntimeError, match="differentiable once"):
        torch.autograd.grad(output, differentiable, vector, create_graph=True)


def test_hessian_vector_product_through_a_triton_loss_raises_instead_of_dropping_its_curvature(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _use(monkeypatch, "triton")
    weight = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    logits = F.linear(torch.randn(5, 3, dtype=torch.float64), weight)
    loss = F.cross_entropy(logits, torch.tensor([0, 1, 2, 3, 0]))
    # The linear layer is twice differentiable; without the check the Hessian-vector product
    # would silently treat the cross-entropy's gradient as a constant.
    with pytest.raises(RuntimeError, match="differentiable once"):
        torch.autograd.grad(loss, weight, create_graph=True)


@pytest.mark.parametrize("case", KERNEL_CASES, ids=KERNEL_IDS)
def test_triton_path_passes_the_harness_against_torch_nn_functional(
    case: Case, monkeypatch: pytest.MonkeyPatch
) -> None:
    _use(monkeypatch, "triton")
    torch.manual_seed(0)
    check_function(
        lambda *args: getattr(F, case.name)(*args, **case.options),
        *case.inputs(torch.float64),
        reference=lambda *args: getattr(TF, case.name)(*args, **case.options),
        modified_inputs=(1, 2) if case.name == "batch_norm" else (),
        # The harness's double_backward=False check expects the raise at the second derivative;
        # the Triton path raises earlier, at backward(create_graph=True), which
        # test_triton_path_raises_when_differentiated_twice holds it to.
        checks=[check for check in CHECKS if check != "gradgradcheck"],
    )


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_linear_activation_triton_matches_torch_path(
    activation: str, dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    torch.manual_seed(0)
    inputs = (leaf(dtype, 2, 3, 5), leaf(dtype, 7, 5), leaf(dtype, 7))
    results = {}
    for name in ("torch", "triton"):
        _use(monkeypatch, name)
        copies = [_copy(t) for t in inputs]
        output = linear_activation(*copies, activation=activation, negative_slope=0.2)
        torch.manual_seed(1)
        results[name] = (output, *torch.autograd.grad(output, copies, torch.randn_like(output)))
    assert issubclass(results["triton"][0].grad_fn._forward_cls, LinearActivationTritonFunction)
    assert backend_info()["decisions"]["nn.linear_activation.gemm"]["backend"] == "torch"
    for ours, expected in zip(results["triton"], results["torch"], strict=True):
        torch.testing.assert_close(ours, expected, **TOLERANCES[dtype])


def test_linear_activation_refuses_an_unknown_activation() -> None:
    with pytest.raises(ValueError, match="'swish'"):
        linear_activation(torch.ones(2, 3), torch.ones(4, 3), activation="swish")


@pytest.mark.parametrize("name", ["relu", "leaky_relu"])
def test_inplace_activation_on_the_triton_path_matches_torch(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    _use(monkeypatch, "triton")
    x = torch.randn(4, 6, requires_grad=True)
    # A non-contiguous view, written back in place.
    ours = (x * 1).t()
    result = getattr(F, name)(ours, inplace=True)
    assert result is ours
    expected = getattr(TF, name)(x.t())
    torch.testing.assert_close(ours, expected, rtol=0, atol=0)
    grad_output = torch.randn(6, 4)
    (grad,) = torch.autograd.grad(result, x, grad_output)
    (expected_grad,) = torch.autograd.grad(expected, x, grad_output)
    torch.testing.assert_close(grad, expected_grad, rtol=0, atol=0)


@pytest.mark.parametrize("inplace", [False, True])
def test_triton_dropout_scales_kept_values_and_backward_reuses_the_mask(
    inplace: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    _use(monkeypatch, "triton")
    x = (torch.rand(50, 40, dtype=torch.float64) + 0.5).requires_grad_()
    source = x * 1 if inplace else x
    output = F.dropout(source, 0.25, inplace=inplace)
    assert issubclass(output.grad_fn._forward_cls, _dropout.DropoutTritonFunction)
    kept = output != 0
    # Binomial(2000, 0.75) within 5 standard deviations.
    assert abs(kept.sum().item() - 2000 * 0.75) <= 5 * (2000 * 0.25 * 0.75) ** 0.5
    torch.testing.assert_close(output[kept], x.detach()[kept] / 0.75, rtol=1e-15, atol=0)
    grad_output = torch.rand_like(x) + 0.5
    (grad,) = torch.autograd.grad(output, x, grad_output)
    torch.testing.assert_close(grad, grad_output * kept / 0.75, rtol=1e-15, atol=0)


def test_triton_dropout_repeats_under_torch_manual_seed(monkeypatch: pytest.MonkeyPatch) -> None:
    _use(monkeypatch, "triton")
    x = torch.randn(30, 30)
    torch.manual_seed(5)
    first = F.dropout(x, 0.5)
    torch.manual_seed(5)
    assert torch.equal(F.dropout(x, 0.5), first)
    assert not torch.equal(F.dropout(x, 0.5), first)


def test_triton_dropout_with_p_one_zeroes_everything(monkeypatch: pytest.MonkeyPatch) -> None:
    _use(monkeypatch, "triton")
    x = torch.randn(5, requires_grad=True)
    output = F.dropout(x, 1.0)
    assert torch.equal(output, torch.zeros(5))
    (grad,) = torch.autograd.grad(output, x, torch.ones(5))
    assert torch.equal(grad, torch.zeros(5))


def test_training_step_of_a_model_on_the_triton_path_matches_the_torch_path(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def build() -> torch.nn.Module:
        torch.manual_seed(0)
        return our_nn.Sequential(
            our_nn.Linear(6, 8),
            our_nn.LayerNorm(8),
            our_nn.GELU(),
            our_nn.Linear(8, 8),
            our_nn.BatchNorm1d(8),
            our_nn.Tanh(),
            our_nn.Linear(8, 5),
        ).double()

    images, labels = torch.randn(7, 6, dtype=torch.float64), torch.randint(0, 5, (7,))
    models = {}
    for name in ("torch", "triton"):
        _use(monkeypatch, name)
        model = build()
        loss_function = our_nn.CrossEntropyLoss(label_smoothing=0.1)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        for _ in range(2):
            optimizer.zero_grad()
            loss_function(model(images), labels).backward()
            optimizer.step()
        models[name] = model
    ours, expected = models["triton"].state_dict(), models["torch"].state_dict()
    for key in expected:
        torch.testing.assert_close(ours[key], expected[key], **TOLERANCES[torch.float64])


ZERO_SIZE = {
    "relu": lambda x: F.relu(x),
    "softmax": lambda x: F.softmax(x, -1),
    "layer_norm": lambda x: F.layer_norm(x, [3], torch.ones(3, requires_grad=True)),
    "cross_entropy_mean": lambda x: F.cross_entropy(x, torch.empty(0, dtype=torch.long)),
    "cross_entropy_sum": lambda x: F.cross_entropy(
        x, torch.empty(0, dtype=torch.long), reduction="sum"
    ),
    "batch_norm": lambda x: F.batch_norm(
        x, None, None, torch.ones(3, requires_grad=True), None, training=True
    ),
}


@pytest.mark.parametrize("name", ZERO_SIZE)
def test_triton_path_handles_zero_size_input_like_torch(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    results = {}
    for path in ("torch", "triton"):
        _use(monkeypatch, path)
        x = torch.empty(0, 3, requires_grad=True)
        output = ZERO_SIZE[name](x)
        (grad,) = torch.autograd.grad(output.sum(), x)
        results[path] = (output, grad)
    # NaN (the mean over no rows) compares equal to NaN here.
    for ours, expected in zip(results["triton"], results["torch"], strict=True):
        torch.testing.assert_close(ours, expected, equal_nan=True)


# bfloat16 keeps 8 significant bits: both paths compute in float32 and round the result, but torch
# rounds some intermediates too, so they may differ by one unit in the last place (2^-7 relative).
HALF_TOLERANCES = {
    torch.bfloat16: {"rtol": 2**-7, "atol": 2**-7},
    torch.float16: {"rtol": 1e-3, "atol": 1e-3},
}
HALF_CALLS = {
    "gelu": lambda x: F.gelu(x),
    "softmax": lambda x: F.softmax(x, -1),
    "layer_norm": lambda x: F.layer_norm(x, [33]),
    "cross_entropy": lambda x: F.cross_entropy(x, torch.tensor([1, 2, 3, 4])),
}


@pytest.mark.parametrize("dtype", list(HALF_TOLERANCES))
@pytest.mark.parametrize("name", HALF_CALLS)
def test_triton_path_matches_torch_path_in_half_precision(
    name: str, dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    torch.manual_seed(0)
    x = torch.randn(4, 33, dtype=dtype)
    results = {}
    for path in ("torch", "triton"):
        _use(monkeypatch, path)
        leaf_x = x.clone().requires_grad_()
        output = HALF_CALLS[name](leaf_x)
        (grad,) = torch.autograd.grad(output, leaf_x, torch.ones_like(output))
        results[path] = (output, grad)
    for ours, expected in zip(results["triton"], results["torch"], strict=True):
        assert ours.dtype == dtype
        torch.testing.assert_close(ours, expected, **HALF_TOLERANCES[dtype])


def test_rms_norm_with_a_weight_of_another_dtype_runs_the_torch_path_and_records_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # torch computes with the float32 weight unrounded; the kernel would read it in bfloat16
    _use(monkeypatch, "triton")
    x = torch.randn(3, 8, dtype=torch.bfloat16)
    weight = torch.randn(8)
    output = F.rms_norm(x, [8], weight)
    assert not output.grad_fn or not type(output.grad_fn).__name__.startswith("RMSNormTriton")
    assert backend_info()["decisions"]["nn.rms_norm.dtype"]["backend"] == "torch"
    torch.testing.assert_close(output, TF.rms_norm(x, [8], weight), rtol=0, atol=0)
