"""Adagrad."""

from __future__ import annotations

from collections.abc import Mapping
from operator import attrgetter
from typing import Any, ClassVar

import torch
from torch import Tensor

from torchopt_lab.optim._base import (
    TensorLists,
    TorchoptOptimizer,
    as_float,
    foreach_addcdiv_,
    increment_steps,
    new_step,
    per_step,
    read_steps,
)

__all__ = ["Adagrad", "adagrad"]


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
    increment_steps(state_steps)
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

    _reference = staticmethod(adagrad)
    _group_defaults: ClassVar[dict[str, Any]] = {
        "foreach": None,
        "maximize": False,
        "differentiable": False,
        "fused": None,
    }

    def __init__(
        self,
        params: Any,
        lr: float | Tensor = 1e-2,
        lr_decay: float = 0,
        weight_decay: float = 0,
        initial_accumulator_value: float = 0,
        eps: float = 1e-10,
        foreach: bool | None = None,
        *,
        maximize: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
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
        if not lr_decay >= 0.0:
            raise ValueError(f"Invalid lr_decay value: {lr_decay}")
        if not weight_decay >= 0.0:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        if not initial_accumulator_value >= 0.0:
            raise ValueError(
                f"Invalid initial_accumulator_value value: {initial_accumulator_value}"
            )
        if not eps >= 0.0:
            raise ValueError(f"Invalid epsilon value: {eps}")
        defaults = {
            "lr": lr,
            "lr_decay": lr_decay,
            "eps": eps,
            "weight_decay": weight_decay,
            "initial_accumulator_value": initial_accumulator_value,
            "foreach": foreach,
            "maximize": maximize,
            "differentiable": differentiable,
            "fused": fused,
        }
        if fused and differentiable:
            raise RuntimeError("`fused` does not support `differentiable`")
        super().__init__(
            params,
            defaults,
            backend=backend,
            max_grad_norm=max_grad_norm,
            skip_nonfinite=skip_nonfinite,
            float32_state=float32_state,
            record_norms=record_norms,
        )
        for group in self.param_groups:
            for p in group["params"]:
                self._init_state(p)

    def _init_state(self, p: Tensor) -> dict[str, Tensor]:
        state = self.state[p]
        if len(state) == 0:
            value = self.defaults["initial_accumulator_value"]
            state["step"] = new_step()
            state["sum"] = torch.full_like(
                p,
                complex(value, value) if torch.is_complex(p) else value,
                memory_format=torch.preserve_format,
            )
        return state

    def _group_tensors(self, group: dict[str, Any]) -> TensorLists:
        tensors: TensorLists = {"params": [], "grads": [], "state_sums": [], "state_steps": []}
        for p in group["params"]:
            if p.grad is None:
                continue
            # Params added later with add_param_group get their state here.
            state = self._init_state(p)
            tensors["params"].append(p)
            tensors["grads"].append(p.grad)
            tensors["state_sums"].append(state["sum"])
            tensors["state_steps"].append(state["step"])
        return tensors

    def _hyperparameters(self, group: dict[str, Any]) -> dict[str, Any]:
        return {
            "lr": group["lr"],
            "weight_decay": group["weight_decay"],
            "lr_decay": group["lr_decay"],
            "eps": group["eps"],
            "maximize": group["maximize"],
        }

    def share_memory(self) -> None:
        """Move the ``sum`` state tensors to shared memory (for Hogwild-style training)."""
        for group in self.param_groups:
            for p in group["params"]:
                self.state[p]["sum"].share_memory_()
