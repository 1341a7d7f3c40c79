"""Lion, declared with the public authoring API (:mod:`torchopt_lab.optim.rules`)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor

from torchopt_lab.optim.rules import (
    TORCH_FLAGS,
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
    beta1, beta2 = group["betas"]
    return {
        "lr": group["lr"],
        "beta1": beta1,
        "beta2": beta2,
        "weight_decay": group["weight_decay"],
    }


def _update(
    param: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    *,
    lr: Any,
    beta1: float,
    beta2: float,
    weight_decay: float,
) -> tuple[Tensor, Tensor]:
    # c_t = beta1 m + (1 - beta1) g: the interpolation whose sign is the update.
    direction = exp_avg + (1 - beta1) * (grad - exp_avg)
    # theta -= lr (sign(c_t) + lambda theta).
    param = param - lr * (direction.sign() + weight_decay * param)
    # m_t = beta2 m + (1 - beta2) g.
    exp_avg = exp_avg + (1 - beta2) * (grad - exp_avg)
    return param, exp_avg


@triton_jit
def _triton_update(param, grad, states, scalars):
    """``_update`` for the fused rule kernel, line for line."""
    (exp_avg,) = states
    lr, beta1, beta2, weight_decay = scalars
    direction = exp_avg + (1 - beta1) * (grad - exp_avg)
    # sign(c), 0 at 0 as torch.sign.
    sign = tl.where(direction > 0, 1.0, tl.where(direction < 0, -1.0, 0.0)).to(param.dtype)
    param = param - lr * (sign + weight_decay * param)
    exp_avg = exp_avg + (1 - beta2) * (grad - exp_avg)
    return param, (exp_avg,)


@register
class Lion(RuleOptimizer):
    r"""Lion, EvoLved Sign Momentum (Chen et al., 2023, "Symbolic Discovery of Optimization
    Algorithms", Algorithm 2).

    .. math::
        c_t = \beta_1 m_{t-1} + (1-\beta_1) g_t,\quad
        \theta_t = \theta_{t-1} - \gamma (\operatorname{sign}(c_t) + \lambda \theta_{t-1}),\quad
        m_t = \beta_2 m_{t-1} + (1-\beta_2) g_t

    Defaults are the paper's (``betas=(0.9, 0.99)``); its update has the same norm in every
    coordinate, so take ``lr`` 3-10x smaller than AdamW's and ``weight_decay`` 3-10x larger.
    torch.optim has no Lion; arguments, validation messages and flags follow torch's AdamW, and the
    state dict holds ``step`` and ``exp_avg``. Complex parameters are updated as real views (the
    sign of each real and imaginary part).
    """

    rule = Rule(
        hyperparameters=(
            Hyperparameter("lr", 1e-4),
            Hyperparameter("betas", (0.9, 0.99)),
            Hyperparameter("weight_decay", 0.0),
            *TORCH_FLAGS,
        ),
        checks=(
            *lr_checks(),
            Check(
                "betas",
                lambda b: 0.0 <= b[0] < 1.0,
                "Invalid beta parameter at index 0: {value[0]}",
            ),
            Check(
                "betas",
                lambda b: 0.0 <= b[1] < 1.0,
                "Invalid beta parameter at index 1: {value[1]}",
            ),
            Check("weight_decay", lambda wd: wd >= 0.0, "Invalid weight_decay value: {value}"),
        ),
        state=(State("exp_avg"),),
        scalars=_scalars,
        update=_update,
        triton_update=_triton_update,
    )
