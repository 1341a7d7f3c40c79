"""Adam and AdamW, each one :class:`~torchopt_lab.optim.rules.Rule` declaration run on the
built-in engine (its ``reference``: :func:`adam`; its ``kernel``: the fused Triton ``adam``
update)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
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
from torchopt_lab.optim.rules import (
    TORCH_FLAGS,
    Check,
    Hyperparameter,
    Rule,
    State,
    adam_checks,
    register,
)

__all__ = ["ADAM", "ADAMW", "Adam", "AdamW", "adam"]


def adam(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    max_exp_avg_sqs: list[Tensor],
    state_steps: list[Tensor],
    *,
    amsgrad: bool,
    beta1: float | Tensor,
    beta2: float | Tensor,
    lr: float | Tensor,
    weight_decay: float,
    eps: float,
    maximize: bool,
    decoupled_weight_decay: bool,
) -> None:
    """Adam's torch reference update over real tensors of one device and dtype (see :class:`Adam`).

    ``state_steps`` are incremented here; ``max_exp_avg_sqs`` is empty unless ``amsgrad``.
    """
    lr, beta1, beta2 = as_float(lr), as_float(beta1), as_float(beta2)
    increment(state_steps)
    steps = read_steps(state_steps)
    if maximize:
        grads = torch._foreach_neg(grads)
    if weight_decay != 0:
        if decoupled_weight_decay:
            # AdamW: theta <- theta * (1 - lr * lambda).
            torch._foreach_mul_(params, 1 - lr * weight_decay)
        else:
            # Adam's L2 penalty: g <- g + lambda * theta.
            grads = torch._foreach_add(grads, params, alpha=weight_decay)
    # First moment: m <- beta1 * m + (1 - beta1) * g.
    torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
    # Second moment: v <- beta2 * v + (1 - beta2) * g^2.
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1 - beta2)
    if amsgrad:
        # AMSGrad normalizes by the running maximum of v.
        torch._foreach_maximum_(max_exp_avg_sqs, exp_avg_sqs)

    def bias_corrected(t: Any) -> tuple[Any, Any]:
        # Bias corrections folded into two scalars per step count (one pass fewer than dividing
        # sqrt(v) by c2): theta <- theta - (lr * c2 / c1) * m / (sqrt(v) + eps * c2),
        # c1 = 1 - beta1^t, c2 = sqrt(1 - beta2^t).
        c1, c2 = 1 - beta1**t, (1 - beta2**t) ** 0.5
        return eps * c2, -lr * c2 / c1

    scalars = per_step(steps, bias_corrected)
    denominators = torch._foreach_sqrt(max_exp_avg_sqs if amsgrad else exp_avg_sqs)
    torch._foreach_add_(denominators, [eps_c2 for eps_c2, _ in scalars])
    foreach_addcdiv_(params, exp_avgs, denominators, [step_size for _, step_size in scalars])


def _scalars(group: Mapping[str, Any], step: float, state: dict[str, Tensor]) -> dict[str, Any]:
    """Adam's per-step scalars, as :func:`adam` computes them (float64): the bias corrections
    c1 = 1 - beta1^t and c2 = sqrt(1 - beta2^t) folded into the step size and epsilon."""
    beta1, beta2 = group["betas"]
    lr = group["lr"]
    bias_correction2 = (1 - beta2**step) ** 0.5
    return {
        "lr": lr,
        "weight_decay": group["weight_decay"],
        "decoupled_weight_decay": group["decoupled_weight_decay"],
        "beta1": beta1,
        "beta2": beta2,
        "eps": group["eps"] * bias_correction2,
        "step_size": -lr * bias_correction2 / (1 - beta1**step),
    }


def _update(
    param: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    max_exp_avg_sq: Tensor | None,
    *,
    lr: Any,
    weight_decay: Any,
    decoupled_weight_decay: bool,
    beta1: Any,
    beta2: Any,
    eps: Any,
    step_size: Any,
) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """Adam's update of one parameter, out of place, in :func:`adam`'s order of operations
    (``max_exp_avg_sq`` is None without amsgrad)."""
    if weight_decay != 0:
        if decoupled_weight_decay:
            param = param * (1 - lr * weight_decay)
        else:
            grad = grad + weight_decay * param
    exp_avg = torch.lerp(exp_avg, grad, 1 - beta1)
    exp_avg_sq = exp_avg_sq * beta2 + (1 - beta2) * grad * grad
    second = exp_avg_sq
    if max_exp_avg_sq is not None:
        max_exp_avg_sq = torch.maximum(max_exp_avg_sq, exp_avg_sq)
        second = max_exp_avg_sq
    param = param + step_size * exp_avg / (second.sqrt() + eps)
    return param, exp_avg, exp_avg_sq, max_exp_avg_sq


def _squeezed(betas: Any) -> tuple[Any, Any]:
    """torch stores tensor betas squeezed to 0-dim (and betas as a tuple)."""
    return tuple(beta.squeeze() if isinstance(beta, Tensor) else beta for beta in betas)


def _beta_checks(index: int) -> tuple[Check, ...]:
    return (
        Check(
            ("betas", "foreach", "capturable"),
            lambda v: not (isinstance(v[0][index], Tensor) and v[1] and not v[2]),
            f"betas[{index}] as a Tensor is not supported for capturable=False and foreach=True",
        ),
        Check(
            "betas",
            lambda b: not isinstance(b[index], Tensor) or b[index].numel() == 1,
            f"Tensor betas[{index}] must be 1-element",
        ),
    )


def _beta(index: int) -> Any:
    return lambda group: group["betas"][index]


#: Adam's declaration: torch.optim.Adam's arguments, checks (order, types, messages), state and
#: param groups; the per-tensor update (what fused=True compiles on the CPU) beside the
#: group-level reference and the fused kernel, bound by tests/optim/test_adam_rule.py.
ADAM = Rule(
    hyperparameters=(
        Hyperparameter("lr", 1e-3),
        Hyperparameter("betas", (0.9, 0.999), convert=_squeezed),
        Hyperparameter("eps", 1e-8),
        Hyperparameter("weight_decay", 0),
        Hyperparameter("amsgrad", False),
        *TORCH_FLAGS,
        Hyperparameter("fused", None, keyword_only=True),
        Hyperparameter("decoupled_weight_decay", False, keyword_only=True),
    ),
    checks=(
        Check(
            ("lr", "foreach", "capturable"),
            lambda v: not (isinstance(v[0], Tensor) and v[1] and not v[2]),
            "lr as a Tensor is not supported for capturable=False and foreach=True",
        ),
        *adam_checks(),
        Check(
            "betas",
            lambda b: (
                (isinstance(b[0], float) and isinstance(b[1], float))
                or (isinstance(b[0], Tensor) and isinstance(b[1], Tensor))
            ),
            "betas must be either both floats or both Tensors",
        ),
        *_beta_checks(0),
        *_beta_checks(1),
        Check(
            ("fused", "differentiable"),
            lambda v: not (v[0] and v[1]),
            "`fused` does not support `differentiable`",
            RuntimeError,
        ),
    ),
    state=(
        State("exp_avg"),
        State("exp_avg_sq"),
        State("max_exp_avg_sq", when=lambda group: group["amsgrad"]),
    ),
    scalars=_scalars,
    update=_update,
    setstate_defaults={
        "amsgrad": False,
        "maximize": False,
        "foreach": None,
        "capturable": False,
        "differentiable": False,
        "decoupled_weight_decay": False,
        "fused": None,
    },
    group_order=(
        "lr",
        "betas",
        "eps",
        "weight_decay",
        "amsgrad",
        "maximize",
        "foreach",
        "capturable",
        "differentiable",
        "fused",
        "decoupled_weight_decay",
    ),
    sparse_message="Adam does not support sparse gradients, please consider SparseAdam instead",
    reference=adam,
    kernel=KernelSpec(
        update="adam",
        state_lists={
            "exp_avg": "exp_avgs",
            "exp_avg_sq": "exp_avg_sqs",
            "max_exp_avg_sq": "max_exp_avg_sqs",
        },
        options=lambda g: {
            "amsgrad": g["amsgrad"],
            "decoupled_weight_decay": g["decoupled_weight_decay"],
        },
        readers={"beta1": _beta(0), "beta2": _beta(1)},
    ),
)

#: AdamW's: Adam's rule with weight_decay=1e-2 and decoupled_weight_decay=True fixed (not an
#: argument; forced on load), in torch.optim.AdamW's signature order.
ADAMW = dataclasses.replace(
    ADAM,
    hyperparameters=(
        *(
            Hyperparameter("weight_decay", 1e-2) if h.name == "weight_decay" else h
            for h in ADAM.hyperparameters[:5]
        ),
        Hyperparameter("maximize", False, keyword_only=True),
        Hyperparameter("foreach", None, keyword_only=True),
        Hyperparameter("capturable", False, keyword_only=True),
        Hyperparameter("differentiable", False, keyword_only=True),
        Hyperparameter("fused", None, keyword_only=True),
    ),
    fixed={"decoupled_weight_decay": True},
)


@register
class Adam(TorchoptOptimizer):
    r"""Adam (Kingma & Ba, 2015, "Adam: A Method for Stochastic Optimization"), with the AMSGrad
    variant (Reddi et al., 2018, "On the Convergence of Adam and Beyond").

    .. math::
        g_t &= \pm\nabla f(\theta_{t-1}) + \lambda\theta_{t-1} \\
        m_t &= \beta_1 m_{t-1} + (1-\beta_1) g_t, \qquad
        v_t = \beta_2 v_{t-1} + (1-\beta_2) g_t^2 \\
        \hat v_t &= \max(\hat v_{t-1}, v_t) \text{ (amsgrad)}, \text{ else } v_t \\
        \theta_t &= \theta_{t-1} - \gamma \frac{m_t / (1-\beta_1^t)}
            {\sqrt{\hat v_t / (1-\beta_2^t)} + \epsilon}

    With ``decoupled_weight_decay=True`` (what :class:`AdamW` is) the decay leaves the gradient
    and shrinks the weights instead: :math:`\theta \leftarrow \theta(1-\gamma\lambda)`.
    Arguments, defaults, errors, param groups and state (``step``, ``exp_avg``, ``exp_avg_sq``,
    ``max_exp_avg_sq``) are torch.optim.Adam's. The reference path folds :math:`\sqrt{1-\beta_2^t}`
    into the step size and epsilon (same value, one pass over memory fewer), so results agree with
    torch to rounding. ``fused``, ``capturable`` and ``differentiable`` behave as torch's
    (docs/optimizers.md).
    """

    rule = ADAM


@register
class AdamW(Adam):
    r""":class:`Adam` with decoupled weight decay (Loshchilov & Hutter, 2019, "Decoupled Weight
    Decay Regularization"): :math:`\theta \leftarrow \theta(1-\gamma\lambda)` before the Adam
    update, instead of adding :math:`\lambda\theta` to the gradient. Default ``weight_decay=1e-2``.

    Arguments, defaults, errors, param groups and state are torch.optim.AdamW's (its param groups
    carry ``decoupled_weight_decay=True``, forced on load as torch does).
    """

    rule = ADAMW
