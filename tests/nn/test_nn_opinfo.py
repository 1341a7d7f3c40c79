"""Every ``torchopt_lab.nn.functional`` op on PyTorch's own OpInfo samples (``op_db``), on both
paths (``TORCHOPT_LAB_BACKEND=torch`` and ``=triton``, the kernels under the Triton interpreter).

For each op and each of its OpInfo's reference inputs (``reference_inputs("cpu", dtype,
requires_grad=True)``: the samples, and for the elementwise ops also NaN, infinities, large values,
non-contiguous, expanded and empty inputs; float32 and float64, torch's seed 0; an input past
4096 elements cut to its leading 64-long block per dimension, strides kept: relu's, silu's,
sigmoid's and tanh's 1029 x 917 and 1024 x 1024 take minutes through the interpreter):

* the value equals torch's (and tensors torch updates in place, batch norm's running statistics,
  are updated the same), and the sample's inputs are left as they were;
* the gradient of a random-weighted sum of the output with respect to every input that requires
  grad equals torch's (a plain sum's gradient through softmax or a normalisation is zero up to
  rounding, so it would compare only noise);
* a sample torch refuses raises torch's exception type, and so does each of the OpInfo's
  ``error_inputs`` (conv2d's, rms_norm's, gelu's and embedding's);
* on the Triton path, an op with a kernel (``KERNEL_OPS``) is recorded in ``backend_info()`` as
  run by Triton (the test is not vacuous);
* for each of its samples (``sample_inputs``, finite), in float64, ``torch.autograd.gradcheck``
  passes; on the torch path ``gradgradcheck`` too, and on the Triton path (first-order only) a
  ``create_graph=True`` backward either raises a RuntimeError that says so or, where the op has
  no first-order-only Triton backward (linear, conv2d, mse_loss, embedding, batch norm's and
  dropout's trivial cases), passes ``gradgradcheck``: a wrong second derivative is never
  returned silently.

Dropout's samples with ``p > 0`` in training draw a random mask, so they are checked for the mask's
semantics instead of torch's values: every output element is 0 or ``x / (1 - p)``, and the
gradient uses the same mask; gradcheck re-seeds torch's generator before each call, so every call
draws the same mask.

gradcheck and gradgradcheck run in their fast mode (a random projection of the Jacobian, checked
against finite differences): full Jacobians of every sample through the Triton interpreter took
15 minutes (batch norm alone 6), fast mode 50 s.

Tolerances: float64 ``rtol=1e-12, atol=1e-12`` (the same formulas as torch up to rounding);
float32 torch.testing's float32 defaults (``rtol=1.3e-6, atol=1e-5``) against torch on the same
values in float64: torch's own float32 result can be further from it than that (layer norm's
weight gradient over a single element: exactly 0, torch's float32 gives 1.6e-5, its
``x - mean`` rounding residual times ``1/sqrt(eps)``). Output dtypes are torch's float32 ones.

Which OpInfos: the ``op_db`` entry of each public function of ``torchopt_lab.nn.functional``
(``OPINFO_NAMES``; a test holds that every public function has one), every variant whose CPU
dtypes include the dtype under test (not ``silu``'s ``complex`` variant, complex dtypes only, nor
``batch_norm``'s ``without_cudnn``, the plain entry's samples with cuDNN off: no CPU dtypes).
``torchopt_lab.nn.fused.linear_activation`` has no op_db entry (no torch namesake). No sample is
skipped; only the large inputs above are cut.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from torch.testing._internal.common_methods_invocations import op_db
from torch.testing._internal.opinfo.core import OpInfo, SampleInput

import torchopt_lab.nn.functional as F
from torchopt_lab import backend, backend_info

PATHS = ["torch", "triton"]
# The reference inputs hold infinities and NaN: the interpreter's numpy warns where a GPU would
# not (exp overflows, inf * 0); the values are still compared with torch's.
pytestmark = [
    pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
]
DTYPES = [torch.float32, torch.float64]
TOLERANCES: dict[torch.dtype, dict[str, float]] = {
    torch.float32: {"rtol": 1.3e-6, "atol": 1e-5},
    torch.float64: {"rtol": 1e-12, "atol": 1e-12},
}

# op_db name -> the public function of torchopt_lab.nn.functional it covers
OPINFO_NAMES: dict[str, str] = {
    "nn.functional.linear": "linear",
    "nn.functional.conv2d": "conv2d",
    "nn.functional.relu": "relu",
    "nn.functional.leaky_relu": "leaky_relu",
    "sigmoid": "sigmoid",
    "tanh": "tanh",
    "nn.functional.gelu": "gelu",
    "nn.functional.silu": "silu",
    "softmax": "softmax",
    "log_softmax": "log_softmax",
    "nn.functional.cross_entropy": "cross_entropy",
    "nn.functional.mse_loss": "mse_loss",
    "nn.functional.layer_norm": "layer_norm",
    "nn.functional.rms_norm": "rms_norm",
    "nn.functional.batch_norm": "batch_norm",
    "nn.functional.dropout": "dropout",
    "nn.functional.embedding": "embedding",
}

# The functions the Triton path runs on Triton kernels: on the triton path, each sample of these
# must be recorded as run by Triton in backend_info() at least once (so the test is not vacuous).
KERNEL_OPS = {
    "relu",
    "leaky_relu",
    "sigmoid",
    "tanh",
    "gelu",
    "silu",
    "softmax",
    "log_softmax",
    "cross_entropy",
    "layer_norm",
    "batch_norm",
    "dropout",
    "rms_norm",
}


def _ours(name: str) -> Callable[..., Any]:
    function = getattr(F, name)
    if name == "embedding":
        # embedding's OpInfo calls (weight, indices), as its op does
        return lambda weight, indices, **kwargs: function(indices, weight, **kwargs)
    return function


OPINFOS: list[OpInfo] = [op for op in op_db if op.name in OPINFO_NAMES]
IDS = [f"{op.name}.{op.variant_test_name}".rstrip(".") for op in OPINFOS]


def test_every_public_functional_has_an_opinfo() -> None:
    assert sorted(OPINFO_NAMES.values()) == sorted(F.__all__)
    assert {op.name for op in OPINFOS} == set(OPINFO_NAMES)


@pytest.fixture
def path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    monkeypatch.setenv(backend.ENV_VAR, request.param)
    yield request.param


# A reference input past this many elements is cut to its leading 64-long block in each
# dimension (strides kept): relu's, silu's, sigmoid's and tanh's 1029 x 917 and 1024 x 1024 inputs
# take minutes through the interpreter.
LARGEST = 4096


def _as_leaves(sample: SampleInput) -> SampleInput:
    """The sample with every tensor that requires grad a leaf of the same strides, the input cut
    to its leading block past LARGEST elements. (Some of torch's reference inputs are views made
    under no_grad, expanded ones among them: a gradient does not reach them, through torch's own
    op either.)"""

    def leaf(value: Any) -> Any:
        if not isinstance(value, torch.Tensor) or not value.requires_grad:
            return value
        return value.detach().requires_grad_()

    x = sample.input
    if isinstance(x, torch.Tensor) and x.numel() > LARGEST:
        x = x[tuple(slice(0, 64) for _ in range(x.dim()))]
    return SampleInput(
        leaf(x),
        args=tuple(map(leaf, sample.args)),
        kwargs={key: leaf(value) for key, value in sample.kwargs.items()},
    )


def _samples(opinfo: OpInfo, dtype: torch.dtype, reference: bool = False) -> list[SampleInput]:
    """The OpInfo's samples (``reference``: its reference inputs, the samples and more: NaN,
    infinities, large values, non-contiguous views, for the elementwise ops)."""
    if dtype not in opinfo.supported_dtypes("cpu"):
        return []
    torch.manual_seed(0)
    if reference:
        inputs = opinfo.reference_inputs("cpu", dtype, requires_grad=True)
        samples = [_as_leaves(sample) for sample in inputs]
    else:
        samples = list(opinfo.sample_inputs("cpu", dtype, requires_grad=True))
    assert samples, opinfo.name
    return samples


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        grad = ", grad" if value.requires_grad else ""
        return f"tensor{list(value.shape)}[{str(value.dtype).removeprefix('torch.')}{grad}]"
    if isinstance(value, list | tuple):
        return "(" + ", ".join(map(_describe, value)) + ")"
    return repr(value)


def describe(sample: SampleInput) -> str:
    arguments = [_describe(sample.input), *map(_describe, sample.args)]
    arguments += [f"{key}={_describe(value)}" for key, value in sample.kwargs.items()]
    return ", ".join(arguments)


def leaves(sample: SampleInput) -> list[torch.Tensor]:
    """The sample's tensors that require grad, in the order input, args, kwargs."""
    values = [sample.input, *sample.args, *sample.kwargs.values()]
    return [t for t in values if isinstance(t, torch.Tensor) and t.requires_grad]


