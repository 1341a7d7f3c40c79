"""Adagrad, one :class:`~torchopt_lab.optim.rules.Rule` declaration run on the built-in engine
(its ``reference``: :func:`adagrad`; its ``kernel``: the fused Triton ``adagrad`` update)."""

from __future__ import annotations

from collections.abc import Mapping
from operator import attrgetter
from typing import Any

import torch
from torch import Tensor

from torchopt_lab.optim._base import (
    TorchoptOptimizer,
    as_float,
    foreach_addcdiv_,
    per_step,
    read_steps,
)
from torchopt_lab.optim._fused import KernelSpec
from torchopt_lab.optim._scalars import increment
from torchopt_lab.optim.rules import Check, Hyperparameter, Rule, State, lr_checks, register

__all__ = ["ADAGRAD", "Adagrad", "adagrad"]


def _sparse_adagrad_update(
    param: Tensor, grad: Tensor, state_sum: Tensor, *, clr: float, eps: float
) -> None:
    """Update only the rows a sparse gradient touches, as torch.optim.Adagrad does."""
    # The update is non-linear in g, so duplicate indices must be summed first.
    grad = grad.coalesce()
    indices, values = grad._indices(), grad._values()

    def sparse_like(new_values: Tensor) -> Tensor:
        # The indices come from a coalesced tensor: valid, so the invariant check can be skipped.
        return torch.sparse_coo_tensor(indices, new_values, grad.size(), check_invariants=False)

    state_sum.add_(sparse_like(values.pow(2)))
    std_values = state_sum.sparse_mask(grad)._values().sqrt_().add_(eps)
    param.add_(sparse_like(values / std_values), alpha=-clr)


def adagrad(
    params: list[Tensor],
    grads: list[Tensor],
    state_sums: list[Tensor],
    state_steps: list[Tensor],
    *,
    lr: float | Tensor,
    weight_decay: float,
    lr_decay: float,
    eps: float,
    maximize: bool,
) -> None:
    """Adagrad's torch reference update over real tensors of one device and dtype (see
    :class:`Adagrad`). Sparse gradients update only the rows they touch."""
    lr = as_float(lr)
    increment(state_steps)
    steps = read_steps(state_steps)
    # Decayed step size: lr_t = lr / (1 + (t - 1) * lr_decay).
    step_sizes = per_step(steps, lambda t: -lr / (1 + (t - 1) * lr_decay))
    if maximize:
        grads = torch._foreach_neg(grads)
    if any(map(attrgetter("is_sparse"), grads)):
        if weight_decay != 0:
            raise RuntimeError("weight_decay option is not compatible with sparse gradients")
        dense = []
        for i, grad in enumerate(grads):
            if grad.is_sparse:
                _sparse_adagrad_update(params[i], grad, state_sums[i], clr=-step_sizes[i], eps=eps)
            else:
                dense.append(i)
        params, grads, state_sums, step_sizes = (
            [items[i] for i in dense] for items in (params, grads, state_sums, step_sizes)
        )
        if not params:
            return
    if weight_decay != 0:
        # L2 penalty: g <- g + lambda * theta.
        grads = torch._foreach_add(grads, params, alpha=weight_decay)
    # Accumulated squares: s <- s + g^2.
    torch._foreach_addcmul_(state_sums, grads, grads, value=1)
    # theta <- theta - lr_t * g / (sqrt(s) + eps).
    denominators = torch._foreach_sqrt(state_sums)
    torch._foreach_add_(denominators, eps)
    foreach_addcdiv_(params, grads, denominators, step_sizes)


def _scalars(group: Mapping[str, Any], step: Any, state: dict[str, Tensor]) -> dict[str, Any]:
    """Adagrad's per-step values: the decayed step size lr / (1 + (t - 1) * lr_decay)."""
    return {
        "clr": group["lr"] / (1 + (step - 1) * group["lr_decay"]),
        "weight_decay": group["weight_decay"],
        "eps": group["eps"],
    }


