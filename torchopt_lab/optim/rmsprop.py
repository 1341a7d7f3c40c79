"""RMSprop, one :class:`~torchopt_lab.optim.rules.Rule` declaration run on the built-in engine
(its ``reference``: :func:`rmsprop`; its ``kernel``: the fused Triton ``rmsprop`` update)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from torchopt_lab.optim._base import (
    TorchoptOptimizer,
    as_float,
    foreach_add_,
    foreach_addcdiv_,
)
from torchopt_lab.optim._fused import KernelSpec
from torchopt_lab.optim._scalars import increment
from torchopt_lab.optim.rules import Check, Hyperparameter, Rule, State, lr_checks, register

__all__ = ["RMSPROP", "RMSprop", "rmsprop"]


def rmsprop(
    params: list[Tensor],
    grads: list[Tensor],
    square_avgs: list[Tensor],
    momentum_buffer_list: list[Tensor],
    grad_avgs: list[Tensor],
    state_steps: list[Tensor],
    *,
    lr: float | Tensor,
    alpha: float,
    eps: float,
    weight_decay: float,
    momentum: float,
    centered: bool,
    maximize: bool,
) -> None:
    """RMSprop's torch reference update over real tensors of one device and dtype (see
    :class:`RMSprop`). ``momentum_buffer_list`` is empty unless ``momentum > 0``, ``grad_avgs``
    unless ``centered``; the state lists come in torch's state_dict order (torch.optim's
    functional ``rmsprop`` takes ``grad_avgs`` first)."""
    lr = as_float(lr)
    increment(state_steps)
    if maximize:
        grads = torch._foreach_neg(grads)
    if weight_decay != 0:
        # L2 penalty: g <- g + lambda * theta.
        grads = torch._foreach_add(grads, params, alpha=weight_decay)
    # Mean square: v <- alpha * v + (1 - alpha) * g^2.
    torch._foreach_mul_(square_avgs, alpha)
    torch._foreach_addcmul_(square_avgs, grads, grads, value=1 - alpha)
    if centered:
        # Centered: mean gradient m <- alpha * m + (1 - alpha) * g, denominator sqrt(v - m^2) + eps.
        torch._foreach_lerp_(grad_avgs, grads, 1 - alpha)
        denominators = torch._foreach_addcmul(square_avgs, grad_avgs, grad_avgs, value=-1)
        torch._foreach_sqrt_(denominators)
    else:
        denominators = torch._foreach_sqrt(square_avgs)
    torch._foreach_add_(denominators, eps)
    if momentum > 0:
        # b <- momentum * b + g / denominator; theta <- theta - lr * b.
        torch._foreach_mul_(momentum_buffer_list, momentum)
        torch._foreach_addcdiv_(momentum_buffer_list, grads, denominators)
        foreach_add_(params, momentum_buffer_list, -lr)
    else:
        # theta <- theta - lr * g / denominator.
        foreach_addcdiv_(params, grads, denominators, -lr)


def _scalars(group: Mapping[str, Any], step: Any, state: dict[str, Tensor]) -> dict[str, Any]:
    """RMSprop's per-step values: its hyperparameters as they are (no bias correction)."""
    return {
        key: group[key] for key in ("lr", "alpha", "eps", "weight_decay", "momentum", "centered")
    }


def _update(
    param: Tensor,
    grad: Tensor,
    square_avg: Tensor,
    momentum_buffer: Tensor | None,
    grad_avg: Tensor | None,
    *,
    lr: Any,
    alpha: float,
    eps: float,
    weight_decay: Any,
    momentum: float,
    centered: bool,
) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
    """:func:`rmsprop` for one tensor, out of place: ``momentum_buffer`` is None unless
    ``momentum > 0``, ``grad_avg`` unless ``centered`` (returned as None). The state comes in
    torch's state-dict order; the engine negates g under maximize."""
    if weight_decay != 0:
        # L2 penalty: g <- g + lambda * theta.
        grad = grad + weight_decay * param
    # Mean square: v <- alpha * v + (1 - alpha) * g^2.
    square_avg = square_avg * alpha + (1 - alpha) * grad * grad
    if centered:
        # Centered: mean gradient m <- alpha * m + (1 - alpha) * g, denominator sqrt(v - m^2).
        grad_avg = torch.lerp(grad_avg, grad, 1 - alpha)
        denominator = (square_avg - grad_avg * grad_avg).sqrt() + eps
    else:
        denominator = square_avg.sqrt() + eps
    if momentum > 0:
        # b <- momentum * b + g / denominator; theta <- theta - lr * b.
        momentum_buffer = momentum_buffer * momentum + grad / denominator
        return param - lr * momentum_buffer, square_avg, momentum_buffer, grad_avg
    # theta <- theta - lr * g / denominator, in addcdiv's order: (lr * g) / denominator.
    return param - lr * grad / denominator, square_avg, momentum_buffer, grad_avg


