"""``torch.compile`` of models built from ``torchopt_lab.nn`` on the torch path: one graph, no
graph break (``fullgraph=True`` compiles), and the compiled forward and backward equal eager.

The models are small and compiled with the ``aot_eager`` backend, which traces our hand-written
backward through AOTAutograd as Inductor would, without the C++ build (slow on the test machine).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
import torch

import torchopt_lab.nn as nn
import torchopt_lab.nn.functional as F


@pytest.fixture(autouse=True)
def _torch_path(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("TORCHOPT_LAB_BACKEND", "torch")
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _mlp() -> tuple[torch.nn.Module, Callable[..., torch.Tensor], tuple[torch.Tensor, ...]]:
    model = nn.Sequential(
        nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), nn.GELU(), nn.LayerNorm(8), nn.Linear(8, 3)
    ).double()

    def loss(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(model(x), t, label_smoothing=0.1)

    x = torch.randn(4, 6, dtype=torch.float64)
    return model, loss, (x, torch.tensor([0, 2, 1, 2]))


def _cnn() -> tuple[torch.nn.Module, Callable[..., torch.Tensor], tuple[torch.Tensor, ...]]:
    model = nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(), nn.Conv2d(3, 2, 3)
    ).double()

    def loss(x: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(model(x), torch.zeros(2, 2, 3, 3, dtype=torch.float64))

    return model, loss, (torch.randn(2, 2, 5, 5, dtype=torch.float64),)


class _Block(torch.nn.Module):
    """A transformer block minus attention, from our layers: embedding, RMS norm, a SiLU MLP with
    a residual connection, layer norm and the output projection."""

    def __init__(self) -> None:
        super().__init__()
        self.embedding = nn.Embedding(7, 8, padding_idx=0)
        self.norm = nn.RMSNorm(8)
        self.mlp = nn.Sequential(nn.Linear(8, 16), nn.SiLU(), nn.Dropout(0.0), nn.Linear(16, 8))
        self.final_norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, 7)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        hidden = self.embedding(tokens)
        hidden = hidden + self.mlp(self.norm(hidden))
        return self.head(self.final_norm(hidden))


def _block() -> tuple[torch.nn.Module, Callable[..., torch.Tensor], tuple[torch.Tensor, ...]]:
    model = _Block().double()

    def loss(tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(model(tokens).transpose(1, 2), targets)

    return (
        model,
        loss,
        (torch.tensor([[1, 2, 0, 6], [3, 3, 5, 0]]), torch.tensor([[2, 0, 6, 1]] * 2)),
    )


def _dropout_mlp() -> tuple[torch.nn.Module, Callable[..., torch.Tensor], tuple[torch.Tensor, ...]]:
    """Dropout (in place too) and a class-probability cross-entropy target."""
    model = nn.Sequential(
        nn.Linear(6, 8),
        nn.Dropout(0.25),
        nn.Linear(8, 8),
        nn.Dropout(0.5, inplace=True),
        nn.Linear(8, 3),
    ).double()

    def loss(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(model(x), t, label_smoothing=0.1)

    x = torch.randn(4, 6, dtype=torch.float64)
    return model, loss, (x, torch.softmax(torch.randn(4, 3, dtype=torch.float64), 1))


MODELS = {"mlp": _mlp, "cnn": _cnn, "block": _block, "dropout": _dropout_mlp}


@pytest.mark.parametrize("name", MODELS)
def test_model_compiles_to_one_graph_without_breaks(name: str) -> None:
    _, loss, inputs = MODELS[name]()
    explanation = torch._dynamo.explain(loss)(*inputs)
    assert (explanation.graph_count, explanation.graph_break_count) == (1, 0), [
        reason.reason for reason in explanation.break_reasons
    ]


@pytest.mark.parametrize("name", MODELS)
def test_compiled_model_fullgraph_matches_eager(name: str) -> None:
    model, loss, inputs = MODELS[name]()
    eager_state = {k: v.clone() for k, v in model.state_dict().items()}
    # the same seed, so dropout draws the same masks in eager and compiled
    torch.manual_seed(1)
    expected = loss(*inputs)
    expected_grads = torch.autograd.grad(expected, list(model.parameters()))
    after_eager = {k: v.clone() for k, v in model.state_dict().items()}
    model.load_state_dict(eager_state)
    torch.manual_seed(1)
    actual = torch.compile(loss, backend="aot_eager", fullgraph=True)(*inputs)
    grads = torch.autograd.grad(actual, list(model.parameters()))
    # float64, the same ops in the same order: equal to rounding
    torch.testing.assert_close(actual, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grads, expected_grads, rtol=1e-12, atol=1e-12)
    # buffers (batch norm's running statistics) updated as in eager
    torch.testing.assert_close(model.state_dict(), after_eager, rtol=1e-12, atol=1e-12)


def test_compiled_cross_entropy_checks_targets_on_the_device() -> None:
    loss = torch.compile(F.cross_entropy, backend="aot_eager", fullgraph=True)
    logits = torch.randn(3, 4)
    torch.testing.assert_close(
        loss(logits, torch.tensor([0, 3, -100])),
        torch.nn.functional.cross_entropy(logits, torch.tensor([0, 3, -100])),
    )
    with pytest.raises(RuntimeError, match="out of bounds"):
        loss(logits, torch.tensor([0, 4, 1]))


def test_compiled_model_under_autocast_is_one_graph_and_matches_eager() -> None:
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    x, target = torch.randn(5, 4), torch.tensor([0, 1, 2, 1, 0])

    def loss(x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return F.cross_entropy(model(x), target)

    explanation = torch._dynamo.explain(loss)(x, target)
    assert (explanation.graph_count, explanation.graph_break_count) == (1, 0)
    compiled = torch.compile(loss, backend="aot_eager", fullgraph=True)(x, target)
    expected = loss(x, target)
    assert compiled.dtype == expected.dtype == torch.float32
    # the same bfloat16 ops in the same order: equal
    torch.testing.assert_close(compiled, expected, rtol=0, atol=0)
