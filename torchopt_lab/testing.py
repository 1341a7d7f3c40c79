"""A gradcheck harness for autograd Functions: point :func:`check_function` at a function and some
example inputs (and, ideally, a reference implementation), and it runs every check a hand-written
backward pass should pass, reporting each one by name.

Inputs that are floating-point tensors with ``requires_grad=True`` are the ones differentiated;
every other argument (integer targets, running statistics, Python numbers) is passed through as
given. Random functions (dropout) are checked by reseeding the RNG before every call, inside a
forked RNG state so the caller's is left alone.

The checks, in order (see :data:`CHECKS`):

``gradcheck``
    :func:`torch.autograd.gradcheck` in float64: the analytic Jacobian matches finite differences.
``gradgradcheck``
    :func:`torch.autograd.gradgradcheck` in float64: the backward is itself differentiable and
    right (double backward, Hessian-vector products). With ``double_backward=False`` (a path
    differentiable once, e.g. ``@once_differentiable``) it checks instead that differentiating
    twice raises, never returning a silently wrong second derivative.
``reference_float64``, ``reference_float32``
    Output and input gradients (for one random ``grad_output``) match ``reference`` in that dtype,
    within :data:`DEFAULT_TOLERANCES`; output dtype and shape must match too.
``non_contiguous``
    Non-contiguous copies of the inputs give the same output and gradients as contiguous ones.
``stride0_grad_output``
    A ``grad_output`` of stride 0, ``torch.ones(()).expand(shape)`` (what ``out.sum().backward()``
    sends), gives the same gradients as a contiguous tensor of ones.
``zero_size``
    ``zero_size_inputs`` (inputs with a zero-size dimension, given by the caller) run forward and
    backward, give gradients of their inputs' shapes, and match ``reference`` when given.
``inputs_unmodified``
    Forward and backward leave every input (except ``modified_inputs``) and ``grad_output``
    unchanged, bit for bit.
``backward_twice``
    Backward run twice with ``retain_graph=True`` gives the same gradients both times.

:func:`check_optimizer` does the same for an optimizer (see :data:`OPTIMIZER_CHECKS`): it holds
one to a reference optimizer class or a plain-torch function, step for step.

Example::

    from torchopt_lab.testing import check_function

    x = torch.randn(4, 3, requires_grad=True)
    report = check_function(MySoftplus.apply, x, reference=torch.nn.functional.softplus)
    print(report)  # one line per check; raises CheckFailed listing every failure

A failing check reports its worst element (where, the expected value, ours) and a one-line
diagnosis, e.g.::

    FAIL gradcheck: d output 0[4, 3] / d input 0[4, 3]: expected 0.661 (finite differences), got
          2.15 (backward); 1 of 900 Jacobian entries differ beyond rtol 1e-05, atol 1e-06
          diagnosis: only 1 of 900 entries differ: look for an indexing or boundary error

torch's full message (both Jacobians) and tracebacks are kept in :attr:`CheckResult.details`;
``check_function(..., verbose=True)`` prints them too.
"""

from __future__ import annotations

import copy
import math
import os
import traceback
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.autograd.gradcheck import GradcheckError

__all__ = [
    "CHECKS",
    "DEFAULT_TOLERANCES",
    "OPTIMIZER_CHECKS",
    "CheckFailed",
    "CheckReport",
    "CheckResult",
    "check_function",
    "check_optimizer",
]

CHECKS: tuple[str, ...] = (
    "gradcheck",
    "gradgradcheck",
    "reference_float64",
    "reference_float32",
    "non_contiguous",
    "stride0_grad_output",
    "zero_size",
    "inputs_unmodified",
    "backward_twice",
)

#: (rtol, atol) for comparisons against the reference and between runs, per dtype.
DEFAULT_TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float64: (1e-10, 1e-12),
    torch.float32: (1e-5, 1e-6),
}


class CheckFailed(AssertionError):
    """Raised by :func:`check_function` when a check fails; its message lists every failure."""


@dataclass(frozen=True)
class CheckResult:
    """The outcome of one check: ``passed`` is None when the check was skipped. ``message`` is
    short (a failure: the worst element and a diagnosis); ``details`` holds the rest, e.g.
    torch's full gradcheck message with both Jacobians, or a traceback."""

    name: str
    passed: bool | None
    message: str = ""
    details: str = ""

    def __str__(self) -> str:
        status = {True: "PASS", False: "FAIL", None: "SKIP"}[self.passed]
        return f"{status} {self.name}" + (f": {self.message}" if self.message else "")


@dataclass
class CheckReport:
    """Every check run on one function, in order. ``verbose``: ``str(report)`` adds each
    result's ``details``."""

    function: str
    results: list[CheckResult] = field(default_factory=list)
    # Which harness produced the report: "check_function" or "check_optimizer".
    harness: str = "check_function"
    verbose: bool = False

    @property
    def passed(self) -> bool:
        """True when no check failed (skipped checks do not count)."""
        return all(result.passed is not False for result in self.results)

    @property
    def failures(self) -> list[CheckResult]:
        return [result for result in self.results if result.passed is False]

    def __getitem__(self, name: str) -> CheckResult:
        for result in self.results:
            if result.name == name:
                return result
        raise KeyError(f"no check named {name!r} in this report; checks run: {self.names()}")

    def names(self) -> list[str]:
        return [result.name for result in self.results]

    def __str__(self) -> str:
        failed = len(self.failures)
        status = "passed" if self.passed else f"FAILED {failed} of {len(self.results)} checks"
        lines = [f"{self.harness}({self.function}): {status}"]
        for result in self.results:
            lines.append(f"  {result}")
            if self.verbose and result.details:
                lines += [f"      {line}" for line in result.details.splitlines()]
        return "\n".join(lines)