def _update(
    param: Tensor, grad: Tensor, state_sum: Tensor, *, clr: Any, weight_decay: Any, eps: float
) -> tuple[Tensor, Tensor]:
    """:func:`adagrad` for one dense tensor, out of place (the engine negates g under
    maximize)."""
    if weight_decay != 0:
        # L2 penalty: g <- g + lambda * theta.
        grad = grad + weight_decay * param
    # Accumulated squares: s <- s + g^2.
    state_sum = state_sum + grad * grad
    # theta <- theta - lr_t * g / (sqrt(s) + eps), in addcdiv's order: (lr_t * g) / denominator.
    param = param - clr * grad / (state_sum.sqrt() + eps)
    return param, state_sum


#: Adagrad's declaration: torch.optim.Adagrad's arguments, checks (order, types, messages), state
#: (``step`` and ``sum``, created in the constructor as torch does) and param groups; the
#: per-tensor update (what fused=True compiles on the CPU) beside the group-level reference and
#: the fused kernel, bound by tests/optim/test_builtin_rules.py.
ADAGRAD = Rule(
    hyperparameters=(
        Hyperparameter("lr", 1e-2),
        Hyperparameter("lr_decay", 0),
        Hyperparameter("weight_decay", 0),
        Hyperparameter("initial_accumulator_value", 0),
        Hyperparameter("eps", 1e-10),
        Hyperparameter("foreach", None),
        Hyperparameter("maximize", False, keyword_only=True),
        Hyperparameter("differentiable", False, keyword_only=True),
        Hyperparameter("fused", None, keyword_only=True),
    ),
    checks=(
        *lr_checks(),
        Check("lr_decay", lambda v: v >= 0.0, "Invalid lr_decay value: {value}"),
        Check("weight_decay", lambda v: v >= 0.0, "Invalid weight_decay value: {value}"),
        Check(
            "initial_accumulator_value",
            lambda v: v >= 0.0,
            "Invalid initial_accumulator_value value: {value}",
        ),
        Check("eps", lambda v: v >= 0.0, "Invalid epsilon value: {value}"),
        Check(
            ("fused", "differentiable"),
            lambda v: not (v[0] and v[1]),
            "`fused` does not support `differentiable`",
            RuntimeError,
        ),
    ),
    state=(State("sum", init=lambda group: group["initial_accumulator_value"]),),
    scalars=_scalars,
    update=_update,
    setstate_defaults={"foreach": None, "maximize": False, "differentiable": False, "fused": None},
    eager_state=True,
    group_order=(
        "lr",
        "lr_decay",
        "eps",
        "weight_decay",
        "initial_accumulator_value",
        "foreach",
        "maximize",
        "differentiable",
        "fused",
    ),
    sparse_message=None,  # sparse gradients update the rows they touch
    reference=adagrad,
    kernel=KernelSpec(update="adagrad", state_lists={"sum": "state_sums"}, options=lambda g: {}),
)


@register
class Adagrad(TorchoptOptimizer):
    r"""Adagrad (Duchi, Hazan & Singer, 2011, "Adaptive Subgradient Methods for Online Learning
    and Stochastic Optimization").

    .. math::
        g_t = \pm\nabla f(\theta_{t-1}) + \lambda\theta_{t-1}, \quad
        s_t = s_{t-1} + g_t^2 \;(s_0 = \text{initial\_accumulator\_value}), \quad
        \theta_t = \theta_{t-1} - \frac{\gamma}{1 + (t-1)\eta}\,\frac{g_t}{\sqrt{s_t} + \epsilon}

    with :math:`\eta` = ``lr_decay``. Arguments, defaults, errors, param groups and state
    (``step``, ``sum``, created in the constructor as torch does) are torch.optim.Adagrad's. Sparse
    gradients update only the rows they touch. The reference path multiplies the step size into
    ``addcdiv`` instead of scaling the gradient first (one pass fewer; equal to rounding).
    ``fused``, ``capturable`` and ``differentiable`` behave as torch's (docs/optimizers.md).
    """

    rule = ADAGRAD

    def share_memory(self) -> None:
        """Move the ``sum`` state tensors to shared memory (for Hogwild-style training)."""
        for group in self.param_groups:
            for p in group["params"]:
                self.state[p]["sum"].share_memory_()
