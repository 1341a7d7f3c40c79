"""Adamax, declared with the public authoring API (:mod:`torchopt_lab.optim.rules`)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from torchopt_lab.optim.rules import (
    Hyperparameter,
    Rule,
    RuleOptimizer,
    State,
    adam_checks,
    register,
    tl,
    triton_jit,
    triton_lerp,
)


def _scalars(group: Mapping[str, Any], step: float, state: dict[str, Tensor]) -> dict[str, Any]:
    beta1, beta2 = group["betas"]
    return {
        "beta1": beta1,
        "beta2": beta2,
        "eps": group["eps"],
        "weight_decay": group["weight_decay"],
        # The bias-corrected step size gamma / (1 - beta1^t).
        "clr": group["lr"] / (1 - beta1**step),
    }


def _update(
    param: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    exp_inf: Tensor,
    *,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    clr: Any,
) -> tuple[Tensor, Tensor, Tensor]:
    if weight_decay != 0:
        grad = grad + weight_decay * param
    # m_t = beta1 m + (1 - beta1) g;  u_t = max(beta2 u, |g| + eps).
    exp_avg = torch.lerp(exp_avg, grad, 1 - beta1)  # torch's two formulas
    exp_inf = torch.maximum(exp_inf * beta2, grad.abs() + eps)
    param = param - clr * exp_avg / exp_inf
    return param, exp_avg, exp_inf


@triton_jit
def _triton_update(param, grad, states, scalars):
    """``_update`` for the fused rule kernel, line for line."""
    exp_avg, exp_inf = states
    beta1, beta2, eps, weight_decay, clr = scalars
    if weight_decay != 0:
        grad = grad + weight_decay * param
    exp_avg = triton_lerp(exp_avg, grad, 1 - beta1)
    exp_inf = tl.maximum(exp_inf * beta2, tl.abs(grad) + eps, propagate_nan=tl.PropagateNan.ALL)
    param = param - clr * exp_avg / exp_inf
    return param, (exp_avg, exp_inf)


@register
class Adamax(RuleOptimizer):
    r"""Adamax (Kingma and Ba, 2015, "Adam: A Method for Stochastic Optimization", section 7.1),
    as ``torch.optim.Adamax``.

    .. math::
        m_t = \beta_1 m_{t-1} + (1-\beta_1) g_t,\quad
        u_t = \max(\beta_2 u_{t-1}, |g_t| + \epsilon),\quad
        \theta_t = \theta_{t-1} - \frac{\gamma}{1-\beta_1^t} \frac{m_t}{u_t}

    ``weight_decay`` adds :math:`\lambda\theta` to the gradient. Same arguments, defaults, errors
    and state dict (``step``, ``exp_avg``, ``exp_inf``) as torch.
    """

    rule = Rule(
        hyperparameters=(
            Hyperparameter("lr", 2e-3),
            Hyperparameter("betas", (0.9, 0.999)),
            Hyperparameter("eps", 1e-8),
            Hyperparameter("weight_decay", 0),
            Hyperparameter("foreach", None),
            Hyperparameter("maximize", False, keyword_only=True),
            Hyperparameter("differentiable", False, keyword_only=True),
            Hyperparameter("capturable", False, keyword_only=True),
        ),
        checks=adam_checks(),
        state=(State("exp_avg"), State("exp_inf")),
        scalars=_scalars,
        update=_update,
        triton_update=_triton_update,
    )
