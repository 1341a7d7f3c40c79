"""RMSNorm, SiLU and Embedding: PyTorch's OpInfo samples (``op_db``) in value and gradient against
torch, gradcheck and gradgradcheck in float64, the options torch's samples do not cover
(``padding_idx``, ``max_norm``, ``scale_grad_by_freq``, ``sparse``, ``inplace``, ``eps=None``),
torch's errors, the modules against torch.nn's, and ``torch.func`` transforms.

Tolerances: float64 against torch's own float64, 1e-10 (same formulas up to rounding); float32
with torch.testing's float32 defaults."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
import torch.nn.functional as TF
from torch.func import jacfwd, jacrev, vmap
from torch.testing._internal.common_methods_invocations import op_db

import torchopt_lab.nn as nn
import torchopt_lab.nn.functional as F

TOLERANCE = {"rtol": 1e-10, "atol": 1e-10}

# OpInfo name -> our function with the OpInfo's calling convention (embedding's OpInfo passes
# the weight first)
OURS: dict[str, Callable[..., torch.Tensor]] = {
    "nn.functional.rms_norm": F.rms_norm,
    "nn.functional.silu": F.silu,
    "nn.functional.embedding": lambda weight, indices, **kwargs: F.embedding(
        indices, weight, **kwargs
    ),
}
OPINFOS = [op for op in op_db if op.name in OURS and op.variant_test_name == ""]


@pytest.fixture(autouse=True)
def _torch_backend(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("TORCHOPT_LAB_BACKEND", "torch")
    yield


def test_every_new_op_has_opinfo_samples() -> None:
    assert sorted(op.name for op in OPINFOS) == sorted(OURS)


def _tensors(sample: Any) -> list[torch.Tensor]:
    values = [sample.input, *sample.args, *sample.kwargs.values()]
    return [t for t in values if isinstance(t, torch.Tensor) and t.requires_grad]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("opinfo", OPINFOS, ids=[op.name for op in OPINFOS])
def test_opinfo_samples_match_torch_in_value_and_gradient(opinfo, dtype: torch.dtype) -> None:
    tolerance = TOLERANCE if dtype == torch.float64 else {}
    for sample in opinfo.sample_inputs("cpu", dtype, requires_grad=True):
        ours = OURS[opinfo.name](sample.input, *sample.args, **sample.kwargs)
        theirs = opinfo.op(sample.input, *sample.args, **sample.kwargs)
        torch.testing.assert_close(ours, theirs, equal_nan=True, **tolerance)
        inputs = _tensors(sample)
        grad_output = torch.randn_like(theirs)
        expected = torch.autograd.grad(theirs, inputs, grad_output, allow_unused=True)
        actual = torch.autograd.grad(ours, inputs, grad_output, allow_unused=True)
        torch.testing.assert_close(actual, expected, equal_nan=True, **tolerance)


@pytest.mark.parametrize("opinfo", OPINFOS, ids=[op.name for op in OPINFOS])
def test_opinfo_samples_pass_gradcheck_and_gradgradcheck(opinfo) -> None:
    for sample in opinfo.sample_inputs("cpu", torch.float64, requires_grad=True):
        if sample.kwargs.get("eps", 0.0) < 0:
            continue  # a negative eps makes mean(x²) + eps cross zero: not differentiable there
        inputs = _tensors(sample)

        def call(*tensors: torch.Tensor, sample: Any = sample) -> torch.Tensor:
            replaced = dict(zip(map(id, _tensors(sample)), tensors, strict=True))
            pick = lambda t: replaced.get(id(t), t)  # noqa: E731
            args = [pick(a) for a in sample.args]
            kwargs = {k: pick(v) for k, v in sample.kwargs.items()}
            return OURS[opinfo.name](pick(sample.input), *args, **kwargs)

        assert torch.autograd.gradcheck(call, inputs)
        assert torch.autograd.gradgradcheck(call, inputs)


def leaf(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, dtype=torch.float64, requires_grad=True)


EMBEDDING_OPTIONS = [
    {},
    {"padding_idx": 2},
    {"padding_idx": -1},
    {"scale_grad_by_freq": True},
    {"padding_idx": 0, "scale_grad_by_freq": True},
]


@pytest.mark.parametrize("options", EMBEDDING_OPTIONS, ids=str)
def test_embedding_options_match_torch(options: dict[str, Any]) -> None:
    weight = leaf(5, 3)
    indices = torch.tensor([[0, 2, 4], [2, 2, 1]])
    ours, theirs = F.embedding(indices, weight, **options), TF.embedding(indices, weight, **options)
    torch.testing.assert_close(ours, theirs, **TOLERANCE)
    grad_output = torch.randn_like(theirs)
    torch.testing.assert_close(
        torch.autograd.grad(ours, weight, grad_output),
        torch.autograd.grad(theirs, weight, grad_output),
        **TOLERANCE,
    )
    if not options:
        # padding_idx and scale_grad_by_freq define the gradient as other than the derivative
        # (as torch does), so only torch is their oracle; the backward is still linear in g
        assert torch.autograd.gradcheck(lambda w: F.embedding(indices, w, **options), (weight,))
    assert torch.autograd.gradgradcheck(lambda w: F.embedding(indices, w, **options), (weight,))


def test_embedding_max_norm_renormalises_rows_as_torch() -> None:
    torch.manual_seed(0)
    weight = torch.randn(6, 3, dtype=torch.float64) * 3
    ours_weight, theirs_weight = weight.clone().requires_grad_(), weight.clone().requires_grad_()
    indices = torch.tensor([1, 3, 3, 5])
    ours = F.embedding(indices, ours_weight, max_norm=1.5, norm_type=1.0)
    theirs = TF.embedding(indices, theirs_weight, max_norm=1.5, norm_type=1.0)
    torch.testing.assert_close(ours, theirs, **TOLERANCE)
    torch.testing.assert_close(ours_weight, theirs_weight, **TOLERANCE)
    grad_output = torch.randn_like(theirs)
    torch.testing.assert_close(
        torch.autograd.grad(ours, ours_weight, grad_output),
        torch.autograd.grad(theirs, theirs_weight, grad_output),
        **TOLERANCE,
    )


def test_embedding_sparse_gradient_matches_torch() -> None:
    weight = leaf(5, 3)
    indices = torch.tensor([0, 2, 2, 4])
    ours = F.embedding(indices, weight, sparse=True)
    theirs = TF.embedding(indices, weight, sparse=True)
    grad_output = torch.randn_like(theirs)
    (actual,) = torch.autograd.grad(ours, weight, grad_output)
    (expected,) = torch.autograd.grad(theirs, weight, grad_output)
    assert actual.is_sparse
    torch.testing.assert_close(actual.to_dense(), expected.to_dense(), **TOLERANCE)


def test_silu_inplace_matches_torch() -> None:
    x = leaf(3, 4)
    ours_input, theirs_input = x * 1, x * 1
    F.silu(ours_input, inplace=True)
    TF.silu(theirs_input, inplace=True)
    torch.testing.assert_close(ours_input, theirs_input, **TOLERANCE)
    grad_output = torch.randn(3, 4, dtype=torch.float64)
    torch.testing.assert_close(
        torch.autograd.grad(ours_input, x, grad_output, create_graph=True),
        torch.autograd.grad(theirs_input, x, grad_output, create_graph=True),
        **TOLERANCE,
    )


def test_rms_norm_default_eps_is_the_dtype_epsilon_as_torch() -> None:
    x = torch.randn(2, 3) * 1e-4
    torch.testing.assert_close(F.rms_norm(x, [3]), TF.rms_norm(x, [3]))


ERRORS = [
    ("rms_norm", lambda m: m.rms_norm(torch.randn(2, 3), [4])),
    ("rms_norm", lambda m: m.rms_norm(torch.randn(2, 3), [3], torch.ones(4))),
    ("rms_norm", lambda m: m.rms_norm(torch.randn(2, 3), 3)),
    ("embedding", lambda m: m.embedding(torch.tensor([1.0]), torch.randn(5, 3))),
    ("embedding", lambda m: m.embedding(torch.tensor([7]), torch.randn(5, 3))),
    ("embedding", lambda m: m.embedding(torch.tensor([1]), torch.randn(5, 3), padding_idx=5)),
    ("embedding", lambda m: m.embedding(torch.tensor([1]), torch.randn(5, 3), padding_idx=-6)),
    ("embedding", lambda m: m.embedding(torch.tensor([1]), torch.randn(5))),
]


@pytest.mark.parametrize("call", ERRORS, ids=[f"{name}{i}" for i, (name, _) in enumerate(ERRORS)])
def test_bad_input_raises_torchs_exception_type(call) -> None:
    _, fn = call
    with pytest.raises(Exception) as theirs:
        fn(TF)
    with pytest.raises(type(theirs.value)):
        fn(F)


MODULES = [
    (lambda m: m.RMSNorm([4]), lambda: torch.randn(2, 3, 4)),
    (lambda m: m.RMSNorm(4, eps=1e-3, elementwise_affine=False), lambda: torch.randn(2, 4)),
    (lambda m: m.SiLU(), lambda: torch.randn(2, 4)),
    (lambda m: m.Embedding(6, 4, padding_idx=1), lambda: torch.tensor([[1, 2], [5, 1]])),
]


@pytest.mark.parametrize("build, data", MODULES)
def test_module_subclasses_torch_nn_and_trains_as_it(build, data) -> None:
    torch.manual_seed(0)
    theirs = build(torch.nn)
    torch.manual_seed(0)
    ours = build(nn)
    assert isinstance(ours, type(theirs))
    assert repr(ours) == repr(theirs)
    torch.testing.assert_close(ours.state_dict(), theirs.state_dict())
    x = data()
    if x.is_floating_point():
        x.requires_grad_()
    outputs = ours(x), theirs(x)
    torch.testing.assert_close(outputs[0], outputs[1])
    grad_output = torch.randn_like(outputs[1])
    inputs = [*ours.parameters(), *([x] if x.requires_grad else [])]
    their_inputs = [*theirs.parameters(), *([x] if x.requires_grad else [])]
    torch.testing.assert_close(
        torch.autograd.grad(outputs[0], inputs, grad_output),
        torch.autograd.grad(outputs[1], their_inputs, grad_output),
    )


FUNC_OPS = [
    ("rms_norm", lambda m, x: m.rms_norm(x, [4], RW, eps=1e-6)),
    ("silu", lambda m, x: m.silu(x)),
    ("embedding", lambda m, x: m.embedding(IDS, x, padding_idx=0)),
]
RW, IDS = torch.randn(4, dtype=torch.float64), torch.tensor([[0, 2], [3, 2]])


@pytest.mark.parametrize("op", FUNC_OPS, ids=[op[0] for op in FUNC_OPS])
def test_torch_func_transforms_match_torch(op) -> None:
    _, fn = op
    x = torch.randn(4, 4, dtype=torch.float64)
    for transform in (jacrev, jacfwd):
        torch.testing.assert_close(
            transform(lambda x: fn(F, x))(x), transform(lambda x: fn(TF, x))(x), **TOLERANCE
        )
    xs = torch.randn(3, 4, 4, dtype=torch.float64)
    torch.testing.assert_close(
        vmap(lambda x: fn(F, x))(xs), vmap(lambda x: fn(TF, x))(xs), **TOLERANCE
    )


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_rms_norm_default_eps_of_a_half_precision_input_is_float32s_as_in_torch(dtype):
    # torch's default eps is the epsilon of the dtype it computes in (float32), not the input's
    # (bfloat16's 2^-7 would shift every small row's scale by percents).
    x = (torch.randn(6, 8, generator=torch.Generator().manual_seed(0)) * 0.05).to(dtype)
    weight = torch.ones(8)
    expected = torch.nn.functional.rms_norm(x.double(), [8], weight.double(), eps=1.1920929e-07)
    ours = F.rms_norm(x, [8], weight)
    # torch.testing's default tolerances for the half dtype: ours is the float64 result rounded
    # once to it (bfloat16's 2^-7 eps would be off by percents)
    torch.testing.assert_close(ours, expected.to(dtype))