def check_function(
    fn: Callable[..., Any],
    *inputs: Any,
    reference: Callable[..., Any] | None = None,
    zero_size_inputs: Sequence[Any] | None = None,
    modified_inputs: Iterable[int] = (),
    checks: Iterable[str] | None = None,
    tolerances: dict[torch.dtype, tuple[float, float]] | None = None,
    gradcheck_eps: float = 1e-6,
    gradcheck_atol: float = 1e-6,
    gradcheck_rtol: float = 1e-5,
    seed: int = 0,
    double_backward: bool = True,
    raise_on_failure: bool = True,
    verbose: bool = False,
) -> CheckReport:
    """Run the checks named in ``checks`` (default: all of :data:`CHECKS`) on ``fn(*inputs)``.

    Args:
        fn: the function under test; returns a tensor or a tuple of tensors.
        inputs: example arguments; floating-point tensors with ``requires_grad=True`` are
            differentiated, at least one is required. They are copied, never modified.
        reference: a trusted implementation with the same signature (e.g. torch's); without it
            the reference checks are skipped, and ``zero_size`` checks only shapes.
        zero_size_inputs: arguments with a zero-size dimension for the ``zero_size`` check
            (skipped when None): which dimension may be empty depends on the function.
        modified_inputs: positions of inputs ``fn`` is documented to modify (e.g. batch norm's
            running statistics), left out of ``inputs_unmodified``.
        checks: the names of the checks to run, from :data:`CHECKS`.
        tolerances: ``{dtype: (rtol, atol)}`` overriding :data:`DEFAULT_TOLERANCES`.
        gradcheck_eps, gradcheck_atol, gradcheck_rtol: passed to gradcheck and gradgradcheck;
            tighter than torch's defaults (atol 1e-5, rtol 1e-3), which let a backward that is
            0.1% off pass: central differences in float64 with eps 1e-6 are good to ~1e-9.
        seed: the RNG seed set before every call of ``fn`` and ``reference``.
        double_backward: whether ``fn`` claims a correct second derivative (gradgradcheck), or
            must raise when differentiated twice.
        raise_on_failure: raise :class:`CheckFailed` listing every failure after all checks ran;
            with False, only return the report.
        verbose: print each failure's details too (torch's full gradcheck message with both
            Jacobians, tracebacks); by default a failure is its worst element and a diagnosis,
            and the details stay in :attr:`CheckResult.details`.

    Returns:
        a :class:`CheckReport` with one :class:`CheckResult` per check.
    """
    selected = list(CHECKS if checks is None else checks)
    unknown = [name for name in selected if name not in CHECKS]
    if unknown:
        raise ValueError(f"Unknown checks {unknown}; expected names from {CHECKS}")
    differentiable = [i for i, value in enumerate(inputs) if _is_differentiable(value)]
    if not differentiable:
        raise ValueError(
            "check_function needs at least one floating-point input tensor with "
            "requires_grad=True (the inputs to differentiate)"
        )
    context = _Context(
        fn=fn,
        inputs=inputs,
        reference=reference,
        zero_size_inputs=zero_size_inputs,
        modified=set(modified_inputs),
        tolerances={**DEFAULT_TOLERANCES, **(tolerances or {})},
        gradcheck_options={
            "eps": gradcheck_eps,
            "atol": gradcheck_atol,
            "rtol": gradcheck_rtol,
        },
        seed=seed,
        double_backward=double_backward,
    )
    report = CheckReport(_name(fn), verbose=verbose)
    # Every device's RNG: the reseeding before each call (torch.manual_seed) touches them all.
    with torch.random.fork_rng():
        for name in selected:
            details = ""
            try:
                passed, message, *rest = _CHECK_FUNCTIONS[name](context)
                details = rest[0] if rest else ""
            except Exception as error:  # a crash inside fn is a failed check, reported by name
                passed = False
                message = _raised(error)
                details = "".join(traceback.format_exception(error))
            report.results.append(CheckResult(name, passed, message, details))
    if raise_on_failure and not report.passed:
        raise CheckFailed(str(report))
    return report


@dataclass
class _Context:
    fn: Callable[..., Any]
    inputs: Sequence[Any]
    reference: Callable[..., Any] | None
    zero_size_inputs: Sequence[Any] | None
    modified: set[int]
    tolerances: dict[torch.dtype, tuple[float, float]]
    gradcheck_options: dict[str, float]
    seed: int
    double_backward: bool

    def call(self, fn: Callable[..., Any], inputs: Sequence[Any]) -> tuple[torch.Tensor, ...]:
        torch.manual_seed(self.seed)
        return _as_tuple(fn(*inputs))


def _name(fn: Callable[..., Any]) -> str:
    owner = getattr(fn, "__self__", None)
    if isinstance(owner, type):
        return f"{owner.__qualname__}.{fn.__name__}"
    return getattr(fn, "__qualname__", None) or repr(fn)


def _is_differentiable(value: Any) -> bool:
    return isinstance(value, torch.Tensor) and value.is_floating_point() and value.requires_grad


def _as_tuple(output: Any) -> tuple[torch.Tensor, ...]:
    return tuple(output) if isinstance(output, (tuple, list)) else (output,)


