"""RAdam, declared with the public authoring API (:mod:`torchopt_lab.optim.rules`)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from torchopt_lab.optim._moments import decayed_moments, moment_scalars, triton_decayed_moments
from torchopt_lab.optim.rules import (
    TORCH_FLAGS,
    Hyperparameter,
    Rule,
    RuleOptimizer,
    State,
    adam_checks,
    register,
    tl,
    triton_jit,
)


def _scalars(group: Mapping[str, Any], step: float, state: dict[str, Tensor]) -> dict[str, Any]:
    beta1, beta2 = group["betas"]
    bias_correction2 = 1 - beta2**step
    # Length of the approximated simple moving average, its limit, and the variance rectifier.
    rho_inf = 2 / (1 - beta2) - 1
    rho_t = rho_inf - 2 * step * (beta2**step) / bias_correction2
    rectified = rho_t > 5.0
    if isinstance(rho_t, Tensor):
        # Under torch.compile the step is a tensor (rules.scalar_value): no host branch, the
        # rectifier is selected in the graph (clamped first: the square root's argument is
        # negative on the steps that do not use it).
        ratio = (rho_t - 4) * (rho_t - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho_t)
        rect = torch.where(rectified, ratio.clamp(min=0).sqrt(), 0.0)
    else:
        rect = (
            math.sqrt((rho_t - 4) * (rho_t - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho_t))
            if rectified
            else 0.0
        )
    return {
        **moment_scalars(group),
        "bias_correction1": 1 - beta1**step,
        "sqrt_bias_correction2": bias_correction2**0.5,
        "rectified": rectified,
        "rect": rect,
    }


def _update(
    param: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    *,
    lr: Any,
    eps: float,
    bias_correction1: float,
    sqrt_bias_correction2: float,
    rectified: bool,
    rect: float,
    **moments: Any,
) -> tuple[Tensor, Tensor, Tensor]:
    # moments: beta1, beta2, weight_decay, decoupled_weight_decay (moment_scalars).
    param, grad, exp_avg, exp_avg_sq = decayed_moments(
        param, grad, exp_avg, exp_avg_sq, lr=lr, **moments
    )
    bias_corrected_exp_avg = exp_avg / bias_correction1
    if isinstance(rectified, Tensor):
        # Under torch.compile: both branches, selected in the graph (see _scalars).
        adaptive_lr = sqrt_bias_correction2 / (exp_avg_sq.sqrt() + eps)
        adam = param - bias_corrected_exp_avg * lr * adaptive_lr * rect
        param = torch.where(rectified, adam, param - bias_corrected_exp_avg * lr)
    elif rectified:
        # Adam's step, scaled by the rectifier r_t, once the variance is tractable (rho_t > 5).
        adaptive_lr = sqrt_bias_correction2 / (exp_avg_sq.sqrt() + eps)
        param = param - bias_corrected_exp_avg * lr * adaptive_lr * rect
    else:
        # Early steps: SGD with momentum.
        param = param - bias_corrected_exp_avg * lr
    return param, exp_avg, exp_avg_sq


@triton_jit
def _triton_update(param, grad, states, scalars):
    """``_update`` for the fused rule kernel, line for line."""
    exp_avg, exp_avg_sq = states
    lr, beta1, beta2, eps, weight_decay, decoupled_weight_decay = scalars[:6]
    bias_correction1, sqrt_bias_correction2, rectified, rect = scalars[6:]
    param, grad, exp_avg, exp_avg_sq = triton_decayed_moments(
        param, grad, exp_avg, exp_avg_sq, lr, beta1, beta2, weight_decay, decoupled_weight_decay
    )
    bias_corrected_exp_avg = exp_avg / bias_correction1
    if rectified != 0:
        adaptive_lr = sqrt_bias_correction2 / (tl.sqrt(exp_avg_sq) + eps)
        param = param - bias_corrected_exp_avg * lr * adaptive_lr * rect
    else:
        param = param - bias_corrected_exp_avg * lr
    return param, (exp_avg, exp_avg_sq)


@register
class RAdam(RuleOptimizer):
    r"""RAdam (Liu et al., 2020, "On the Variance of the Adaptive Learning Rate and Beyond"), as
    ``torch.optim.RAdam``.

    .. math::
        m_t = \beta_1 m_{t-1} + (1-\beta_1) g_t,\quad v_t = \beta_2 v_{t-1} + (1-\beta_2) g_t^2,
        \quad \rho_\infty = \tfrac{2}{1-\beta_2} - 1,\quad
        \rho_t = \rho_\infty - \tfrac{2t\beta_2^t}{1-\beta_2^t} \\
        \theta_t = \theta_{t-1} - \gamma \frac{m_t}{1-\beta_1^t}
          \cdot \begin{cases} r_t \frac{\sqrt{1-\beta_2^t}}{\sqrt{v_t}+\epsilon} & \rho_t > 5 \\
          1 & \text{otherwise}\end{cases},\quad
        r_t = \sqrt{\tfrac{(\rho_t-4)(\rho_t-2)\rho_\infty}{(\rho_\infty-4)(\rho_\infty-2)\rho_t}}

    ``weight_decay`` adds :math:`\lambda\theta` to the gradient, or with
    ``decoupled_weight_decay=True`` multiplies :math:`\theta` by :math:`1-\gamma\lambda` first.
    Same arguments, defaults, errors and state dict (``step``, ``exp_avg``, ``exp_avg_sq``) as
    torch.
    """

    rule = Rule(
        hyperparameters=(
            Hyperparameter("lr", 1e-3),
            Hyperparameter("betas", (0.9, 0.999)),
            Hyperparameter("eps", 1e-8),
            Hyperparameter("weight_decay", 0),
            Hyperparameter("decoupled_weight_decay", False),
            *TORCH_FLAGS,
        ),
        checks=adam_checks(),
        state=(State("exp_avg"), State("exp_avg_sq")),
        scalars=_scalars,
        update=_update,
        triton_update=_triton_update,
        # torch's param-group order (its repr and state_dict), not its signature's.
        group_order=(
            "lr",
            "betas",
            "eps",
            "weight_decay",
            "maximize",
            "foreach",
            "capturable",
            "decoupled_weight_decay",
            "differentiable",
        ),
    )
