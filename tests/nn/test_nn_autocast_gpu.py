"""Under ``torch.autocast("cuda", dtype=...)``, float16 and bfloat16, every layer on both paths
(``TORCHOPT_LAB_BACKEND=torch`` and ``=triton``, the kernels compiled) gives its output and its
input's gradient in the dtypes torch.nn.functional's namesake gives under the same autocast, with
close values; a model of our layers gives torch.nn's loss and gradient dtypes (skipped without
CUDA; the CPU's bfloat16 autocast is held by test_nn_autocast.py).

Tolerance: the autocast dtype's rounding. torch.testing's rtol for the dtype (float16 1e-3,
bfloat16 1.6e-2) and an atol of two rounding steps (2^-9 float16, 2^-7 bfloat16) of the tensor's
largest element: the paths round to the low precision after different ops than torch's fused
kernels, so an element that cancels to near zero differs by a rounding step of the terms. The
dtypes are compared exactly."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
import torch.nn.functional as TF

import torchopt_lab.nn as nn
import torchopt_lab.nn.functional as F
from torchopt_lab import backend

pytestmark = pytest.mark.gpu

PATHS = ["torch", "triton"]
DTYPES = [torch.float16, torch.bfloat16]
# rtol, and the atol per unit of the tensor's largest element
TOLERANCES = {torch.float16: (1e-3, 2**-9), torch.bfloat16: (1.6e-2, 2**-7)}


def assert_close_at(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    rtol, scale = TOLERANCES[dtype]
    atol = scale * expected.detach().abs().max().float().item()
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol)


@pytest.fixture(params=PATHS)
def path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    monkeypatch.setenv(backend.ENV_VAR, request.param)
    torch.manual_seed(0)
    yield request.param


def _cuda(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, device="cuda")


# name -> (call with the functional module `m` and the cuda tensors `t`, input shape). The tensors
# are made in the test (not at import: collection must not touch CUDA).
OPS: dict[
    str, tuple[Callable[[Any, dict[str, torch.Tensor], torch.Tensor], torch.Tensor], tuple]
] = {
    "linear": (lambda m, t, x: m.linear(x, t["w"], t["b"]), (3, 4)),
    "conv2d": (lambda m, t, x: m.conv2d(x, t["k"], t["kb"], padding=1), (2, 2, 4, 4)),
    "relu": (lambda m, t, x: m.relu(x), (3, 4)),
    "leaky_relu": (lambda m, t, x: m.leaky_relu(x, 0.2), (3, 4)),
    "gelu": (lambda m, t, x: m.gelu(x), (3, 4)),
    "gelu_tanh": (lambda m, t, x: m.gelu(x, approximate="tanh"), (3, 4)),
    "sigmoid": (lambda m, t, x: m.sigmoid(x), (3, 4)),
    "tanh": (lambda m, t, x: m.tanh(x), (3, 4)),
    "silu": (lambda m, t, x: m.silu(x), (3, 4)),
    "softmax": (lambda m, t, x: m.softmax(x, dim=1), (3, 4)),
    "log_softmax": (lambda m, t, x: m.log_softmax(x, dim=1), (3, 4)),
    "layer_norm": (lambda m, t, x: m.layer_norm(x, [4], t["lw"], t["lb"]), (3, 4)),
    "rms_norm": (lambda m, t, x: m.rms_norm(x, [4], t["lw"]), (3, 4)),
    "batch_norm": (
        lambda m, t, x: m.batch_norm(x, None, None, t["lw"], t["lb"], training=True),
        (3, 4),
    ),
    "mse_loss": (lambda m, t, x: m.mse_loss(x, t["target"]), (3, 4)),
    "cross_entropy": (lambda m, t, x: m.cross_entropy(x, t["labels"]), (3, 4)),
    "cross_entropy_probabilities": (
        lambda m, t, x: m.cross_entropy(x, t["probabilities"]),
        (3, 4),
    ),
    "embedding": (lambda m, t, x: m.embedding(t["labels"], x), (5, 4)),
}


def _tensors() -> dict[str, torch.Tensor]:
    return {
        "w": _cuda(5, 4),
        "b": _cuda(5),
        "k": _cuda(3, 2, 3, 3),
        "kb": _cuda(3),
        "lw": _cuda(4),
        "lb": _cuda(4),
        "target": _cuda(3, 4),
        "labels": torch.tensor([0, 3, 1], device="cuda"),
        "probabilities": torch.softmax(_cuda(3, 4), 1),
    }


def _run(
    module: Any, op: Callable[..., torch.Tensor], tensors: dict, x: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.clone().requires_grad_()
    with torch.autocast("cuda", dtype=dtype):
        output = op(module, tensors, x)
    # a fixed random weighting (a plain sum's gradient through softmax or a norm is ~0)
    generator = torch.Generator(device="cuda").manual_seed(1)
    weights = torch.rand(output.shape, generator=generator, device="cuda")
    (grad,) = torch.autograd.grad((output.float() * weights).sum(), x)
    return output, grad


@pytest.mark.parametrize("input_dtype", ["float32", "autocast"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", OPS)
def test_autocast_dtypes_and_values_match_torch_on_cuda(
    path: str, name: str, dtype: torch.dtype, input_dtype: str
) -> None:
    call, shape = OPS[name]
    tensors = _tensors()
    x = _cuda(*shape)
    if input_dtype == "autocast":
        x = x.to(dtype)
    ours, theirs = _run(F, call, tensors, x, dtype), _run(TF, call, tensors, x, dtype)
    assert [t.dtype for t in ours] == [t.dtype for t in theirs]
    for actual, expected in zip(ours, theirs, strict=True):
        assert_close_at(actual, expected, dtype)


def _block(module: Any) -> torch.nn.Module:
    return module.Sequential(
        module.Linear(4, 8),
        module.RMSNorm(8),
        module.SiLU(),
        module.LayerNorm(8),
        module.Linear(8, 3),
    )


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_model_under_cuda_autocast_gives_torch_nn_dtypes(path: str, dtype: torch.dtype) -> None:
    theirs = _block(torch.nn).cuda()
    ours = _block(nn).cuda()
    ours.load_state_dict(theirs.state_dict())
    x, target = _cuda(5, 4), torch.tensor([0, 1, 2, 1, 0], device="cuda")
    results = []
    for model, functional in ((ours, F), (theirs, TF)):
        with torch.autocast("cuda", dtype=dtype):
            loss = functional.cross_entropy(model(x), target)
        loss.backward()
        results.append((loss, [p.grad for p in model.parameters()]))
    (loss_ours, grads_ours), (loss_theirs, grads_theirs) = results
    assert loss_ours.dtype == loss_theirs.dtype == torch.float32
    assert [g.dtype for g in grads_ours] == [g.dtype for g in grads_theirs]
    assert_close_at(loss_ours, loss_theirs, dtype)
    for ours_grad, theirs_grad in zip(grads_ours, grads_theirs, strict=True):
        assert_close_at(ours_grad, theirs_grad, dtype)
