"""Every functional asks ``torchopt_lab.backend.resolve`` through ``nn._dispatch``: the decision is
recorded, a Triton choice runs the op module's own Triton-path Function (or, for an op without a
kernel, the torch path with the part recorded), and the arguments are validated once per call on
either path."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import pytest
import torch

import torchopt_lab.nn.functional as F
from torchopt_lab import backend, backend_info
from torchopt_lab.nn import (
    _activation,
    _cross_entropy,
    _dispatch,
    _dropout,
    _mse_loss,
    _norm,
    _rms_norm,
    _softmax,
)

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
    "silu": lambda: F.silu(x),
    "rms_norm": lambda: F.rms_norm(x, [4]),
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


# The Triton-path Function each op module runs; the ops without a kernel run their torch path on
# Triton too and record the part torch computed.
TRITON_FUNCTIONS: dict[str, type[torch.autograd.Function]] = {
    "relu": _activation.ActivationTritonFunction,
    "leaky_relu": _activation.ActivationTritonFunction,
    "sigmoid": _activation.ActivationTritonFunction,
    "tanh": _activation.ActivationTritonFunction,
    "gelu": _activation.ActivationTritonFunction,
    "softmax": _softmax.SoftmaxTritonFunction,
    "log_softmax": _softmax.SoftmaxTritonFunction,
    "cross_entropy": _cross_entropy.CrossEntropyTritonFunction,
    "layer_norm": _norm.LayerNormTritonFunction,
    "batch_norm": _norm.BatchNormTritonFunction,
    "dropout": _dropout.DropoutTritonFunction,
    "silu": _activation.ActivationTritonFunction,
    "rms_norm": _rms_norm.RMSNormTritonFunction,
}
TORCH_PARTS = {
    "linear": "nn.linear.gemm",
    "conv2d": "nn.conv2d.convolution",
    "mse_loss": "nn.mse_loss.loss",
}


def test_every_functional_has_a_triton_function_or_a_torch_part() -> None:
    assert sorted([*TRITON_FUNCTIONS, *TORCH_PARTS]) == sorted(CALLS)


@pytest.mark.parametrize("name", TRITON_FUNCTIONS)
def test_triton_choice_runs_the_op_modules_triton_function_once(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    class Outputs:
        """What the patched Function returns: itself as its first output too (the Functions
        that also return their saved statistics as outputs are indexed)."""

        def __getitem__(self, index: int) -> Outputs:
            return self

    sentinel = Outputs()
    calls = []

    def kernel(*args: Any) -> Outputs:
        calls.append(args)
        return sentinel

    monkeypatch.setattr(_dispatch.backend, "resolve", lambda *args: "triton")
    monkeypatch.setattr(TRITON_FUNCTIONS[name], "apply", kernel)
    assert CALLS[name]() is sentinel
    assert len(calls) == 1


@pytest.mark.parametrize("name", TORCH_PARTS)
def test_triton_choice_without_a_kernel_records_the_torch_part(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    decisions = []

    def resolve(component: str, requested: str, device: torch.device) -> str:
        decisions.append((component, requested))
        return requested if requested == "torch" else "triton"

    monkeypatch.setattr(_dispatch.backend, "resolve", resolve)
    CALLS[name]()
    assert decisions == [(f"nn.{name}", "auto"), (TORCH_PARTS[name], "torch")]


# Each functional validates its arguments once per call, whichever path runs: the checks a
# functional shares with others, counted.
VALIDATED: list[tuple[str, Any, str, Callable[[], Any]]] = [
    ("cross_entropy", _cross_entropy, "_check_class_target", CALLS["cross_entropy"]),
    ("cross_entropy", _cross_entropy, "check_reduction", CALLS["cross_entropy"]),
    ("cross_entropy", _cross_entropy, "check_dtype", CALLS["cross_entropy"]),
    ("layer_norm", _norm, "check_normalized_shape", CALLS["layer_norm"]),
    ("rms_norm", _rms_norm, "check_normalized_shape", CALLS["rms_norm"]),
    ("layer_norm", _norm, "check_dtype", CALLS["layer_norm"]),
    ("batch_norm", _norm, "check_dtype", CALLS["batch_norm"]),
    ("mse_loss", _mse_loss, "check_reduction", CALLS["mse_loss"]),
]


@pytest.mark.parametrize("path", ["torch", "triton"])
@pytest.mark.parametrize(
    ("name", "module", "check", "call"),
    VALIDATED,
    ids=[f"{name}-{check}" for name, _, check, _ in VALIDATED],
)
def test_functional_validates_once_per_call(
    name: str,
    module: Any,
    check: str,
    call: Callable[[], Any],
    path: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(backend.ENV_VAR, path)
    original = getattr(module, check)
    calls = []

    def counted(*args: Any, **kwargs: Any) -> Any:
        calls.append(args)
        return original(*args, **kwargs)

    monkeypatch.setattr(module, check, counted)
    call()
    assert backend_info()["decisions"][f"nn.{name}"]["backend"] == path
    assert len(calls) == 1


_WITHOUT_TRITON = """
import sys


class NoTriton:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("triton", "triton_kernels"):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)


sys.meta_path.insert(0, NoTriton())
import torch

import torchopt_lab.nn as nn
from torchopt_lab import backend_info

model = nn.Sequential(nn.Linear(4, 3), nn.SiLU(), nn.Dropout(0.2), nn.LayerNorm(3))
nn.CrossEntropyLoss()(model(torch.randn(2, 4)), torch.tensor([0, 1])).backward()
assert not [name for name in sys.modules if name.split(".")[0] in ("triton", "triton_kernels")]
assert backend_info()["decisions"]["nn.linear"]["backend"] == "torch"
"""


def test_layers_import_and_train_without_triton_installed() -> None:
    environment = {k: v for k, v in os.environ.items() if k != backend.ENV_VAR}
    subprocess.run([sys.executable, "-c", _WITHOUT_TRITON], check=True, env=environment)