def _copy(value: Any, dtype: torch.dtype, contiguous: bool = True) -> Any:
    """A fresh leaf copy of ``value`` in ``dtype`` (floating tensors only), optionally laid out
    non-contiguously with the same values; non-tensors pass through."""
    if not isinstance(value, torch.Tensor):
        return value
    tensor = value.detach().to(dtype) if value.is_floating_point() else value.detach()
    if contiguous or tensor.dim() == 0:
        copy = tensor.clone(memory_format=torch.contiguous_format)
    else:
        # Every other element of a wider buffer: same values, strides twice the contiguous ones.
        buffer = torch.zeros((*tensor.shape, 2), dtype=tensor.dtype, device=tensor.device)
        buffer[..., 0] = tensor
        copy = buffer[..., 0]
    return copy.requires_grad_(_is_differentiable(value))


def _copies(inputs: Sequence[Any], dtype: torch.dtype, contiguous: bool = True) -> list[Any]:
    return [_copy(value, dtype, contiguous) for value in inputs]


def _differentiable(inputs: Sequence[Any]) -> list[torch.Tensor]:
    return [value for value in inputs if _is_differentiable(value)]


def _floating(outputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    return [output for output in outputs if output.is_floating_point() and output.requires_grad]


def _grad_outputs(outputs: Sequence[torch.Tensor], seed: int) -> list[torch.Tensor]:
    generator = torch.Generator(device="cpu").manual_seed(seed + 1)
    return [
        torch.randn(output.shape, generator=generator, dtype=output.dtype).to(output.device)
        for output in outputs
    ]


def _gradients(
    outputs: Sequence[torch.Tensor],
    inputs: Sequence[torch.Tensor],
    grad_outputs: Sequence[torch.Tensor],
    retain_graph: bool = False,
) -> list[torch.Tensor | None]:
    return list(
        torch.autograd.grad(
            outputs, inputs, grad_outputs, retain_graph=retain_graph, allow_unused=True
        )
    )


def _compare(
    what: str,
    actual: Sequence[torch.Tensor | None],
    expected: Sequence[torch.Tensor | None],
    rtol: float,
    atol: float,
) -> str:
    """An empty string when every pair is close, else what differs. A missing gradient (None)
    equals an all-zero one."""
    problems = []
    for index, (mine, theirs) in enumerate(zip(actual, expected, strict=True)):
        if mine is None and theirs is None:
            continue
        if mine is None or theirs is None:
            present = theirs if mine is None else mine
            if not bool((present == 0).all()):
                side = "ours" if mine is None else "the reference's"
                problems.append(f"{what}[{index}]: {side} is None, the other is not zero")
            continue
        try:
            torch.testing.assert_close(mine, theirs, rtol=rtol, atol=atol, equal_nan=True)
        except AssertionError as error:
            worst = _worst_element(mine, theirs, rtol, atol)
            if worst is None:  # dtype, shape or device: assert_close's first line says which
                problems.append(f"{what}[{index}]: {str(error).strip().splitlines()[0]}")
            else:
                problems.append(f"{what}[{index}] {worst}")
    return "\n".join(problems)


_TORCH_DIRECTORY = os.path.dirname(torch.__file__)


def _raised(error: BaseException) -> str:
    """One line for an exception: its type, the first line of its message, and the innermost
    frame outside torch and this harness (the code under test), never torch's own frames."""
    text = str(error).strip()
    first = text.splitlines()[0] if text else ""
    frames = [
        frame
        for frame in traceback.extract_tb(error.__traceback__)
        if not frame.filename.startswith(_TORCH_DIRECTORY) and frame.filename != __file__
    ]
    where = ""
    if frames:
        where = f" (at {frames[-1].filename}:{frames[-1].lineno} in {frames[-1].name})"
    return f"raised {type(error).__name__}: {first}{where}"


def _format_index(flat: int, shape: Sequence[int]) -> str:
    """``[i, j, ...]`` of a flat (row-major) position in ``shape``; "" for a scalar."""
    index = []
    for size in reversed(shape):
        index.append(flat % size)
        flat //= size
    return "[" + ", ".join(str(i) for i in reversed(index)) + "]" if index else ""


def _differing(
    got: torch.Tensor, expected: torch.Tensor, rtol: float, atol: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``got`` and ``expected`` as flat float64 CPU tensors, and the mask of elements that are
    not close (``torch.isclose``, NaN equal to NaN)."""
    got = got.detach().to("cpu", torch.float64).reshape(-1)
    expected = expected.detach().to("cpu", torch.float64).reshape(-1)
    return got, expected, ~torch.isclose(got, expected, rtol=rtol, atol=atol, equal_nan=True)


def _worst_position(got: torch.Tensor, expected: torch.Tensor, bad: torch.Tensor) -> int:
    """The flat position of the greatest absolute difference among the differing elements
    (a NaN or infinite difference counts as the greatest)."""
    difference = (got - expected).abs().nan_to_num(nan=math.inf)
    return int(torch.where(bad, difference, -1.0).argmax())


def _diagnosis(got: torch.Tensor, expected: torch.Tensor, bad: torch.Tensor, unit: str) -> str:
    """One line on how the differing elements (``unit``: what they are) differ: non-finite,
    zero, a constant factor, a few of them, or no simple pattern."""
    ours, theirs = got[bad], expected[bad]
    count, total = int(bad.sum()), bad.numel()
    if not torch.isfinite(ours).all() and torch.isfinite(theirs).all():
        return "ours is NaN or infinite where the expected value is finite"
    if not torch.isfinite(theirs).all():
        return "the expected value is NaN or infinite where ours is not (or not the same)"
    if (ours == 0).all():
        return (
            "ours is 0 where the expected value is not: a missing term, or a path that does not "
            "reach the input"
        )
    if (theirs == 0).all():
        return "ours is not 0 where the expected value is: a term or a mask too many"
    if count >= 2 and (theirs != 0).all():
        ratio = ours / theirs
        if (ratio.max() - ratio.min()).abs() <= 1e-6 * ratio.abs().max():
            factor = float(ratio.mean())
            if abs(factor + 1) <= 1e-6:
                return f"ours is minus the expected value at all {count} differing {unit}: a sign"
            return (
                f"ours is {factor:.6g} x the expected value at all {count} differing {unit}: a "
                "wrong constant factor"
            )
    if count <= max(1, total // 10):
        return f"only {count} of {total} {unit} differ: look for an indexing or boundary error"
    return f"{count} of {total} {unit} differ, by no constant factor"


def _worst_element(
    got: torch.Tensor, expected: torch.Tensor, rtol: float, atol: float
) -> str | None:
    """Where two tensors of one shape and dtype differ most, with a diagnosis; None when their
    shapes or dtypes differ (assert_close's message says so) or nothing differs."""
    if got.shape != expected.shape or got.dtype != expected.dtype:
        return None
    flat_got, flat_expected, bad = _differing(got, expected, rtol, atol)
    if not bad.any():
        return None
    worst = _worst_position(flat_got, flat_expected, bad)
    return (
        f"at {_format_index(worst, got.shape) or '(scalar)'}: expected "
        f"{float(flat_expected[worst]):.6g}, got {float(flat_got[worst]):.6g}; "
        f"{int(bad.sum())} of {bad.numel()} elements differ beyond rtol {rtol:g}, "
        f"atol {atol:g}\n      diagnosis: " + _diagnosis(flat_got, flat_expected, bad, "elements")
    )


def _run_gradcheck(
    context: _Context, second_order: bool
) -> tuple[bool, str] | tuple[bool, str, str]:
    inputs = _copies(context.inputs, torch.float64)
    positions = [i for i, value in enumerate(inputs) if _is_differentiable(value)]

    def bound(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        arguments = list(inputs)
        for position, tensor in zip(positions, tensors, strict=True):
            arguments[position] = tensor
        return context.call(context.fn, arguments)

    differentiated = tuple(inputs[i] for i in positions)
    input_names = [f"input {i}" for i in positions]
    if second_order:
        # What gradgradcheck checks: the first derivative as a function of the inputs and of
        # grad_output, differentiated once more. The same grad_outputs go to torch's check and
        # to the diagnosis.
        outputs = _floating(bound(*differentiated))
        grad_outputs = [go.requires_grad_() for go in _grad_outputs(outputs, context.seed)]
        count = len(differentiated)

        def first_derivative(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
            results = _floating(bound(*tensors[:count]))
            grads = torch.autograd.grad(
                results, tensors[:count], tensors[count:], create_graph=True, allow_unused=True
            )
            return tuple(grad for grad in grads if grad is not None)

        checked, checked_inputs = first_derivative, (*differentiated, *grad_outputs)
        input_names += [f"grad_output {i}" for i in range(len(grad_outputs))]
        output_name = "first derivative {}"
    else:
        checked, checked_inputs, output_name = bound, differentiated, "output {}"
    try:
        if second_order:
            torch.autograd.gradgradcheck(
                bound, differentiated, grad_outputs, **context.gradcheck_options
            )
        else:
            torch.autograd.gradcheck(bound, differentiated, **context.gradcheck_options)
    except GradcheckError as error:
        summary = _jacobian_mismatch(
            checked, checked_inputs, input_names, output_name, context.gradcheck_options
        )
        if summary is None:  # not a Jacobian mismatch: torch's first line says what failed
            summary = f"torch.autograd.gradcheck: {str(error).strip().splitlines()[0]}"
        return False, summary, str(error)
    return True, ""


def _jacobian_mismatch(
    fn: Callable[..., Any],
    inputs: Sequence[torch.Tensor],
    input_names: Sequence[str],
    output_name: str,
    options: dict[str, float],
) -> str | None:
    """The worst Jacobian entry of ``fn`` at ``inputs``, backward against central finite
    differences (the comparison gradcheck makes, on the outputs that require grad), with a
    diagnosis; None when no entry differs beyond gradcheck's tolerance."""
    eps, atol, rtol = options["eps"], options["atol"], options["rtol"]
    inputs = [tensor.detach().clone().requires_grad_() for tensor in inputs]
    every_output = _as_tuple(fn(*inputs))
    kept = [i for i, output in enumerate(every_output) if _is_differentiable(output)]
    outputs = [every_output[i] for i in kept]

    def jacobians() -> list[list[torch.Tensor]]:  # [output][input]: (output numel, input numel)
        return [
            [torch.zeros(o.numel(), x.numel(), dtype=torch.float64) for x in inputs]
            for o in outputs
        ]

    numerical, analytical = jacobians(), jacobians()
    for j, tensor in enumerate(inputs):
        flat = tensor.data.view(-1)
        for k in range(flat.numel()):
            original = flat[k].item()
            values = []
            for shifted in (original + eps, original - eps):
                flat[k] = shifted
                results = _as_tuple(fn(*inputs))
                values.append([results[i].detach().reshape(-1).double().cpu() for i in kept])
            flat[k] = original
            for i, (plus, minus) in enumerate(zip(*values, strict=True)):
                numerical[i][j][:, k] = (plus - minus) / (2 * eps)
    for i, output in enumerate(outputs):
        for m in range(output.numel()):
            onehot = torch.zeros(output.numel(), dtype=output.dtype, device=output.device)
            onehot[m] = 1
            grads = torch.autograd.grad(
                output, inputs, onehot.view_as(output), retain_graph=True, allow_unused=True
            )
            for j, grad in enumerate(grads):
                if grad is not None:
                    analytical[i][j][m] = grad.detach().reshape(-1).double().cpu()
    worst: tuple[float, int, int, int, torch.Tensor, torch.Tensor, torch.Tensor] | None = None
    differing = total = 0
    for i in range(len(outputs)):
        for j in range(len(inputs)):
            got, expected, bad = _differing(analytical[i][j], numerical[i][j], rtol, atol)
            differing, total = differing + int(bad.sum()), total + bad.numel()
            if bad.any():
                position = _worst_position(got, expected, bad)
                difference = float((got[position] - expected[position]).abs().nan_to_num(math.inf))
                if worst is None or difference > worst[0]:
                    worst = (difference, i, j, position, got, expected, bad)
    if worst is None:
        return None
    _, i, j, position, got, expected, bad = worst
    row, column = divmod(position, inputs[j].numel())
    where = (
        f"d {output_name.format(kept[i])}{_format_index(row, outputs[i].shape)} / d "
        f"{input_names[j]}{_format_index(column, inputs[j].shape)}"
    )
    return (
        f"{where}: expected {float(expected[position]):.6g} (finite differences), got "
        f"{float(got[position]):.6g} (backward); {differing} of {total} Jacobian entries differ "
        f"beyond rtol {rtol:g}, atol {atol:g}\n      diagnosis: "
        + _diagnosis(got, expected, bad, "entries")
    )


def _check_gradcheck(context: _Context) -> tuple[bool | None, str] | tuple[bool, str, str]:
    return _run_gradcheck(context, second_order=False)


def _check_gradgradcheck(context: _Context) -> tuple[bool | None, str]:
    if context.double_backward:
        return _run_gradcheck(context, second_order=True)
    inputs = _copies(context.inputs, torch.float64)
    outputs = _floating(context.call(context.fn, inputs))
    # grad_output requiring grad, as it does inside a larger graph being differentiated twice
    grad_outputs = [grad.requires_grad_() for grad in _grad_outputs(outputs, context.seed)]
    grads = torch.autograd.grad(
        outputs, _differentiable(inputs), grad_outputs, create_graph=True, allow_unused=True
    )
    detached = [i for i, grad in enumerate(grads) if grad is not None and not grad.requires_grad]
    if detached:
        return False, (
            f"gradients {detached} are detached under create_graph=True: inside a larger graph "
            "their second derivative would silently be zero (mark the backward "
            "@once_differentiable so differentiating it twice raises)"
        )
    try:
        total = sum(grad.sum() for grad in grads if grad is not None)
        # The whole graph: @once_differentiable hangs its error on a node of its own, which
        # autograd.grad would prune when it lies on no path to the inputs.
        total.backward()
    except RuntimeError as error:
        return True, f"differentiating twice raised, as double_backward=False requires: {error}"
    return False, (
        "double_backward=False, but differentiating twice returned a value (None counts: a "
        "silent zero) instead of raising"
    )


def _against_reference(
    context: _Context, inputs: Sequence[Any], rtol: float, atol: float
) -> tuple[bool, str]:
    assert context.reference is not None
    theirs = _copies(inputs, _inputs_dtype(inputs))
    outputs = context.call(context.fn, inputs)
    expected = context.call(context.reference, theirs)
    problems = [_compare("output", outputs, expected, rtol, atol)]
    mine_float, theirs_float = _floating(outputs), _floating(expected)
    if len(mine_float) != len(theirs_float):
        problems.append(
            f"{len(mine_float)} differentiable outputs, the reference has {len(theirs_float)}"
        )
    elif mine_float:
        grad_outputs = _grad_outputs(mine_float, context.seed)
        problems.append(
            _compare(
                "gradient",
                _gradients(mine_float, _differentiable(inputs), grad_outputs),
                _gradients(theirs_float, _differentiable(theirs), grad_outputs),
                rtol,
                atol,
            )
        )
    message = "\n".join(problem for problem in problems if problem)
    return not message, message or f"rtol={rtol:g}, atol={atol:g}"


def _inputs_dtype(inputs: Sequence[Any]) -> torch.dtype:
    return next(
        value.dtype
        for value in inputs
        if isinstance(value, torch.Tensor) and value.is_floating_point()
    )


def _check_reference(dtype: torch.dtype) -> Callable[[_Context], tuple[bool | None, str]]:
    def check(context: _Context) -> tuple[bool | None, str]:
        if context.reference is None:
            return None, "no reference given"
        rtol, atol = context.tolerances[dtype]
        return _against_reference(context, _copies(context.inputs, dtype), rtol, atol)

    return check


def _check_non_contiguous(context: _Context) -> tuple[bool | None, str]:
    rtol, atol = context.tolerances[torch.float64]
    contiguous = _copies(context.inputs, torch.float64)
    strided = _copies(context.inputs, torch.float64, contiguous=False)
    expected = context.call(context.fn, contiguous)
    outputs = context.call(context.fn, strided)
    problems = [_compare("output", outputs, expected, rtol, atol)]
    grad_outputs = _grad_outputs(_floating(expected), context.seed)
    problems.append(
        _compare(
            "gradient",
            _gradients(_floating(outputs), _differentiable(strided), grad_outputs),
            _gradients(_floating(expected), _differentiable(contiguous), grad_outputs),
            rtol,
            atol,
        )
    )
    message = "\n".join(problem for problem in problems if problem)
    return not message, message


def _check_stride0_grad_output(context: _Context) -> tuple[bool | None, str]:
    rtol, atol = context.tolerances[torch.float64]
    expanded_inputs = _copies(context.inputs, torch.float64)
    dense_inputs = _copies(context.inputs, torch.float64)
    expanded_outputs = _floating(context.call(context.fn, expanded_inputs))
    dense_outputs = _floating(context.call(context.fn, dense_inputs))
    expanded = [
        torch.ones((), dtype=output.dtype, device=output.device).expand(output.shape)
        for output in expanded_outputs
    ]
    dense = [torch.ones_like(output) for output in dense_outputs]
    message = _compare(
        "gradient",
        _gradients(expanded_outputs, _differentiable(expanded_inputs), expanded),
        _gradients(dense_outputs, _differentiable(dense_inputs), dense),
        rtol,
        atol,
    )
    return not message, message


def _check_zero_size(context: _Context) -> tuple[bool | None, str]:
    if context.zero_size_inputs is None:
        return None, "no zero_size_inputs given"
    if not any(
        isinstance(value, torch.Tensor) and value.numel() == 0 for value in context.zero_size_inputs
    ):
        raise ValueError("zero_size_inputs has no tensor with a zero-size dimension")
    inputs = _copies(context.zero_size_inputs, torch.float64)
    outputs = _floating(context.call(context.fn, inputs))
    gradients = _gradients(outputs, _differentiable(inputs), [torch.ones_like(o) for o in outputs])
    problems = [
        f"gradient[{index}] has shape {list(gradient.shape)}, its input {list(tensor.shape)}"
        for index, (gradient, tensor) in enumerate(
            zip(gradients, _differentiable(inputs), strict=True)
        )
        if gradient is not None and gradient.shape != tensor.shape
    ]
    if context.reference is not None:
        rtol, atol = context.tolerances[torch.float64]
        fresh = _copies(context.zero_size_inputs, torch.float64)
        passed, message = _against_reference(context, fresh, rtol, atol)
        if not passed:
            problems.append(message)
    message = "\n".join(problems)
    return not message, message


def _check_inputs_unmodified(context: _Context) -> tuple[bool | None, str]:
    inputs = _copies(context.inputs, torch.float64)
    before = [
        value.detach().clone() if isinstance(value, torch.Tensor) else None for value in inputs
    ]
    outputs = _floating(context.call(context.fn, inputs))
    grad_outputs = _grad_outputs(outputs, context.seed)
    grad_before = [grad.clone() for grad in grad_outputs]
    _gradients(outputs, _differentiable(inputs), grad_outputs)
    problems = []
    for index, (value, saved) in enumerate(zip(inputs, before, strict=True)):
        if saved is None or index in context.modified:
            continue
        if not torch.equal(value.detach().nan_to_num(), saved.nan_to_num()):
            problems.append(f"input {index} was modified")
    for index, (grad, saved) in enumerate(zip(grad_outputs, grad_before, strict=True)):
        if not torch.equal(grad, saved):
            problems.append(f"grad_output {index} was modified by backward")
    message = "; ".join(problems)
    return not message, message


def _check_backward_twice(context: _Context) -> tuple[bool | None, str]:
    inputs = _copies(context.inputs, torch.float64)
    outputs = _floating(context.call(context.fn, inputs))
    grad_outputs = _grad_outputs(outputs, context.seed)
    first = _gradients(outputs, _differentiable(inputs), grad_outputs, retain_graph=True)
    second = _gradients(outputs, _differentiable(inputs), grad_outputs)
    message = _compare("gradient", second, first, 0.0, 0.0)
    return not message, message


_CHECK_FUNCTIONS: dict[str, Callable[[_Context], tuple[bool | None, str]]] = {
    "gradcheck": _check_gradcheck,
    "gradgradcheck": _check_gradgradcheck,
    "reference_float64": _check_reference(torch.float64),
    "reference_float32": _check_reference(torch.float32),
    "non_contiguous": _check_non_contiguous,
    "stride0_grad_output": _check_stride0_grad_output,
    "zero_size": _check_zero_size,
    "inputs_unmodified": _check_inputs_unmodified,
    "backward_twice": _check_backward_twice,
}


#: The checks of :func:`check_optimizer`, in order.
OPTIMIZER_CHECKS: tuple[str, ...] = (
    "matches_reference",
    "complex_params",
    "state_dict_round_trip",
    "state_dict_interchange",
    "step_without_grads_is_noop",
)

_SHAPES: tuple[tuple[int, ...], ...] = ((4, 3), (5,), ())


def check_optimizer(
    optimizer_class: type[torch.optim.Optimizer],
    reference: type[torch.optim.Optimizer] | Callable[..., None],
    options: Sequence[dict[str, Any]] = ({},),
    *,
    steps: int = 5,
    dtypes: Sequence[torch.dtype] = (torch.float64, torch.float32),
    complex_dtypes: Sequence[torch.dtype] = (),
    shapes: Sequence[tuple[int, ...]] = _SHAPES,
    checks: Iterable[str] | None = None,
    tolerances: dict[torch.dtype, tuple[float, float]] | None = None,
    seed: int = 0,
    raise_on_failure: bool = True,
) -> CheckReport:
    """Hold ``optimizer_class`` to ``reference``, step for step, for every dict in ``options``.

    Args:
        optimizer_class: the optimizer under test (e.g. one declared with
            :mod:`torchopt_lab.optim.rules`), constructed as ``optimizer_class(params, **opts)``;
            ``functools.partial(cls, backend="triton")`` holds its fused path to the reference.
        reference: a trusted ``torch.optim.Optimizer`` class taking the same arguments, or a
            plain-torch function ``reference(params, grads, states, step, **opts)`` that updates
            ``params`` in place: ``states`` holds one dict per parameter, kept across calls, and
            ``step`` counts from 1. With a class, state dicts are compared too (same keys, dtypes
            and values); with a function, the state entries both sides name alike.
        options: keyword arguments for both, one run per dict.
        steps: steps per run, each with fresh deterministic gradients.
        dtypes: real parameter dtypes to run in; ``complex_dtypes`` adds the ``complex_params``
            check in those dtypes (skipped when empty).
        shapes: parameter shapes (split over two param groups).
        checks: names from :data:`OPTIMIZER_CHECKS` (default: all; ``state_dict_interchange``
            is skipped for a function reference).
        tolerances: ``{dtype: (rtol, atol)}`` overriding :data:`DEFAULT_TOLERANCES` (complex
            dtypes use their real dtype's).
        seed: seeds the parameters and gradients.
        raise_on_failure: raise :class:`CheckFailed` listing every failure after all checks ran.

    Returns:
        a :class:`CheckReport` with one :class:`CheckResult` per check.
    """
    selected = list(OPTIMIZER_CHECKS if checks is None else checks)
    unknown = [name for name in selected if name not in OPTIMIZER_CHECKS]
    if unknown:
        raise ValueError(f"Unknown checks {unknown}; expected names from {OPTIMIZER_CHECKS}")
    if steps < 2:
        raise ValueError(f"Invalid steps value: {steps}; expected at least 2")
    context = _OptimizerContext(
        optimizer_class,
        reference,
        [dict(opts) for opts in options],
        steps,
        list(shapes),
        {**DEFAULT_TOLERANCES, **(tolerances or {})},
        seed,
    )
    report = CheckReport(_optimizer_name(optimizer_class), harness="check_optimizer")
    runs = {
        "matches_reference": lambda: context.matches_reference(dtypes),
        "complex_params": lambda: context.matches_reference(complex_dtypes),
        "state_dict_round_trip": lambda: context.round_trip(dtypes),
        "state_dict_interchange": lambda: context.interchange(dtypes),
        "step_without_grads_is_noop": context.noop,
    }
    with torch.random.fork_rng():
        for name in selected:
            try:
                passed, message = runs[name]()
            except Exception as error:  # a crash inside either optimizer is a failed check
                passed = False
                message = f"raised {type(error).__name__}: {error}\n" + "".join(
                    traceback.format_exception(error)[-3:]
                )
            report.results.append(CheckResult(name, passed, message))
    if raise_on_failure and not report.passed:
        raise CheckFailed(str(report))
    return report


@dataclass
class _OptimizerContext:
    optimizer_class: type[torch.optim.Optimizer]
    reference: type[torch.optim.Optimizer] | Callable[..., None]
    options: list[dict[str, Any]]
    steps: int
    shapes: list[tuple[int, ...]]
    tolerances: dict[torch.dtype, tuple[float, float]]
    seed: int

    @property
    def reference_is_class(self) -> bool:
        return isinstance(self.reference, type) and issubclass(
            self.reference, torch.optim.Optimizer
        )

    def tolerance(self, dtype: torch.dtype) -> tuple[float, float]:
        real = dtype.to_real() if dtype.is_complex else dtype
        return self.tolerances.get(real, DEFAULT_TOLERANCES[torch.float32])

    def params(self, dtype: torch.dtype) -> list[torch.Tensor]:
        generator = torch.Generator().manual_seed(self.seed)
        return [torch.randn(shape, generator=generator, dtype=dtype) for shape in self.shapes]

    def set_grads(self, params: list[torch.Tensor], step: int) -> None:
        generator = torch.Generator().manual_seed(self.seed + 1000 + step)
        for p in params:
            p.grad = torch.randn(p.shape, generator=generator, dtype=p.dtype)

    def build(self, cls: type[torch.optim.Optimizer], params: list[torch.Tensor], opts: dict):
        half = max(1, len(params) // 2)
        groups = [{"params": params[:half]}, {"params": params[half:]}]
        return cls([group for group in groups if group["params"]], **opts)

    def run(self, optimizer: torch.optim.Optimizer, params: list[torch.Tensor], steps: range):
        for step in steps:
            self.set_grads(params, step)
            optimizer.step()

    def run_reference(self, params: list[torch.Tensor], opts: dict) -> list[dict[str, Any]]:
        """The reference's run; returns each parameter's state."""
        if self.reference_is_class:
            optimizer = self.build(self.reference, params, opts)
            self.run(optimizer, params, range(self.steps))
            return [optimizer.state[p] for p in params]
        states: list[dict[str, Any]] = [{} for _ in params]
        for step in range(self.steps):
            self.set_grads(params, step)
            with torch.no_grad():
                self.reference(params, [p.grad for p in params], states, step + 1, **opts)
        return states

    def compare_states(self, mine: list[dict], theirs: list[dict], dtype: torch.dtype) -> str:
        rtol, atol = self.tolerance(dtype)
        problems = []
        for index, (our_state, their_state) in enumerate(zip(mine, theirs, strict=True)):
            keys = list(their_state)
            if self.reference_is_class and list(our_state) != keys:
                problems.append(f"state[{index}] keys {list(our_state)} != reference's {keys}")
                continue
            shared = [key for key in keys if key in our_state]
            problem = _compare(
                f"state[{index}]",
                [torch.as_tensor(our_state[key]) for key in shared],
                [torch.as_tensor(their_state[key]) for key in shared],
                rtol,
                atol,
            )
            if problem:
                problems.append(f"{problem} (keys {shared})")
        return "\n".join(problems)

    def matches_reference(self, dtypes: Sequence[torch.dtype]) -> tuple[bool | None, str]:
        if not dtypes:
            return None, "no dtypes given"
        problems = []
        for dtype in dtypes:
            rtol, atol = self.tolerance(dtype)
            for opts in self.options:
                params, reference = self.params(dtype), self.params(dtype)
                optimizer = self.build(self.optimizer_class, params, opts)
                self.run(optimizer, params, range(self.steps))
                their_states = self.run_reference(reference, opts)
                where = f"{_show_options(opts)}, {dtype}"
                found = [
                    _compare("param", params, reference, rtol, atol),
                    self.compare_states([optimizer.state[p] for p in params], their_states, dtype),
                ]
                if self.reference_is_class:
                    mine = optimizer.state_dict()["param_groups"]
                    theirs = self.build(self.reference, reference, opts).state_dict()
                    if [_without_params(g) for g in mine] != [
                        _without_params(g) for g in theirs["param_groups"]
                    ]:
                        found.append("param_groups differ from the reference's")
                problem = "\n".join(line for line in found if line)
                if problem:
                    problems.append(f"[{where}] {problem}")
        return not problems, "\n".join(problems)

    def round_trip(self, dtypes: Sequence[torch.dtype]) -> tuple[bool | None, str]:
        """A state dict saved mid-run and loaded into a fresh instance continues the run as the
        instance that saved it does after loading it back: nothing lives outside the state dict
        (both load, as ``load_state_dict`` casts state other than ``step`` to the parameter's
        dtype, which torch.optim's NAdam ``mu_product`` notices)."""
        problems = []
        switch = self.steps // 2
        for dtype in dtypes:
            rtol, atol = self.tolerance(dtype)
            for opts in self.options:
                params, reference = self.params(dtype), self.params(dtype)
                whole = self.build(self.optimizer_class, reference, opts)
                self.run(whole, reference, range(switch))
                whole.load_state_dict(_roundtrip_copy(whole.state_dict()))
                self.run(whole, reference, range(switch, self.steps))
                first = self.build(self.optimizer_class, params, opts)
                self.run(first, params, range(switch))
                saved = _roundtrip_copy(first.state_dict())
                second = self.build(self.optimizer_class, params, opts)
                second.load_state_dict(saved)
                self.run(second, params, range(switch, self.steps))
                problem = _compare("param", params, reference, rtol, atol)
                if problem:
                    problems.append(f"[{_show_options(opts)}, {dtype}] {problem}")
        return not problems, "\n".join(problems)

    def interchange(self, dtypes: Sequence[torch.dtype]) -> tuple[bool | None, str]:
        """Our state dict loads into the reference class and theirs into ours, mid-run, with the
        same result as the same switch made within the reference class."""
        if not self.reference_is_class:
            return None, "the reference is a function: no state dict to interchange"
        reference = self.reference
        assert isinstance(reference, type)
        problems = []
        switch = self.steps // 2
        pairs = [(self.optimizer_class, reference), (reference, self.optimizer_class)]
        for dtype in dtypes:
            rtol, atol = self.tolerance(dtype)
            for opts in self.options:
                finals = []
                for before_class, after_class in [*pairs, (reference, reference)]:
                    params = self.params(dtype)
                    before = self.build(before_class, params, opts)
                    self.run(before, params, range(switch))
                    after = self.build(after_class, params, opts)
                    after.load_state_dict(_roundtrip_copy(before.state_dict()))
                    self.run(after, params, range(switch, self.steps))
                    finals.append(params)
                for (before_class, after_class), params in zip(pairs, finals, strict=False):
                    problem = _compare("param", params, finals[-1], rtol, atol)
                    if problem:
                        problems.append(
                            f"[{before_class.__name__} -> {after_class.__name__}, "
                            f"{_show_options(opts)}, {dtype}] {problem}"
                        )
        return not problems, "\n".join(problems)

    def noop(self) -> tuple[bool | None, str]:
        """A step with no gradients changes no parameter and creates or changes no state (state
        the constructor created, as torch's Adagrad does, stays as it was)."""
        problems = []
        for opts in self.options:
            params = self.params(torch.float64)
            before = [p.clone() for p in params]
            optimizer = self.build(self.optimizer_class, params, opts)
            initial = copy.deepcopy(optimizer.state_dict()["state"])
            optimizer.step()
            state = optimizer.state_dict()["state"]
            if state.keys() != initial.keys():
                problems.append(f"[{_show_options(opts)}] state was created without gradients")
            else:
                try:
                    torch.testing.assert_close(state, initial, rtol=0.0, atol=0.0, equal_nan=True)
                except AssertionError:
                    problems.append(f"[{_show_options(opts)}] state changed without gradients")
            problem = _compare("param", params, before, 0.0, 0.0)
            if problem:
                problems.append(f"[{_show_options(opts)}] {problem}")
        return not problems, "\n".join(problems)


def _optimizer_name(optimizer_class: Callable[..., Any]) -> str:
    """A class's name; for a ``functools.partial`` of one, its name and bound options."""
    function = getattr(optimizer_class, "func", None)
    if function is not None:
        options = ", ".join(f"{key}={value!r}" for key, value in optimizer_class.keywords.items())
        return f"{getattr(function, '__name__', repr(function))}({options})"
    return getattr(optimizer_class, "__name__", repr(optimizer_class))


def _roundtrip_copy(state_dict: dict[str, Any]) -> dict[str, Any]:
    """A deep copy of a state dict, as saving and loading it would give."""
    return copy.deepcopy(state_dict)


def _without_params(group: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in group.items() if key != "params"}


def _show_options(options: dict[str, Any]) -> str:
    return ", ".join(f"{key}={value}" for key, value in options.items()) or "defaults"
