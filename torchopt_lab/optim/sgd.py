"""Stochastic gradient descent, with optional heavy-ball or Nesterov momentum: SGD and Momentum,
each one :class:`~torchopt_lab.optim.rules.Rule` declaration run on the built-in engine (its
``reference``: :func:`sgd`; its ``kernel``: the fused Triton ``sgd`` update)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from operator import attrgetter
from typing import Any

import torch
from torch import Tensor

from torchopt_lab.optim._base import TorchoptOptimizer, as_float, foreach_add_
from torchopt_lab.optim._fused import KernelSpec
from torchopt_lab.optim.rules import Check, Hyperparameter, Rule, State, register

__all__ = ["MOMENTUM", "SGD", "SGD_RULE", "Momentum", "sgd"]


def sgd(
    params: list[Tensor],
    grads: list[Tensor],
    momentum_buffer_list: list[Tensor | None],
    *,
    weight_decay: float,
    momentum: float,
    lr: float | Tensor,
    dampening: float,
    nesterov: bool,
    maximize: bool,
) -> None:
    """SGD's torch reference update over tensors of one device and dtype (see :class:`SGD`).

    Missing entries of ``momentum_buffer_list`` are filled in with new buffers (the first step's
    direction). Sparse gradients work: foreach ops take them one tensor at a time.
    """
    lr = as_float(lr)
    # Direction d = (maximize ? -g : g) + weight_decay * p.
    if maximize:
        grads = torch._foreach_neg(grads)
    if weight_decay != 0:
        grads = torch._foreach_add(grads, params, alpha=weight_decay)
    if momentum != 0:
        if all(buffer is not None for buffer in momentum_buffer_list):
            # b <- momentum * b + (1 - dampening) * d.
            torch._foreach_mul_(momentum_buffer_list, momentum)
            torch._foreach_add_(momentum_buffer_list, grads, alpha=1 - dampening)
        else:
            for i, buffer in enumerate(momentum_buffer_list):
                if buffer is None:
                    # The first step's buffer is the direction itself, undamped.
                    momentum_buffer_list[i] = grads[i].detach().clone()
                else:
                    buffer.mul_(momentum).add_(grads[i], alpha=1 - dampening)
        if nesterov:
            # Nesterov: d <- d + momentum * b; heavy ball: d <- b.
            grads = torch._foreach_add(grads, momentum_buffer_list, alpha=momentum)
        else:
            grads = momentum_buffer_list
    # p <- p - lr * d.
    if any(map(attrgetter("is_sparse"), grads)):
        for param, grad in zip(params, grads, strict=True):
            param.add_(grad, alpha=-lr)
    else:
        foreach_add_(params, grads, -lr)


def _scalars(group: Mapping[str, Any], step: Any, state: dict[str, Tensor]) -> dict[str, Any]:
    """SGD's per-step values: its hyperparameters as they are (it has no step count)."""
    return {key: group[key] for key in ("lr", "weight_decay", "momentum", "dampening", "nesterov")}


def _update(
    param: Tensor,
    grad: Tensor,
    momentum_buffer: Tensor | None,
    *,
    lr: Any,
    weight_decay: Any,
    momentum: float,
    dampening: float,
    nesterov: bool,
) -> tuple[Tensor, Tensor | None]:
    """:func:`sgd` for one tensor, out of place: ``momentum_buffer`` is None without momentum
    (returned as None) and on the first step (returned as the new buffer)."""
    # Direction d = g + weight_decay * p (the engine negates g under maximize).
    if weight_decay != 0:
        grad = grad + weight_decay * param
    if momentum != 0:
        if momentum_buffer is None:
            # The first step's buffer is the direction itself, undamped (detached, as torch's).
            momentum_buffer = grad.detach().clone()
        else:
            # b <- momentum * b + (1 - dampening) * d.
            momentum_buffer = momentum_buffer * momentum + (1 - dampening) * grad
        # Nesterov: d <- d + momentum * b; heavy ball: d <- b.
        grad = grad + momentum * momentum_buffer if nesterov else momentum_buffer
    # p <- p - lr * d.
    return param - lr * grad, momentum_buffer


