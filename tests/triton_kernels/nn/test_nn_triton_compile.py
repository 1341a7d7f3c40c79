"""``torch.compile`` on the Triton path (``TORCHOPT_LAB_BACKEND=triton``; kernels under the
interpreter on the CPU): the kernels a Linear/ReLU/cross_entropy model runs are PyTorch custom
ops with fake implementations (``torch.library.opcheck`` holds them to the real launch), the
model traces as one graph with no break, and compiled equals eager in value and gradient.

Tolerance: the same kernels in the same order, float32 rounding (rtol 1e-6, atol 1e-7)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

import torchopt_lab.nn as nn
import torchopt_lab.nn.functional as F
from torchopt_lab import backend_info
from torchopt_lab.nn import _triton_ops


@pytest.fixture(autouse=True)
def _triton_backend(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("TORCHOPT_LAB_BACKEND", "triton")
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_custom_ops_pass_opcheck() -> None:
    x, bias = torch.randn(3, 5), torch.randn(5)
    grad = torch.randn(3, 5)
    logits, target = torch.randn(4, 6), torch.tensor([0, 5, -100, 2])
    checks = [
        (_triton_ops.bias_activation_forward, (x, bias, "gelu", 0.0)),
        (_triton_ops.bias_activation_forward, (x, None, "leaky_relu", 0.1)),
        (_triton_ops.bias_activation_backward, (grad, x, bias, "gelu", 0.0, True)),
        (_triton_ops.bias_activation_backward, (grad, x, None, "relu", 0.0, False)),
        (_triton_ops.cross_entropy_forward, (logits, target, None, -100, 0.1)),
        (
            _triton_ops.cross_entropy_backward,
            (torch.rand(4), logits, target, torch.logsumexp(logits, 1), None, -100, 0.1),
        ),
    ]
    images, channel = torch.randn(2, 3, 4, 4), torch.randn(3)
    checks += [
        (_triton_ops.batch_norm_statistics, (images,)),
        (_triton_ops.batch_norm_gradient_sums, (torch.randn(2, 3, 4, 4), images, channel)),
        (_triton_ops.channel_affine, (images, channel, torch.randn(3))),
        (_triton_ops.channel_affine, (images, channel, channel, torch.randn(2, 3, 4, 4), channel)),
    ]
    rows, width = torch.randn(4, 5), torch.randn(5)
    mean, rstd = rows.mean(1), torch.rsqrt(rows.var(1, correction=0) + 1e-5)
    checks += [
        (_triton_ops.softmax_forward, (torch.randn(3, 4, 5), 1, False)),
        (_triton_ops.softmax_forward, (torch.randn(3, 4), -1, True)),
        (_triton_ops.softmax_backward, (torch.randn(3, 4), torch.softmax(x[:, :4], 1), 1, False)),
        (_triton_ops.layer_norm_forward, (rows, width, torch.randn(5), 1e-5)),
        (_triton_ops.layer_norm_forward, (rows, None, None, 1e-3)),
        (_triton_ops.layer_norm_backward, (torch.randn(4, 5), rows, width, mean, rstd, True)),
        (_triton_ops.layer_norm_backward, (torch.randn(4, 5), rows, None, mean, rstd, False)),
    ]
    for op, args in checks:
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))


def _mlp() -> tuple[torch.nn.Module, tuple[torch.Tensor, torch.Tensor]]:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(6, 8), nn.ReLU(), nn.LayerNorm(8), nn.Linear(8, 8), nn.GELU(), nn.Linear(8, 3)
    )
    return model, (torch.randn(4, 6), torch.tensor([0, 2, 1, 2]))


def _cnn() -> tuple[torch.nn.Module, tuple[torch.Tensor, torch.Tensor]]:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1),
        nn.BatchNorm2d(3),
        nn.ReLU(),
        nn.Conv2d(3, 3, 3),
        nn.BatchNorm2d(3),
        nn.GELU(),
    )
    return model, (torch.randn(2, 2, 5, 5), torch.tensor([[[0, 2, 1]] * 3] * 2))


@pytest.mark.parametrize("build", [_mlp, _cnn], ids=["mlp", "cnn"])
def test_triton_path_model_compiles_to_one_graph_and_matches_eager(build) -> None:
    model, (x, target) = build()

    def loss(x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(model(x), target)

    explanation = torch._dynamo.explain(loss)(x, target)
    assert (explanation.graph_count, explanation.graph_break_count) == (1, 0), [
        reason.reason for reason in explanation.break_reasons
    ]
    expected = loss(x, target)
    expected_grads = torch.autograd.grad(expected, list(model.parameters()))
    actual = torch.compile(loss, backend="aot_eager", fullgraph=True)(x, target)
    grads = torch.autograd.grad(actual, list(model.parameters()))
    decisions = backend_info()["decisions"]
    assert [decisions[f"nn.{name}"]["backend"] for name in ("relu", "gelu", "cross_entropy")] == [
        "triton"
    ] * 3
    torch.testing.assert_close(actual, expected, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(grads, expected_grads, rtol=1e-6, atol=1e-7)