#: RMSprop's declaration: torch.optim.RMSprop's arguments (all positional), checks (order, types,
#: messages), state (``step``, ``square_avg``, ``momentum_buffer`` with momentum, ``grad_avg``
#: when centered) and param groups; the per-tensor update (what fused=True compiles on the CPU)
#: beside the group-level reference and the fused kernel, bound by
#: tests/optim/test_builtin_rules.py.
RMSPROP = Rule(
    hyperparameters=(
        Hyperparameter("lr", 1e-2),
        Hyperparameter("alpha", 0.99),
        Hyperparameter("eps", 1e-8),
        Hyperparameter("weight_decay", 0),
        Hyperparameter("momentum", 0),
        Hyperparameter("centered", False),
        Hyperparameter("capturable", False),
        Hyperparameter("foreach", None),
        Hyperparameter("maximize", False),
        Hyperparameter("differentiable", False),
    ),
    checks=(
        *lr_checks(),
        Check("eps", lambda v: v >= 0.0, "Invalid epsilon value: {value}"),
        Check("momentum", lambda v: v >= 0.0, "Invalid momentum value: {value}"),
        Check("weight_decay", lambda v: v >= 0.0, "Invalid weight_decay value: {value}"),
        Check("alpha", lambda v: v >= 0.0, "Invalid alpha value: {value}"),
    ),
    state=(
        State("square_avg"),
        State("momentum_buffer", when=lambda group: group["momentum"] > 0),
        State("grad_avg", when=lambda group: group["centered"]),
    ),
    scalars=_scalars,
    update=_update,
    setstate_defaults={
        "momentum": 0,
        "centered": False,
        "foreach": None,
        "maximize": False,
        "differentiable": False,
        "capturable": False,
    },
    group_order=(
        "lr",
        "momentum",
        "alpha",
        "eps",
        "centered",
        "weight_decay",
        "capturable",
        "foreach",
        "maximize",
        "differentiable",
    ),
    reference=rmsprop,
    kernel=KernelSpec(
        update="rmsprop",
        state_lists={
            "square_avg": "square_avgs",
            "grad_avg": "grad_avgs",
            "momentum_buffer": "momentum_buffer_list",
        },
        options=lambda g: {"centered": g["centered"], "momentum": g["momentum"] > 0},
    ),
)


@register
class RMSprop(TorchoptOptimizer):
    r"""RMSprop (Hinton, 2012, "Neural Networks for Machine Learning", lecture 6e), centered
    variant after Graves (2013, "Generating Sequences With Recurrent Neural Networks").

    .. math::
        g_t &= \pm\nabla f(\theta_{t-1}) + \lambda\theta_{t-1}, \qquad
        v_t = \alpha v_{t-1} + (1-\alpha) g_t^2 \\
        \tilde v_t &= v_t - \bar g_t^2,\; \bar g_t = \alpha \bar g_{t-1} + (1-\alpha) g_t
            \text{ (centered), else } v_t \\
        b_t &= \mu b_{t-1} + g_t / (\sqrt{\tilde v_t} + \epsilon), \qquad
        \theta_t = \theta_{t-1} - \gamma b_t

    (:math:`\mu = 0` updates with :math:`g_t / (\sqrt{\tilde v_t} + \epsilon)` directly).
    Arguments (all positional, as in torch), defaults, errors, param groups and state (``step``,
    ``square_avg``, ``momentum_buffer``, ``grad_avg``) are torch.optim.RMSprop's.
    ``capturable`` and ``differentiable`` behave as torch's; ``fused`` (keyword-only, before
    ``backend``; torch's RMSprop has none) is an attribute, not a param-group key, as in the rule
    optimizers: on CPU tensors it runs the declaration's update compiled by Inductor, on CUDA the
    fused Triton kernel, and it refuses ``differentiable`` and ``foreach`` as torch's Adam does
    (docs/optimizers.md).
    """

    rule = RMSPROP
    # fused (keyword-only, after torch's arguments, before backend) as the rule optimizers take
    # it: an attribute, so param groups and state dicts stay torch.optim.RMSprop's.
    _adds_fused = True
