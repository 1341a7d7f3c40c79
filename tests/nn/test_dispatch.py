"""Every functional asks ``torchopt_lab.backend.resolve`` through ``nn._dispatch``: the decision is
recorded, a Triton choice without a wired kernel raises, and a wired kernel is what runs."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

import torchopt_lab.nn.functional as F
from torchopt_lab import backend, backend_info
from torchopt_lab.nn import _dispatch

x = torch.randn(3, 4)
CALLS: dict[str, Callable[[], Any]] = {
    "linear": lambda: F.linear(x, torch.randn(2, 4)),
    "conv2d": lambda: F.conv2d(torch.randn(1, 1, 3, 3), torch.randn(1, 1, 2, 2)),
    "relu": lambda: F.relu(x),
    "leaky_relu": lambda: F.leaky_relu(x),
    "sigmoid": lambda: F.sigmoid(x),
    "tanh": lambda: F.tanh(x),
    "gelu": lambda: F.gelu(x),
    "softmax": lambda: F.softmax(x, 1),
    "log_softmax": lambda: F.log_softmax(x, 1),
    "mse_loss": lambda: F.mse_loss(x, x),
    "cross_entropy": lambda: F.cross_entropy(x, torch.tensor([0, 1, 2])),
    "layer_norm": lambda: F.layer_norm(x, [4]),
    "batch_norm": lambda: F.batch_norm(x, None, None, training=True),
    "dropout": lambda: F.dropout(x, 0.5),
}


@pytest.mark.parametrize("name", CALLS)
def test_functional_records_its_backend_decision(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(backend.ENV_VAR, "torch")
    CALLS[name]()
    decision = backend_info()["decisions"][f"nn.{name}"]
    assert decision["backend"] == "torch"
    assert decision["reason"] == f"torch path {backend.ENV_VAR}=torch"


@pytest.mark.parametrize("name", CALLS)
def test_triton_choice_without_a_wired_kernel_raises_not_implemented(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_dispatch.backend, "resolve", lambda *args: "triton")
    monkeypatch.setattr(_dispatch, "_triton_functions", dict)
    with pytest.raises(NotImplementedError, match=f"no Triton kernel is wired for '{name}'"):
        CALLS[name]()


@pytest.mark.parametrize("name", CALLS)
def test_triton_choice_runs_the_wired_function(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    sentinel = torch.tensor(12345.0)
    calls = []

    def kernel(*args: Any, **kwargs: Any) -> torch.Tensor:
        calls.append(args)
        return sentinel

    monkeypatch.setattr(_dispatch.backend, "resolve", lambda *args: "triton")
    monkeypatch.setattr(_dispatch, "_triton_functions", lambda: {name: kernel})
    assert CALLS[name]() is sentinel
    assert len(calls) == 1
