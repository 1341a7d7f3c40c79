"""check_optimizer passes optimizers that match their reference and catches each kind of
mismatch by the check named for it."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
import torch

import torchopt_lab.optim as ours
from torchopt_lab.optim.rules import REGISTRY, Hyperparameter, Rule, RuleOptimizer, State
from torchopt_lab.testing import OPTIMIZER_CHECKS, CheckFailed, check_optimizer

WITH_TORCH = sorted(name for name in REGISTRY if hasattr(torch.optim, name))


@pytest.mark.parametrize("name", WITH_TORCH)
def test_check_optimizer_passes_rule_optimizers_against_torch_optim(name: str) -> None:
    report = check_optimizer(
        REGISTRY[name],
        getattr(torch.optim, name),
        [{"lr": 0.01}, {"weight_decay": 0.1, "maximize": True}],
        complex_dtypes=(torch.complex128,),
    )
    assert report.passed
    assert report.names() == list(OPTIMIZER_CHECKS)


def lion_reference(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    states: list[dict[str, Any]],
    step: int,
    lr: float = 1e-4,
    betas: tuple[float, float] = (0.9, 0.99),
    weight_decay: float = 0.0,
) -> None:
    for p, g, state in zip(params, grads, states, strict=True):
        m = state.setdefault("exp_avg", torch.zeros_like(p))
        c = betas[0] * m + (1 - betas[0]) * g
        p.sub_(lr * (c.sign() + weight_decay * p))
        m.copy_(betas[1] * m + (1 - betas[1]) * g)


def test_check_optimizer_takes_a_plain_torch_function_as_reference() -> None:
    report = check_optimizer(ours.Lion, lion_reference, [{"lr": 1e-3, "weight_decay": 0.5}])
    assert report.passed
    assert report["state_dict_interchange"].passed is None


def _sgd_rule(**overrides: Any) -> Rule:
    fields: dict[str, Any] = {
        "hyperparameters": (Hyperparameter("lr", 0.1), Hyperparameter("momentum", 0.0)),
        "checks": (),
        "state": (State("momentum_buffer"),),
        "scalars": lambda group, step, state: {"lr": group["lr"], "momentum": group["momentum"]},
        "update": lambda p, g, buf, *, lr, momentum: (
            p - lr * (momentum * buf + g),
            momentum * buf + g,
        ),
    }
    fields.update(overrides)
    return Rule(**fields)


def sgd_reference(params, grads, states, step, lr=0.1, momentum=0.0) -> None:
    for p, g, state in zip(params, grads, states, strict=True):
        buf = state.setdefault("momentum_buffer", torch.zeros_like(p))
        buf.mul_(momentum).add_(g)
        p.sub_(lr * buf)


class GoodSGD(RuleOptimizer):
    rule = _sgd_rule()


class WrongUpdate(RuleOptimizer):
    # Forgets the momentum in the parameter's update.
    rule = _sgd_rule(
        update=lambda p, g, buf, *, lr, momentum: (p - lr * g, momentum * buf + g),
    )


class WrongStateName(RuleOptimizer):
    rule = _sgd_rule(state=(State("buffer"),))


class HiddenState(GoodSGD):
    """Counts steps outside its state dict, so a reloaded copy restarts its schedule."""

    def step(self, closure: Any = None) -> Any:
        self.__dict__["calls"] = self.__dict__.get("calls", 0) + 1
        for group in self.param_groups:
            group_lr = group["lr"]
            group["lr"] = group_lr / self.__dict__["calls"]
            super().step(closure)
            group["lr"] = group_lr
        return None


class MovesWithoutGrads(GoodSGD):
    def step(self, closure: Any = None) -> Any:
        with torch.no_grad():
            for group in self.param_groups:
                for p in group["params"]:
                    if p.grad is None:
                        p.mul_(0.5)
        return super().step(closure)


class EagerStateMovesWithoutGrads(RuleOptimizer):
    """Creates its state in the constructor (as torch's Adagrad), then changes it on a step
    without gradients."""

    rule = dataclasses.replace(_sgd_rule(), eager_state=True)

    def step(self, closure: Any = None) -> Any:
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    self.state[p]["momentum_buffer"].add_(1.0)
        return super().step(closure)


def test_check_optimizer_passes_a_correct_user_rule() -> None:
    assert check_optimizer(GoodSGD, sgd_reference, [{"momentum": 0.9}]).passed


@pytest.mark.parametrize(
    ("optimizer_class", "reference", "failing"),
    [
        (WrongUpdate, sgd_reference, {"matches_reference"}),
        (WrongStateName, torch.optim.SGD, {"matches_reference", "state_dict_interchange"}),
        (HiddenState, sgd_reference, {"matches_reference", "state_dict_round_trip"}),
        (MovesWithoutGrads, sgd_reference, {"step_without_grads_is_noop"}),
        (EagerStateMovesWithoutGrads, sgd_reference, {"step_without_grads_is_noop"}),
    ],
    ids=[
        "wrong_update",
        "wrong_state_name",
        "hidden_state",
        "moves_without_grads",
        "eager_state_moves_without_grads",
    ],
)
def test_check_optimizer_names_the_failing_check(
    optimizer_class: type, reference: Any, failing: set[str]
) -> None:
    options = [{"lr": 0.1, "momentum": 0.9}]
    report = check_optimizer(optimizer_class, reference, options, raise_on_failure=False)
    assert {result.name for result in report.failures} == failing
    with pytest.raises(CheckFailed, match=sorted(failing)[0]):
        check_optimizer(optimizer_class, reference, options)


def test_check_optimizer_refuses_unknown_checks() -> None:
    with pytest.raises(ValueError, match="Unknown checks"):
        check_optimizer(GoodSGD, sgd_reference, checks=["gradcheck"])
