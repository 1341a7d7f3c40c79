"""Shared by the optimizer tests: the table of optimizers and options held to torch.optim, and a
runner that trains ours and torch's side by side on the same deterministic problem."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

import torchopt_lab.optim as ours

# Stated tolerances: float64 to ~1e-12 relative, float32 to ~1e-6 (the reference paths may fold
# scalars differently from torch, so results agree to rounding, not bit for bit).
TOLERANCES = {torch.float64: (1e-12, 1e-12), torch.float32: (1e-6, 1e-6)}
STEPS = 25


@dataclass(frozen=True)
class Case:
    """One optimizer configuration: ours and torch's class, with the same keyword arguments."""

    ours: type
    theirs: type
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def id(self) -> str:
        shown = ",".join(f"{key}={_show(value)}" for key, value in self.options.items())
        return f"{self.ours.__name__}({shown})"


def _show(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"tensor({value.item():g})"
    if isinstance(value, tuple):
        return "(" + ",".join(_show(v) for v in value) + ")"
    return str(value)


def _lr(value: float) -> torch.Tensor:
    # float64, so that torch (which computes with tensor hyperparameters in their dtype) and ours
    # (which reads them once as Python numbers) round the same way.
    return torch.tensor(value, dtype=torch.float64)


CASES: list[Case] = [
    Case(ours.SGD, torch.optim.SGD, {"lr": 0.1}),
    Case(ours.SGD, torch.optim.SGD, {"lr": 0.05, "momentum": 0.9}),
    Case(ours.SGD, torch.optim.SGD, {"lr": 0.05, "momentum": 0.9, "dampening": 0.3}),
    Case(ours.SGD, torch.optim.SGD, {"lr": 0.05, "momentum": 0.8, "nesterov": True}),
    Case(ours.SGD, torch.optim.SGD, {"lr": 0.05, "weight_decay": 0.1}),
    Case(ours.SGD, torch.optim.SGD, {"lr": 0.05, "momentum": 0.9, "maximize": True}),
    Case(ours.SGD, torch.optim.SGD, {"lr": _lr(0.05), "momentum": 0.5, "weight_decay": 0.01}),
    Case(ours.SGD, torch.optim.SGD, {"lr": 0.05, "foreach": True, "momentum": 0.9}),
    Case(ours.Momentum, torch.optim.SGD, {"lr": 0.01, "momentum": 0.9}),
    Case(ours.Momentum, torch.optim.SGD, {"lr": 0.02, "momentum": 0.7, "nesterov": True}),
    Case(ours.Momentum, torch.optim.SGD, {"lr": 0.02, "momentum": 0.7, "weight_decay": 0.1}),
    Case(ours.Adam, torch.optim.Adam, {"lr": 0.01}),
    Case(ours.Adam, torch.optim.Adam, {"lr": 0.01, "amsgrad": True}),
    Case(ours.Adam, torch.optim.Adam, {"lr": 0.01, "weight_decay": 0.1}),
    Case(ours.Adam, torch.optim.Adam, {"lr": 0.01, "maximize": True, "amsgrad": True}),
    Case(ours.Adam, torch.optim.Adam, {"lr": 0.01, "betas": (0.8, 0.95), "eps": 1e-3}),
    Case(
        ours.Adam,
        torch.optim.Adam,
        {"lr": 0.01, "decoupled_weight_decay": True, "weight_decay": 0.1},
    ),
    Case(ours.Adam, torch.optim.Adam, {"lr": _lr(0.01)}),
    Case(ours.Adam, torch.optim.Adam, {"lr": _lr(0.01), "betas": (_lr(0.8), _lr(0.9))}),
    Case(ours.Adam, torch.optim.Adam, {"lr": 0.01, "foreach": True}),
    Case(ours.AdamW, torch.optim.AdamW, {"lr": 0.01}),
    Case(ours.AdamW, torch.optim.AdamW, {"lr": 0.01, "weight_decay": 0.3, "amsgrad": True}),
    Case(ours.AdamW, torch.optim.AdamW, {"lr": 0.01, "maximize": True}),
    Case(ours.Adagrad, torch.optim.Adagrad, {"lr": 0.1}),
    Case(ours.Adagrad, torch.optim.Adagrad, {"lr": 0.1, "lr_decay": 0.05}),
    Case(ours.Adagrad, torch.optim.Adagrad, {"lr": 0.1, "weight_decay": 0.1}),
    Case(ours.Adagrad, torch.optim.Adagrad, {"lr": 0.1, "initial_accumulator_value": 0.5}),
    Case(ours.Adagrad, torch.optim.Adagrad, {"lr": 0.1, "eps": 1e-3, "maximize": True}),
    Case(
        ours.Adagrad, torch.optim.Adagrad, {"lr": _lr(0.1), "weight_decay": 0.01, "maximize": True}
    ),
    Case(ours.RMSprop, torch.optim.RMSprop, {"lr": 0.01}),
    Case(ours.RMSprop, torch.optim.RMSprop, {"lr": 0.01, "centered": True}),
    Case(ours.RMSprop, torch.optim.RMSprop, {"lr": 0.01, "momentum": 0.9}),
    Case(ours.RMSprop, torch.optim.RMSprop, {"lr": 0.01, "momentum": 0.5, "centered": True}),
    Case(ours.RMSprop, torch.optim.RMSprop, {"lr": 0.01, "weight_decay": 0.1, "alpha": 0.9}),
    Case(ours.RMSprop, torch.optim.RMSprop, {"lr": 0.01, "eps": 1e-3, "maximize": True}),
    Case(ours.RMSprop, torch.optim.RMSprop, {"lr": _lr(0.01), "momentum": 0.9}),
]


def make_params(dtype: torch.dtype, seed: int = 0) -> list[torch.Tensor]:
    """Odd shapes, a 0-dim tensor, a non-contiguous one (a transposed view's copy kept strided)."""
    generator = torch.Generator().manual_seed(seed)
    shapes = [(4, 3), (5,), (), (2, 3, 2)]
    draw = {"generator": generator, "dtype": dtype, "device": "cpu"}
    params = [torch.randn(shape, **draw) for shape in shapes]
    params.append(torch.randn(3, 4, **draw).t())
    return [p.requires_grad_() for p in params]


def loss_of(params: list[torch.Tensor]) -> torch.Tensor:
    """A smooth non-quadratic objective, so the optimizers' paths actually differ step to step."""
    total = torch.zeros((), dtype=params[0].dtype)
    for index, p in enumerate(params):
        total = total + ((p - 0.1 * index) ** 2).sum() + torch.sin(3 * p).sum()
    return total


def clone_params(params: list[torch.Tensor]) -> list[torch.Tensor]:
    return [p.detach().clone().requires_grad_() for p in params]


def two_groups(params: list[torch.Tensor], options: dict[str, Any]) -> list[dict[str, Any]]:
    """Two param groups; the second overrides lr when the options set one."""
    second: dict[str, Any] = {"params": params[2:]}
    if "lr" in options:
        second["lr"] = float(options["lr"]) * 0.5
    return [{"params": params[:2]}, second]


def train(
    make: Callable[[list[torch.Tensor]], torch.optim.Optimizer],
    params: list[torch.Tensor],
    steps: int = STEPS,
    use_closure: bool = True,
) -> torch.optim.Optimizer:
    """Run ``steps`` steps (alternating closure and plain step) and return the optimizer."""
    optimizer = make(params)
    for step in range(steps):

        def closure() -> torch.Tensor:
            optimizer.zero_grad()
            loss = loss_of(params)
            loss.backward()
            return loss

        if use_closure and step % 2 == 0:
            returned = optimizer.step(closure)
            assert isinstance(returned, torch.Tensor)
        else:
            closure()
            optimizer.step()
    return optimizer


def assert_params_close(
    actual: list[torch.Tensor], expected: list[torch.Tensor], dtype: torch.dtype
) -> None:
    rtol, atol = TOLERANCES[dtype]
    for a, e in zip(actual, expected, strict=True):
        torch.testing.assert_close(a.detach(), e.detach(), rtol=rtol, atol=atol)
