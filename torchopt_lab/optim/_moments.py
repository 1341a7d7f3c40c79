"""Adam's weight decay and moments, shared by the rules that build on them (NAdam, RAdam): the
torch update and its Triton twin side by side, held together by the rules' kernel tests."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from torchopt_lab.optim.rules import tl, triton_jit, triton_lerp  # noqa: F401 - Triton needs tl here


def moment_scalars(group: Mapping[str, Any]) -> dict[str, Any]:
    """The first scalars of the rules built on Adam's moments, in the order their
    ``triton_update`` unpacks them (``scalars[:6]``): ``lr``, ``beta1``, ``beta2``, ``eps``,
    ``weight_decay``, ``decoupled_weight_decay``."""
    beta1, beta2 = group["betas"]
    return {
        "lr": group["lr"],
        "beta1": beta1,
        "beta2": beta2,
        "eps": group["eps"],
        "weight_decay": group["weight_decay"],
        "decoupled_weight_decay": group["decoupled_weight_decay"],
    }


def decayed_moments(
    param: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    *,
    lr: Any,
    beta1: Any,
    beta2: Any,
    weight_decay: float,
    decoupled_weight_decay: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Weight decay (Adam's L2 term on the gradient, or AdamW's decoupled shrink of the weights),
    then m_t = beta1 m + (1 - beta1) g (torch.lerp) and v_t = beta2 v + (1 - beta2) g^2.

    Returns the parameter, the gradient the moments used, m_t and v_t."""
    if weight_decay != 0:
        if decoupled_weight_decay:
            param = param * (1 - lr * weight_decay)
        else:
            grad = grad + weight_decay * param
    exp_avg = torch.lerp(exp_avg, grad, 1 - beta1)  # torch's two formulas
    exp_avg_sq = exp_avg_sq * beta2 + (1 - beta2) * grad * grad
    return param, grad, exp_avg, exp_avg_sq


def _triton_decayed_moments(  # no annotations: Triton would read them as types
    param, grad, exp_avg, exp_avg_sq, lr, beta1, beta2, weight_decay, decoupled_weight_decay
):
    """:func:`decayed_moments` for a rule's ``triton_update``, line for line."""
    if weight_decay != 0:
        if decoupled_weight_decay != 0:
            param = param * (1 - lr * weight_decay)
        else:
            grad = grad + weight_decay * param
    exp_avg = triton_lerp(exp_avg, grad, 1 - beta1)
    exp_avg_sq = exp_avg_sq * beta2 + (1 - beta2) * grad * grad
    return param, grad, exp_avg, exp_avg_sq


triton_decayed_moments = triton_jit(_triton_decayed_moments)