class Call:
    """The sample's arguments for one call: its leaves (or replacements for them, for gradcheck)
    as they are, every other tensor a fresh copy (an op may update it in place, as batch norm its
    running statistics)."""

    def __init__(self, sample: SampleInput, replacements: tuple[torch.Tensor, ...] = ()) -> None:
        originals = leaves(sample)
        self.replaced = dict(zip(map(id, originals), replacements or originals, strict=True))
        self.copies: list[torch.Tensor] = []
        self.input = self._pick(sample.input)
        self.args = [self._pick(a) for a in sample.args]
        self.kwargs = {k: self._pick(v) for k, v in sample.kwargs.items()}

    def _pick(self, value: Any) -> Any:
        if not isinstance(value, torch.Tensor):
            return value
        if id(value) in self.replaced:
            return self.replaced[id(value)]
        copy = value.detach().clone()
        self.copies.append(copy)
        return copy

    def __call__(self, function: Callable[..., Any]) -> Any:
        return function(self.input, *self.args, **self.kwargs)


def _random_like(output: torch.Tensor) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    # drawn in float64 whatever the output's dtype: float32 and float64 runs weight alike
    return torch.randn(output.shape, generator=generator, dtype=torch.float64).to(output.dtype)


def _grads(output: torch.Tensor, inputs: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """The gradient of ``sum(output * w)`` (``w`` a fixed random tensor) w.r.t. ``inputs``."""
    return torch.autograd.grad(
        output, inputs, _random_like(output), allow_unused=True, materialize_grads=True
    )


def _raises(function: Callable[[], Any]) -> BaseException | None:
    try:
        function()
    except Exception as error:  # (the oracle's exception, whatever it is)
        return error
    return None


def _dropout_draws_a_mask(sample: SampleInput) -> bool:
    p = sample.kwargs.get("p", 0.5)
    return sample.kwargs.get("training", True) and 0 < p < 1 and sample.input.numel() > 0


def _check_dropout_mask(sample: SampleInput, output: torch.Tensor, tolerance: dict) -> None:
    """Every element is 0 or ``x / (1 - p)``, and the gradient is ``w · mask / (1 - p)``."""
    x, p = sample.input, sample.kwargs.get("p", 0.5)
    assert x.ne(0).all(), "the mask is read from the output: a zero input would hide it"
    kept = output.ne(0)
    torch.testing.assert_close(output[kept], x.detach()[kept] / (1 - p), **tolerance)
    (grad,) = _grads(output, [x])
    weights = _random_like(output)
    expected = torch.where(kept, weights / (1 - p), torch.zeros_like(weights))
    torch.testing.assert_close(grad, expected, **tolerance)


def _in_float64(sample: SampleInput) -> SampleInput:
    """The sample with its float32 tensors in float64 (leaves still leaves)."""

    def convert(value: Any) -> Any:
        if not isinstance(value, torch.Tensor) or value.dtype != torch.float32:
            return value
        return value.detach().double().requires_grad_(value.requires_grad)

    return SampleInput(
        convert(sample.input),
        args=tuple(map(convert, sample.args)),
        kwargs={key: convert(value) for key, value in sample.kwargs.items()},
    )


def _check_sample(
    opinfo: OpInfo, ours: Callable[..., Any], sample: SampleInput, dtype: torch.dtype
) -> None:
    tolerance = TOLERANCES[dtype]
    theirs, mine = Call(sample), Call(sample)
    snapshot = [t.detach().clone() for t in leaves(sample)]
    try:
        expected = theirs(opinfo.op)
    except Exception as error:  # (the oracle's exception, whatever it is)
        with pytest.raises(type(error)):
            mine(ours)
        return
    output = mine(ours)
    for leaf, before in zip(leaves(sample), snapshot, strict=True):
        # the op left its input as it was
        torch.testing.assert_close(leaf.detach(), before, rtol=0, atol=0, equal_nan=True)
    assert output.dtype == expected.dtype
    assert output.requires_grad == expected.requires_grad
    if opinfo.name == "nn.functional.dropout" and _dropout_draws_a_mask(sample):
        _check_dropout_mask(sample, output, tolerance)
        return
    reference = sample
    if dtype == torch.float32:
        # The oracle is torch on the same values in float64, rounded to float32.
        reference = _in_float64(sample)
        theirs = Call(reference)
        expected = theirs(opinfo.op)
    same = {"equal_nan": True, "check_dtype": False, **tolerance}
    torch.testing.assert_close(output, expected.to(output.dtype), **same)
    torch.testing.assert_close(mine.copies, theirs.copies, **same)
    if expected.requires_grad:
        grads = _grads(output, leaves(sample))
        expected_grads = _grads(expected, leaves(reference))
        torch.testing.assert_close(grads, expected_grads, **same)


def _check_all(
    opinfo: OpInfo,
    dtype: torch.dtype,
    check: Callable[[SampleInput], None],
    reference: bool = False,
) -> list[str]:
    failures = []
    for index, sample in enumerate(_samples(opinfo, dtype, reference)):
        try:
            check(sample)
        except Exception as error:  # (collected: every failing sample is reported)
            message = " ".join(str(error).split())[:400]
            failures.append(
                f"sample {index} ({describe(sample)}): {type(error).__name__}: {message}"
            )
    return failures


def _ran(name: str) -> str:
    decision = backend_info()["decisions"].get(f"nn.{name}")
    return "" if decision is None else decision["backend"]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("opinfo", OPINFOS, ids=IDS)
@pytest.mark.parametrize("path", PATHS, indirect=True)
def test_opinfo_samples_match_torch_in_value_and_gradient(
    path: str, opinfo: OpInfo, dtype: torch.dtype
) -> None:
    name = OPINFO_NAMES[opinfo.name]
    ours = _ours(name)
    ran: set[str] = set()

    def check(sample: SampleInput) -> None:
        _check_sample(opinfo, ours, sample, dtype)
        ran.add(_ran(name))

    failures = _check_all(opinfo, dtype, check, reference=True)
    assert not failures, f"{opinfo.name} on the {path} path, {dtype}:\n" + "\n".join(failures)
    if path == "triton" and name in KERNEL_OPS and dtype in opinfo.supported_dtypes("cpu"):
        assert "triton" in ran, f"no sample of {name} ran on the Triton kernels: {ran}"


def _gradcheck_function(
    opinfo: OpInfo, ours: Callable[..., Any], sample: SampleInput
) -> Callable[..., Any]:
    reseed = opinfo.name == "nn.functional.dropout"

    def call(*tensors: torch.Tensor) -> Any:
        if reseed:
            torch.manual_seed(2)  # the same dropout mask at every call
        return Call(sample, tensors)(ours)

    return call


@pytest.mark.parametrize("opinfo", OPINFOS, ids=IDS)
@pytest.mark.parametrize("path", PATHS, indirect=True)
def test_opinfo_samples_pass_gradcheck(path: str, opinfo: OpInfo) -> None:
    ours = _ours(OPINFO_NAMES[opinfo.name])

    def check(sample: SampleInput) -> None:
        inputs = tuple(leaves(sample))
        if _raises(lambda: Call(sample)(opinfo.op)) is not None:
            return  # refused (by torch and by us: the value test holds that)
        function = _gradcheck_function(opinfo, ours, sample)
        nondet_tol = opinfo.gradcheck_nondet_tol
        assert torch.autograd.gradcheck(function, inputs, nondet_tol=nondet_tol, fast_mode=True)
        if path == "torch":
            assert torch.autograd.gradgradcheck(
                function, inputs, nondet_tol=nondet_tol, fast_mode=True
            )
            return
        output = function(*inputs)
        if not output.requires_grad:
            return
        refused = _raises(lambda: _grads_create_graph(output, inputs))
        if refused is None:
            # no first-order-only Triton backward on this sample's way: then it must be right
            assert torch.autograd.gradgradcheck(
                function, inputs, nondet_tol=nondet_tol, fast_mode=True
            )
        else:
            assert isinstance(refused, RuntimeError), refused
            assert "create_graph=True" in str(refused), refused
            assert f"{backend.ENV_VAR}=torch" in str(refused), refused

    failures = _check_all(opinfo, torch.float64, check)
    assert not failures, f"{opinfo.name} on the {path} path, float64:\n" + "\n".join(failures)


def _grads_create_graph(output: torch.Tensor, inputs: tuple[torch.Tensor, ...]) -> None:
    torch.autograd.grad(output, inputs, _random_like(output), allow_unused=True, create_graph=True)


ERROR_OPINFOS = [op for op in OPINFOS if op.error_inputs_func is not None]


def test_the_error_inputs_cover_ops() -> None:
    # conv2d, rms_norm, gelu and embedding have OpInfo error inputs in torch 2.13; the rest none
    assert len(ERROR_OPINFOS) >= 4, [op.name for op in ERROR_OPINFOS]


@pytest.mark.parametrize("opinfo", ERROR_OPINFOS, ids=[op.name for op in ERROR_OPINFOS])
@pytest.mark.parametrize("path", PATHS, indirect=True)
def test_opinfo_error_inputs_raise_torchs_exception_type(path: str, opinfo: OpInfo) -> None:
    """Every OpInfo error input (a sample torch refuses) raises torch's exception type."""
    ours = _ours(OPINFO_NAMES[opinfo.name])
    failures = []
    for error_input in opinfo.error_inputs("cpu"):
        sample = error_input.sample_input
        with pytest.raises(error_input.error_type, match=error_input.error_regex):
            Call(sample)(opinfo.op)  # the oracle still refuses it
        try:
            Call(sample)(ours)
        except error_input.error_type:
            continue
        except Exception as error:  # (reported below: the wrong type)
            failures.append(f"{describe(sample)}: {type(error).__name__}: {error}")
        else:
            failures.append(f"{describe(sample)}: no error")
        failures[-1] += f" (torch: {error_input.error_type.__name__})"
    assert not failures, "\n".join(failures)
