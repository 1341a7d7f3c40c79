"""The gradcheck harness catches each kind of broken Function, by the check named for it, and
passes a correct one."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from torchopt_lab.testing import CHECKS, CheckFailed, check_function


class Sin(torch.autograd.Function):
    """A correct Function: ``y = sin(x)``, ``dL/dx = g cos(x)``."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)
        return x.sin()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        return grad * x.cos()


class ScaledBackward(Sin):
    """Backward 0.1% too large: a wrong derivative."""

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        return grad * x.cos() * 1.001


class OnceDifferentiable(Sin):
    """Backward through torch.no_grad ops only: a second derivative comes out wrong (zero)."""

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        return grad * x.detach().cos()


class ModifiesGradOutput(Sin):
    """Backward that overwrites grad_output in place."""

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        return grad.mul_(x.cos())


class ModifiesInput(torch.autograd.Function):
    """Forward that writes into its input without saying so."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        out = x.sin()
        x.zero_()
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        return grad


class AssumesContiguousInput(torch.autograd.Function):
    """Reads the input's storage as if it were contiguous."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        flat = torch.as_strided(x, (x.numel(),), (1,))
        return flat.view(x.shape) * 2

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        return grad * 2


class AssumesDenseGradOutput(torch.autograd.Function):
    """Reads grad_output's storage as if it were contiguous: wrong for a stride-0 gradient."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return x * 2

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        flat = torch.as_strided(grad, (grad.numel(),), (1,))
        return flat.reshape(grad.shape).clone() * 2


class FailsOnEmpty(torch.autograd.Function):
    """Backward that cannot handle zero-size tensors."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return x * 2

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        return grad * 2 + grad.max() * 0


class ConsumesSavedState(torch.autograd.Function):
    """Backward that changes its saved state, so a second backward differs."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        ctx.scale = 2.0
        return x * 2

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        scale = ctx.scale
        ctx.scale = 0.0
        return grad * scale


def double(x: torch.Tensor) -> torch.Tensor:
    return x * 2


# (Function, reference, the checks that must fail)
BROKEN = [
    (ScaledBackward.apply, torch.sin, {"gradcheck", "reference_float64", "reference_float32"}),
    (OnceDifferentiable.apply, torch.sin, {"gradgradcheck"}),
    (ModifiesGradOutput.apply, torch.sin, {"inputs_unmodified"}),
    (ModifiesInput.apply, torch.sin, {"inputs_unmodified"}),
    (AssumesContiguousInput.apply, double, {"non_contiguous"}),
    (AssumesDenseGradOutput.apply, double, {"stride0_grad_output"}),
    (FailsOnEmpty.apply, double, {"zero_size"}),
    (ConsumesSavedState.apply, double, {"backward_twice"}),
]


@pytest.mark.parametrize(
    ("fn", "reference", "failing"), BROKEN, ids=[f.__self__.__name__ for f, _, _ in BROKEN]
)
def test_harness_fails_a_broken_function_by_the_right_check(fn, reference, failing) -> None:
    x = torch.randn(3, 4, requires_grad=True)
    zero = torch.randn(0, 4, requires_grad=True)
    report = check_function(
        fn, x, reference=reference, zero_size_inputs=(zero,), raise_on_failure=False
    )
    assert {result.name for result in report.failures} >= failing
    assert not report.passed
    with pytest.raises(CheckFailed, match=sorted(failing)[0]):
        check_function(fn, x, reference=reference, zero_size_inputs=(zero,))


def test_harness_passes_a_correct_function_and_names_every_check() -> None:
    x = torch.randn(3, 4, requires_grad=True)
    report = check_function(Sin.apply, x, reference=torch.sin, zero_size_inputs=(x[:0],))
    assert report.passed
    assert report.names() == list(CHECKS)
    assert all(result.passed for result in report.results)
    assert "PASS gradgradcheck" in str(report)


def test_harness_skips_what_it_was_not_given_and_says_why() -> None:
    report = check_function(Sin.apply, torch.randn(3, requires_grad=True))
    assert report["reference_float32"].passed is None
    assert report["reference_float32"].message == "no reference given"
    assert report["zero_size"].passed is None
    assert report.passed


def test_harness_runs_only_the_named_checks() -> None:
    report = check_function(
        Sin.apply, torch.randn(3, requires_grad=True), checks=["gradcheck", "backward_twice"]
    )
    assert report.names() == ["gradcheck", "backward_twice"]


def test_harness_leaves_the_callers_rng_state_alone() -> None:
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    check_function(Sin.apply, torch.randn(3, requires_grad=True), checks=["gradcheck"])
    torch.manual_seed(7)
    assert torch.equal(torch.rand(3), expected)


def test_harness_rejects_unknown_checks_and_inputs_without_gradients() -> None:
    with pytest.raises(ValueError, match="Unknown checks"):
        check_function(Sin.apply, torch.randn(3, requires_grad=True), checks=["gradchek"])
    with pytest.raises(ValueError, match="requires_grad=True"):
        check_function(Sin.apply, torch.randn(3))