#: SGD's declaration: torch.optim.SGD's arguments, checks (order, types, messages), state (a
#: ``momentum_buffer`` with momentum, created by the first step as a clone of the direction; no
#: ``step``) and param groups; the per-tensor update (what fused=True compiles on the CPU) beside
#: the group-level reference and the fused kernel, bound by tests/optim/test_builtin_rules.py.
SGD_RULE = Rule(
    hyperparameters=(
        Hyperparameter("lr", 1e-3),
        Hyperparameter("momentum", 0),
        Hyperparameter("dampening", 0),
        Hyperparameter("weight_decay", 0),
        Hyperparameter("nesterov", False),
        Hyperparameter("maximize", False, keyword_only=True),
        Hyperparameter("foreach", None, keyword_only=True),
        Hyperparameter("differentiable", False, keyword_only=True),
        Hyperparameter("fused", None, keyword_only=True),
    ),
    checks=(
        Check(
            "lr",
            lambda lr: not isinstance(lr, Tensor) or lr.numel() == 1,
            "Tensor lr must be 1-element",
        ),
        # torch writes these as ``x < 0.0`` (a NaN passes), unlike the other optimizers.
        Check("lr", lambda lr: not lr < 0.0, "Invalid learning rate: {value}"),
        Check("momentum", lambda m: not m < 0.0, "Invalid momentum value: {value}"),
        Check("weight_decay", lambda wd: not wd < 0.0, "Invalid weight_decay value: {value}"),
        Check(
            ("nesterov", "momentum", "dampening"),
            lambda v: not (v[0] and (v[1] <= 0 or v[2] != 0)),
            "Nesterov momentum requires a momentum and zero dampening",
        ),
        Check(
            ("fused", "differentiable"),
            lambda v: not (v[0] and v[1]),
            "`fused` does not support `differentiable`",
            RuntimeError,
        ),
    ),
    state=(State("momentum_buffer", init=None, when=lambda group: group["momentum"] != 0),),
    scalars=_scalars,
    update=_update,
    complex_as_real=False,  # linear in the gradient: torch updates complex tensors as they are
    setstate_defaults={
        "nesterov": False,
        "maximize": False,
        "foreach": None,
        "differentiable": False,
        "fused": False,
    },
    step_state=False,
    sparse_message=None,  # sparse gradients update the rows they touch
    reference=sgd,
    kernel=KernelSpec(
        update="sgd",
        state_lists={"momentum_buffer": "momentum_buffer_list"},
        options=lambda g: {"momentum": g["momentum"] != 0, "nesterov": g["nesterov"]},
    ),
)

#: Momentum's: SGD's rule with ``lr=0.01, momentum=0.9`` as defaults and a positive momentum
#: required (checked first); its param groups and state are SGD's.
MOMENTUM = dataclasses.replace(
    SGD_RULE,
    hyperparameters=(
        Hyperparameter("lr", 0.01),
        Hyperparameter("momentum", 0.9),
        *SGD_RULE.hyperparameters[2:],
    ),
    checks=(
        Check(
            "momentum",
            lambda m: m > 0.0,
            "Invalid momentum value: {value}; Momentum needs momentum > 0 (use SGD for plain "
            "gradient descent)",
        ),
        *SGD_RULE.checks,
    ),
)


@register
class SGD(TorchoptOptimizer):
    r"""Stochastic gradient descent, optionally with momentum (Robbins & Monro, 1951; Nesterov
    momentum after Sutskever et al., 2013, "On the importance of initialization and momentum in
    deep learning").

    .. math::
        d_t = \pm\nabla f(\theta_{t-1}) + \lambda\theta_{t-1}, \quad
        b_t = \begin{cases} d_1 & t = 1 \\ \mu b_{t-1} + (1-\tau) d_t & t > 1 \end{cases}, \quad
        \theta_t = \theta_{t-1} - \gamma\,(\text{nesterov} ? d_t + \mu b_t : b_t)

    with :math:`b_t = d_t` when :math:`\mu = 0` (plain SGD), :math:`-` under ``maximize``.
    Arguments, defaults, errors, param groups and state (``momentum_buffer``) are torch.optim.SGD's;
    the extra keyword arguments ``backend`` and ``max_grad_norm`` are explained in
    docs/optimizers.md ("Extra arguments").
    ``fused``, ``capturable`` and ``differentiable`` behave as torch's (docs/optimizers.md).
    """

    rule = SGD_RULE


@register
class Momentum(SGD):
    r"""SGD with heavy-ball momentum (Polyak, 1964, "Some methods of speeding up the convergence
    of iteration methods"): :class:`SGD` with ``lr=0.01, momentum=0.9`` as defaults.

    .. math::
        b_t = \mu b_{t-1} + (1-\tau) d_t \;(b_1 = d_1), \quad \theta_t = \theta_{t-1} - \gamma b_t

    Momentum is its point, so ``momentum`` must be positive (use :class:`SGD` for plain gradient
    descent). Its param groups and state are SGD's, so state dicts interchange with
    ``torch.optim.SGD``.
    """

    rule = MOMENTUM
