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
from torchopt_lab.nn import _activation, _cross_entropy, _dropout, _norm, _rms_norm, _softmax


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
        (_activation.bias_activation_forward, (x, bias, "gelu", 0.0)),
        (_activation.bias_activation_forward, (x, None, "leaky_relu", 0.1)),
        (_activation.bias_activation_backward, (grad, x, bias, "gelu", 0.0, True)),
        (_activation.bias_activation_backward, (grad, x, None, "relu", 0.0, False)),
        (_cross_entropy.cross_entropy_forward, (logits, target, None, -100, 0.1)),
        (
            _cross_entropy.cross_entropy_backward,
            (torch.rand(4), logits, target, torch.logsumexp(logits, 1), None, -100, 0.1),
        ),
    ]
    images, channel = torch.randn(2, 3, 4, 4), torch.randn(3)
    checks += [
        (_norm.batch_norm_statistics, (images,)),
        (_norm.batch_norm_gradient_sums, (torch.randn(2, 3, 4, 4), images, channel)),
        (_norm.channel_affine, (images, channel, torch.randn(3))),
        (_norm.channel_affine, (images, channel, channel, torch.randn(2, 3, 4, 4), channel)),
    ]
    rows, width = torch.randn(4, 5), torch.randn(5)
    mean, rstd = rows.mean(1), torch.rsqrt(rows.var(1, correction=0) + 1e-5)
    checks += [
        (_softmax.softmax_forward, (torch.randn(3, 4, 5), 1, False)),
        (_softmax.softmax_forward, (torch.randn(3, 4), -1, True)),
        (_softmax.softmax_backward, (torch.randn(3, 4), torch.softmax(x[:, :4], 1), 1, False)),
        (_norm.layer_norm_forward, (rows, width, torch.randn(5), 1e-5)),
        (_norm.layer_norm_forward, (rows, None, None, 1e-3)),
        (_norm.layer_norm_backward, (torch.randn(4, 5), rows, width, mean, rstd, True)),
        (_norm.layer_norm_backward, (torch.randn(4, 5), rows, None, mean, rstd, False)),
        (_rms_norm.rms_norm_forward, (rows, width, 1e-5)),
        (_rms_norm.rms_norm_forward, (rows, None, 1e-3)),
        (_rms_norm.rms_norm_backward, (torch.randn(4, 5), rows, width, rstd, True)),
        (_rms_norm.rms_norm_backward, (torch.randn(4, 5), rows, None, rstd, False)),
    ]
    probabilities = torch.softmax(torch.randn(4, 6), 1)
    log_sum_exp = torch.logsumexp(logits, 1)
    checks += [
        (_activation.bias_activation_forward_, (x.clone(), "relu", 0.0)),
        (_dropout.dropout_forward, (x, 0.25, torch.tensor(7, device="cpu"))),
        (_dropout.dropout_forward_, (x.clone(), 0.25, torch.tensor(7, device="cpu"))),
        (_dropout.dropout_backward, (grad, 0.25, torch.tensor(7, device="cpu"))),
        (
            _cross_entropy.cross_entropy_probabilities_forward,
            (logits, probabilities, torch.rand(6), 0.1),
        ),
        (
            _cross_entropy.cross_entropy_probabilities_backward,
            (torch.rand(4), logits, probabilities, log_sum_exp, torch.ones(4), None, 0.1),
        ),
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


def _dropout_mlp() -> tuple[torch.nn.Module, tuple[torch.Tensor, torch.Tensor]]:
    """Dropout (in place too) and a class-probability target: the seeded kernel and the
    probability cross-entropy kernels as custom ops."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(6, 8),
        nn.ReLU(),
        nn.Dropout(0.25),
        nn.Linear(8, 8),
        nn.Dropout(0.5, inplace=True),
        nn.Linear(8, 3),
    )
    return model, (torch.randn(4, 6), torch.softmax(torch.randn(4, 3), 1))


class _Block(torch.nn.Module):
    """A transformer block minus attention: embedding, RMS norm, a SiLU MLP with a residual
    connection, the output projection; its logits transposed to ``[N, classes, sequence]``."""

    def __init__(self) -> None:
        super().__init__()
        self.embedding = nn.Embedding(7, 8, padding_idx=0)
        self.norm = nn.RMSNorm(8)
        self.mlp = nn.Sequential(nn.Linear(8, 16), nn.SiLU(), nn.Linear(16, 8))
        self.head = nn.Linear(8, 7)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        hidden = self.embedding(tokens)
        hidden = hidden + self.mlp(self.norm(hidden))
        return self.head(hidden).transpose(1, 2)


def _block() -> tuple[torch.nn.Module, tuple[torch.Tensor, torch.Tensor]]:
    torch.manual_seed(0)
    return _Block(), (torch.tensor([[1, 2, 0, 6], [3, 3, 5, 0]]), torch.tensor([[2, 0, 6, 1]] * 2))


# The layers of the models that run a Triton kernel, and their backend_info component.
TRITON_LAYERS = {
    "ReLU": "nn.relu",
    "GELU": "nn.gelu",
    "LayerNorm": "nn.layer_norm",
    "BatchNorm2d": "nn.batch_norm",
    "Dropout": "nn.dropout",
    "RMSNorm": "nn.rms_norm",
    "SiLU": "nn.silu",
}


@pytest.mark.parametrize(
    "build", [_mlp, _cnn, _dropout_mlp, _block], ids=["mlp", "cnn", "dropout", "block"]
)
def test_triton_path_model_compiles_to_one_graph_and_matches_eager(build) -> None:
    model, (x, target) = build()

    def loss(x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(model(x), target)

    explanation = torch._dynamo.explain(loss)(x, target)
    assert (explanation.graph_count, explanation.graph_break_count) == (1, 0), [
        reason.reason for reason in explanation.break_reasons
    ]
    # the same seed, so dropout draws the same masks in eager and compiled
    torch.manual_seed(1)
    expected = loss(x, target)
    expected_grads = torch.autograd.grad(expected, list(model.parameters()))
    torch.manual_seed(1)
    actual = torch.compile(loss, backend="aot_eager", fullgraph=True)(x, target)
    grads = torch.autograd.grad(actual, list(model.parameters()))
    decisions = backend_info()["decisions"]
    kernels = [
        type(layer).__name__ for layer in model.modules() if type(layer).__name__ in TRITON_LAYERS
    ]
    assert [decisions[TRITON_LAYERS[name]]["backend"] for name in kernels] == ["triton"] * len(
        kernels
    )
    assert decisions["nn.cross_entropy"]["backend"] == "triton"
    torch.testing.assert_close(actual, expected, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(grads, expected_grads, rtol=1e-6, atol=1e-7)


def test_compiled_dropouts_of_one_tensor_draw_different_masks() -> None:
    # AOTAutograd's common-subexpression pass would merge two identical pure calls into one mask.
    def twice(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return F.dropout(x, 0.5), F.dropout(x, 0.5)

    x = torch.ones(64, 64, requires_grad=True)
    first, second = torch.compile(twice, backend="aot_eager", fullgraph=True)(x)
    assert not torch.equal(first != 0, second != 0)
