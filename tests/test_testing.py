"""The gradcheck harness catches each kind of broken Function, by the check named for it, and
passes a correct one."""

from __future__ import annotations

import math
import re
from typing import Any

import pytest
import torch

from torchopt_lab.testing import CHECKS, CheckFailed, check_function


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Tiny tensors: one intra-op thread avoids oversubscribing two cores under pytest -n 2."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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


class MarkedOnceDifferentiable(Sin):
    """A once-differentiable path done right: a second derivative raises."""

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        return grad * x.cos()


@pytest.mark.parametrize(
    ("fn", "passes"),
    [(MarkedOnceDifferentiable.apply, True), (OnceDifferentiable.apply, False)],
    ids=["raises_when_differentiated_twice", "silently_wrong_second_derivative"],
)
def test_once_differentiable_path_must_raise_when_differentiated_twice(fn, passes) -> None:
    report = check_function(
        fn,
        torch.randn(3, requires_grad=True),
        reference=torch.sin,
        double_backward=False,
        raise_on_failure=False,
    )
    assert report["gradgradcheck"].passed is passes
    assert report.passed is passes


class WrongAtOneElement(Sin):
    """Backward off by 1.47 * grad_output at element [4, 3] only."""

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        result = grad * x.cos()
        result[4, 3] += 1.47 * grad[4, 3]
        return result


def numbers(line: str) -> dict[str, float]:
    """The values after "expected" and "got" in a report line."""
    found = re.search(r"expected (\S+?)(?: \(finite differences\))?, got (\S+?)[ ;]", line)
    assert found, line
    return {"expected": float(found.group(1)), "got": float(found.group(2))}


def test_a_wrong_backwards_report_is_one_screen_with_the_worst_element_and_a_diagnosis() -> None:
    x = torch.randn(6, 5, requires_grad=True, generator=torch.Generator().manual_seed(1))
    with pytest.raises(CheckFailed) as failure:
        check_function(WrongAtOneElement.apply, x, reference=torch.sin)
    text = str(failure.value)
    lines = text.splitlines()
    # One line per check, plus a diagnosis per failure: no Jacobians, no torch frames.
    assert len(lines) == 1 + len(CHECKS) + 3, text
    assert "tensor(" not in text and "gradcheck.py" not in text and "Traceback" not in text
    assert lines[0] == "check_function(WrongAtOneElement.apply): FAILED 3 of 9 checks"
    derivative = math.cos(x[4, 3].item())
    gradcheck_line = lines[1]
    assert gradcheck_line.startswith("  FAIL gradcheck: d output 0[4, 3] / d input 0[4, 3]: ")
    assert "1 of 900 Jacobian entries differ beyond rtol 1e-05, atol 1e-06" in gradcheck_line
    values = numbers(gradcheck_line)  # printed to 6 significant digits
    assert values["expected"] == pytest.approx(derivative, rel=1e-5)
    assert values["got"] == pytest.approx(derivative + 1.47, rel=1e-5)
    assert lines[2] == (
        "      diagnosis: only 1 of 900 entries differ: look for an indexing or boundary error"
    )
    assert lines[4].startswith("  FAIL reference_float64: gradient[0] at [4, 3]: expected ")
    assert "1 of 30 elements differ beyond rtol 1e-10, atol 1e-12" in lines[4]
    values = numbers(lines[4])  # grad_output * derivative, without and with the error
    assert values["got"] - values["expected"] == pytest.approx(
        1.47 * values["expected"] / derivative, rel=1e-4
    )
    assert lines[5].startswith("      diagnosis: only 1 of 30 elements differ")


def test_the_full_jacobians_are_kept_and_printed_only_when_asked() -> None:
    x = torch.randn(6, 5, requires_grad=True)
    quiet = check_function(WrongAtOneElement.apply, x, checks=["gradcheck"], raise_on_failure=False)
    assert "numerical:" not in str(quiet)
    assert "numerical:" in quiet["gradcheck"].details
    assert "analytical:" in quiet["gradcheck"].details
    loud = check_function(
        WrongAtOneElement.apply, x, checks=["gradcheck"], raise_on_failure=False, verbose=True
    )
    assert "numerical:" in str(loud) and "analytical:" in str(loud)
    assert len(str(loud).splitlines()) > 100


def test_a_constant_factor_and_a_missing_second_derivative_are_diagnosed() -> None:
    x = torch.randn(3, 4, requires_grad=True)
    scaled = check_function(ScaledBackward.apply, x, reference=torch.sin, raise_on_failure=False)
    for name in ("gradcheck", "reference_float64"):
        assert "diagnosis: ours is 1.001 x the expected value at all" in scaled[name].message
    once = check_function(
        OnceDifferentiable.apply, x, checks=["gradgradcheck"], raise_on_failure=False
    )
    assert once["gradgradcheck"].message.startswith("d first derivative 0[")
    assert "got 0 (backward)" in once["gradgradcheck"].message
    assert "diagnosis: ours is 0 where the expected value is not" in once["gradgradcheck"].message


def test_an_exception_is_one_line_at_the_code_under_test_not_torchs_frames() -> None:
    report = check_function(
        FailsOnEmpty.apply,
        torch.randn(3, 4, requires_grad=True),
        zero_size_inputs=(torch.randn(0, 4, requires_grad=True),),
        checks=["zero_size"],
        raise_on_failure=False,
    )
    message = report["zero_size"].message
    assert "\n" not in message and message.startswith("raised RuntimeError: max(): ")
    assert message.endswith(
        f"(at {__file__}:{FailsOnEmpty.backward.__code__.co_firstlineno + 2} in backward)"
    )
    assert "Traceback" in report["zero_size"].details
