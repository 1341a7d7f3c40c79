"""NAdam, declared with the public authoring API (:mod:`torchopt_lab.optim.rules`)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor

from torchopt_lab.optim._moments import decayed_moments, moment_scalars, triton_decayed_moments
from torchopt_lab.optim.rules import (
    TORCH_FLAGS,
    Check,
    Hyperparameter,
    Rule,
    RuleOptimizer,
    State,
    adam_checks,
    register,
    scalar_value,
    tl,
    triton_jit,
)


def _scalars(group: Mapping[str, Any], step: float, state: dict[str, Tensor]) -> dict[str, Any]:
    beta1, beta2 = group["betas"]
    lr, momentum_decay = group["lr"], group["momentum_decay"]
    # Momentum schedule mu_t = beta1 (1 - 0.96^(t psi) / 2), and its running product.
    mu = beta1 * (1.0 - 0.5 * (0.96 ** (step * momentum_decay)))
    mu_next = beta1 * (1.0 - 0.5 * (0.96 ** ((step + 1) * momentum_decay)))
    # Multiplied in the state's dtype, as torch.optim does with a Python number: under
    # torch.compile mu is a float64 tensor, which would multiply in float64 and round otherwise.
    state["mu_product"] *= mu.to(state["mu_product"].dtype) if isinstance(mu, Tensor) else mu
    mu_product = scalar_value(state["mu_product"])
    return {
        **moment_scalars(group),
        "bias_correction2": 1 - beta2**step,
        "grad_coefficient": -lr * (1.0 - mu) / (1.0 - mu_product),
        "exp_avg_coefficient": (-lr * mu_next) / (1.0 - mu_product * mu_next),
    }


def _update(
    param: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    *,
    eps: float,
    bias_correction2: float,
    grad_coefficient: Any,
    exp_avg_coefficient: Any,
    **moments: Any,
) -> tuple[Tensor, Tensor, Tensor]:
    # moments: lr, beta1, beta2, weight_decay, decoupled_weight_decay (moment_scalars).
    param, grad, exp_avg, exp_avg_sq = decayed_moments(param, grad, exp_avg, exp_avg_sq, **moments)
    denom = (exp_avg_sq / bias_correction2).sqrt() + eps
    # theta -= lr (1 - mu_t) / (1 - prod mu) g / denom + lr mu_{t+1} / (1 - prod mu') m / denom.
    param = param + grad_coefficient * grad / denom
    param = param + exp_avg_coefficient * exp_avg / denom
    return param, exp_avg, exp_avg_sq


@triton_jit
def _triton_update(param, grad, states, scalars):
    """``_update`` for the fused rule kernel, line for line."""
    exp_avg, exp_avg_sq = states
    lr, beta1, beta2, eps, weight_decay, decoupled_weight_decay = scalars[:6]
    bias_correction2, grad_coefficient, exp_avg_coefficient = scalars[6:]
    param, grad, exp_avg, exp_avg_sq = triton_decayed_moments(
        param, grad, exp_avg, exp_avg_sq, lr, beta1, beta2, weight_decay, decoupled_weight_decay
    )
    denom = tl.sqrt(exp_avg_sq / bias_correction2) + eps
    param = param + grad_coefficient * grad / denom
    param = param + exp_avg_coefficient * exp_avg / denom
    return param, (exp_avg, exp_avg_sq)


@register
class NAdam(RuleOptimizer):
    r"""NAdam (Dozat, 2016, "Incorporating Nesterov Momentum into Adam"), as ``torch.optim.NAdam``.

    .. math::
        \mu_t = \beta_1 (1 - \tfrac12 0.96^{t\psi}),\quad
        m_t = \beta_1 m_{t-1} + (1-\beta_1) g_t,\quad
        v_t = \beta_2 v_{t-1} + (1-\beta_2) g_t^2 \\
        d_t = \sqrt{v_t/(1-\beta_2^t)}+\epsilon,\quad
        \theta_t = \theta_{t-1}
          - \gamma \frac{1-\mu_t}{1-\prod_{i\le t}\mu_i} \frac{g_t}{d_t}
          - \gamma \frac{\mu_{t+1}}{1-\prod_{i\le t+1}\mu_i} \frac{m_t}{d_t}

    with :math:`\psi` = ``momentum_decay``; ``weight_decay`` adds :math:`\lambda\theta` to the
    gradient, or with ``decoupled_weight_decay=True`` multiplies :math:`\theta` by
    :math:`1-\gamma\lambda` first (NAdamW). Same arguments, defaults, errors and state dict
    (``step``, ``mu_product``, ``exp_avg``, ``exp_avg_sq``) as torch.
    """

    rule = Rule(
        hyperparameters=(
            Hyperparameter("lr", 2e-3),
            Hyperparameter("betas", (0.9, 0.999)),
            Hyperparameter("eps", 1e-8),
            Hyperparameter("weight_decay", 0),
            Hyperparameter("momentum_decay", 4e-3),
            Hyperparameter("decoupled_weight_decay", False),
            *TORCH_FLAGS,
        ),
        checks=(
            *adam_checks(),
            Check("momentum_decay", lambda md: md >= 0.0, "Invalid momentum_decay value: {value}"),
        ),
        state=(State("mu_product", init=1.0, scalar=True), State("exp_avg"), State("exp_avg_sq")),
        scalars=_scalars,
        update=_update,
        triton_update=_triton_update,
        # torch's param-group order (its repr and state_dict), not its signature's.
        group_order=(
            "lr",
            "betas",
            "eps",
            "weight_decay",
            "momentum_decay",
            "decoupled_weight_decay",
            "maximize",
            "foreach",
            "capturable",
            "differentiable",
        ),
    )
