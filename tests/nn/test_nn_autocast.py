"""Under ``torch.autocast("cpu", dtype=torch.bfloat16)`` every layer computes its forward and its
gradients in the dtypes torch.nn's namesake does (linear and conv2d in bfloat16, cross_entropy and
mse_loss in float32, the rest in their input's dtype), and a model of our layers trains as the
same torch.nn model: loss float32, gradients in the parameters' float32.

Tolerance: bfloat16 rounding. Values are compared with torch.testing's bfloat16 rtol (1.6e-2)
and an atol of two bfloat16 rounding steps (2^-7) of the tensor's largest element: our backward
rounds to bfloat16 after each op where torch's fused kernels accumulate in float32, so an element
that cancels to near zero differs by a rounding step of the terms, not of itself. The dtypes are
compared exactly."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
import torch.nn.functional as TF

import torchopt_lab.nn as nn
import torchopt_lab.nn.functional as F


def assert_close_bfloat16(actual: torch.Tensor, expected: torch.Tensor) -> None:
    atol = 2**-7 * expected.detach().abs().max().float().item()
    torch.testing.assert_close(actual, expected, rtol=1.6e-2, atol=atol)


@pytest.fixture(autouse=True)
def _torch_path(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("TORCHOPT_LAB_BACKEND", "torch")
    torch.manual_seed(0)
    yield


def f32(*shape: int) -> torch.Tensor:
    return torch.randn(*shape)


W, B, K = f32(5, 4), f32(5), f32(3, 2, 3, 3)
LW, LB = f32(4), f32(4)
LABELS, PROBS = torch.tensor([0, 3, 1]), torch.softmax(f32(3, 4), 1)

# name, call with the module `m` (torchopt_lab's or torch's functional), input shape
OPS: list[tuple[str, Callable[[Any, torch.Tensor], torch.Tensor], tuple[int, ...]]] = [
    ("linear", lambda m, x: m.linear(x, W, B), (3, 4)),
    ("conv2d", lambda m, x: m.conv2d(x, K, None, padding=1), (2, 2, 4, 4)),
    ("relu", lambda m, x: m.relu(x), (3, 4)),
    ("gelu", lambda m, x: m.gelu(x), (3, 4)),
    ("sigmoid", lambda m, x: m.sigmoid(x), (3, 4)),
    ("softmax", lambda m, x: m.softmax(x, dim=1), (3, 4)),
    ("log_softmax", lambda m, x: m.log_softmax(x, dim=1), (3, 4)),
    ("layer_norm", lambda m, x: m.layer_norm(x, [4], LW, LB), (3, 4)),
    ("batch_norm", lambda m, x: m.batch_norm(x, None, None, LW, LB, training=True), (3, 4)),
    ("mse_loss", lambda m, x: m.mse_loss(x, torch.zeros(3, 4)), (3, 4)),
    ("cross_entropy", lambda m, x: m.cross_entropy(x, LABELS), (3, 4)),
    ("cross_entropy_probabilities", lambda m, x: m.cross_entropy(x, PROBS), (3, 4)),
    ("silu", lambda m, x: m.silu(x), (3, 4)),
    ("rms_norm", lambda m, x: m.rms_norm(x, [4], LW), (3, 4)),
    ("embedding", lambda m, x: m.embedding(LABELS, x), (5, 4)),
]


def _run(module: Any, op: Callable[..., torch.Tensor], x: torch.Tensor) -> tuple[Any, ...]:
    x = x.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        output = op(module, x)
    # a fixed random weighting: the gradient of a plain sum of a softmax or normalisation output
    # is zero up to rounding, which would compare only rounding noise
    weights = torch.rand(output.shape, generator=torch.Generator().manual_seed(1))
    (grad,) = torch.autograd.grad((output.float() * weights).sum(), x)
    return output, grad


@pytest.mark.parametrize("input_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("op", OPS, ids=[op[0] for op in OPS])
def test_autocast_dtypes_and_values_match_torch(op, input_dtype: torch.dtype) -> None:
    _, call, shape = op
    x = f32(*shape).to(input_dtype)
    ours, theirs = _run(F, call, x), _run(TF, call, x)
    assert [t.dtype for t in ours] == [t.dtype for t in theirs]
    for actual, expected in zip(ours, theirs, strict=True):
        assert_close_bfloat16(actual, expected)


def _mlp(module: Any) -> torch.nn.Module:
    return module.Sequential(
        module.Linear(4, 8), module.ReLU(), module.LayerNorm(8), module.Linear(8, 3)
    )


def _cnn(module: Any) -> torch.nn.Module:
    return module.Sequential(
        module.Conv2d(2, 3, 3, padding=1),
        module.BatchNorm2d(3),
        module.ReLU(),
        module.Conv2d(3, 2, 3),
    )


@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_model_under_autocast_trains_as_torch_nn(name: str) -> None:
    build = _mlp if name == "mlp" else _cnn
    theirs = build(torch.nn)
    ours = build(nn)
    ours.load_state_dict(theirs.state_dict())
    if name == "mlp":
        x, target = f32(5, 4), torch.tensor([0, 1, 2, 1, 0])
        losses = (lambda m: F.cross_entropy(m(x), target), lambda m: TF.cross_entropy(m(x), target))
    else:
        x, target = f32(2, 2, 5, 5), f32(2, 2, 3, 3)
        losses = (lambda m: F.mse_loss(m(x), target), lambda m: TF.mse_loss(m(x), target))
    results = []
    for model, loss in zip((ours, theirs), losses, strict=True):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            value = loss(model)
        value.backward()
        results.append((value, [p.grad for p in model.parameters()]))
    (loss_ours, grads_ours), (loss_theirs, grads_theirs) = results
    assert loss_ours.dtype == loss_theirs.dtype == torch.float32
    assert [g.dtype for g in grads_ours] == [g.dtype for g in grads_theirs]
    assert_close_bfloat16(loss_ours, loss_theirs)
    for ours_grad, theirs_grad in zip(grads_ours, grads_theirs, strict=True):
        assert_close_bfloat16(ours_grad, theirs_grad)
