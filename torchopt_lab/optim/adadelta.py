"""Adadelta, declared with the public authoring API (:mod:`torchopt_lab.optim.rules`)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor

from torchopt_lab.optim.rules import (
    Check,
    Hyperparameter,
    Rule,
    RuleOptimizer,
    State,
    lr_checks,
    register,
    tl,
    triton_jit,
)


def _scalars(group: Mapping[str, Any], step: float, state: dict[str, Tensor]) -> dict[str, Any]:
    return {key: group[key] for key in ("lr", "rho", "eps", "weight_decay")}


def _update(
    param: Tensor,
    grad: Tensor,
    square_avg: Tensor,
    acc_delta: Tensor,
    *,
    lr: Any,
    rho: float,
    eps: float,
    weight_decay: float,
) -> tuple[Tensor, Tensor, Tensor]:
    if weight_decay != 0:
        grad = grad + weight_decay * param
    # E[g^2]_t = rho E[g^2] + (1 - rho) g^2.
    square_avg = square_avg * rho + (1 - rho) * grad * grad
    # delta = sqrt(E[dx^2] + eps) / sqrt(E[g^2]_t + eps) g.
    delta = (acc_delta + eps).sqrt() / (square_avg + eps).sqrt() * grad
    # E[dx^2]_t = rho E[dx^2] + (1 - rho) delta^2.
    acc_delta = acc_delta * rho + (1 - rho) * delta * delta
    param = param - lr * delta
    return param, square_avg, acc_delta


@triton_jit
def _triton_update(param, grad, states, scalars):
    """``_update`` for the fused rule kernel, line for line."""
    square_avg, acc_delta = states
    lr, rho, eps, weight_decay = scalars
    if weight_decay != 0:
        grad = grad + weight_decay * param
    square_avg = square_avg * rho + (1 - rho) * grad * grad
    delta = tl.sqrt(acc_delta + eps) / tl.sqrt(square_avg + eps) * grad
    acc_delta = acc_delta * rho + (1 - rho) * delta * delta
    param = param - lr * delta
    return param, (square_avg, acc_delta)


@register
class Adadelta(RuleOptimizer):
    r"""Adadelta (Zeiler, 2012, "ADADELTA: An Adaptive Learning Rate Method"), as
    ``torch.optim.Adadelta``.

    .. math::
        v_t = \rho v_{t-1} + (1-\rho) g_t^2,\quad
        \Delta_t = \frac{\sqrt{u_{t-1}+\epsilon}}{\sqrt{v_t+\epsilon}} g_t,\quad
        u_t = \rho u_{t-1} + (1-\rho)\Delta_t^2,\quad
        \theta_t = \theta_{t-1} - \gamma \Delta_t

    ``weight_decay`` adds :math:`\lambda\theta` to the gradient. Same arguments, defaults, errors
    and state dict (``step``, ``square_avg``, ``acc_delta``) as torch.
    """

    rule = Rule(
        hyperparameters=(
            Hyperparameter("lr", 1.0),
            Hyperparameter("rho", 0.9),
            Hyperparameter("eps", 1e-6),
            Hyperparameter("weight_decay", 0),
            Hyperparameter("foreach", None),
            Hyperparameter("capturable", False, keyword_only=True),
            Hyperparameter("maximize", False, keyword_only=True),
            Hyperparameter("differentiable", False, keyword_only=True),
        ),
        checks=(
            *lr_checks(),
            Check("rho", lambda rho: 0.0 <= rho <= 1.0, "Invalid rho value: {value}"),
            Check("eps", lambda eps: eps >= 0.0, "Invalid epsilon value: {value}"),
            Check("weight_decay", lambda wd: wd >= 0.0, "Invalid weight_decay value: {value}"),
        ),
        state=(State("square_avg"), State("acc_delta")),
        scalars=_scalars,
        update=_update,
        triton_update=_triton_update,
        # torch's param-group order (its repr and state_dict), not its signature's.
        group_order=(
            "lr",
            "rho",
            "eps",
            "weight_decay",
            "maximize",
            "capturable",
            "foreach",
            "differentiable",
        ),
    )
