"""RMSprop."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import Tensor

from torchopt_lab.optim._base import (
    TensorLists,
    TorchoptOptimizer,
    as_float,
    foreach_add_,
    foreach_addcdiv_,
    increment_steps,
    new_step,
)

__all__ = ["RMSprop", "rmsprop"]


def rmsprop(
    params: list[Tensor],
    grads: list[Tensor],
    square_avgs: list[Tensor],
    grad_avgs: list[Tensor],
    momentum_buffer_list: list[Tensor],
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
    :class:`RMSprop`). ``grad_avgs`` is empty unless ``centered``, ``momentum_buffer_list`` unless
    ``momentum > 0``."""
    lr = as_float(lr)
    increment_steps(state_steps)
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
    ``fused``, ``capturable`` and ``differentiable`` behave as torch's (docs/optimizers.md).
    """

    _reference = staticmethod(rmsprop)
    _group_defaults: ClassVar[dict[str, Any]] = {
        "momentum": 0,
        "centered": False,
        "foreach": None,
        "maximize": False,
        "differentiable": False,
        "capturable": False,
    }

    def __init__(
        self,
        params: Any,
        lr: float | Tensor = 1e-2,
        alpha: float = 0.99,
        eps: float = 1e-8,
        weight_decay: float = 0,
        momentum: float = 0,
        centered: bool = False,
        capturable: bool = False,
        foreach: bool | None = None,
        maximize: bool = False,
        differentiable: bool = False,
        *,
        backend: str = "auto",
        max_grad_norm: float | None = None,
        skip_nonfinite: bool = False,
        float32_state: bool = False,
        record_norms: bool = False,
    ) -> None:
        if isinstance(lr, Tensor) and lr.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
        if not lr >= 0.0:
            raise ValueError(f"Invalid learning rate: {lr}")
        if not eps >= 0.0:
            raise ValueError(f"Invalid epsilon value: {eps}")
        if not momentum >= 0.0:
            raise ValueError(f"Invalid momentum value: {momentum}")
        if not weight_decay >= 0.0:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        if not alpha >= 0.0:
            raise ValueError(f"Invalid alpha value: {alpha}")
        defaults = {
            "lr": lr,
            "momentum": momentum,
            "alpha": alpha,
            "eps": eps,
            "centered": centered,
            "weight_decay": weight_decay,
            "capturable": capturable,
            "foreach": foreach,
            "maximize": maximize,
            "differentiable": differentiable,
        }
        super().__init__(
            params,
            defaults,
            backend=backend,
            max_grad_norm=max_grad_norm,
            skip_nonfinite=skip_nonfinite,
            float32_state=float32_state,
            record_norms=record_norms,
        )

    def _group_tensors(self, group: dict[str, Any]) -> TensorLists:
        tensors: TensorLists = {
            "params": [],
            "grads": [],
            "square_avgs": [],
            "grad_avgs": [],
            "momentum_buffer_list": [],
            "state_steps": [],
        }
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError("RMSprop does not support sparse gradients")
            state = self.state[p]
            if len(state) == 0:
                state["step"] = new_step()
                state["square_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                if group["momentum"] > 0:
                    state["momentum_buffer"] = torch.zeros_like(
                        p, memory_format=torch.preserve_format
                    )
                if group["centered"]:
                    state["grad_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            tensors["params"].append(p)
            tensors["grads"].append(p.grad)
            tensors["square_avgs"].append(state["square_avg"])
            if group["momentum"] > 0:
                tensors["momentum_buffer_list"].append(state["momentum_buffer"])
            if group["centered"]:
                tensors["grad_avgs"].append(state["grad_avg"])
            tensors["state_steps"].append(state["step"])
        return tensors

    def _hyperparameters(self, group: dict[str, Any]) -> dict[str, Any]:
        return {
            "lr": group["lr"],
            "alpha": group["alpha"],
            "eps": group["eps"],
            "weight_decay": group["weight_decay"],
            "momentum": group["momentum"],
            "centered": group["centered"],
            "maximize": group["maximize"],
        }
