"""Stochastic gradient descent, with optional heavy-ball or Nesterov momentum."""

from __future__ import annotations

from collections.abc import Mapping
from operator import attrgetter
from typing import Any, ClassVar

import torch
from torch import Tensor

from torchopt_lab.optim._base import TensorLists, TorchoptOptimizer, as_float, foreach_add_

__all__ = ["SGD", "Momentum", "sgd"]


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

    _reference = staticmethod(sgd)
    _group_defaults: ClassVar[dict[str, Any]] = {
        "nesterov": False,
        "maximize": False,
        "foreach": None,
        "differentiable": False,
        "fused": False,
    }
    _views_complex_as_real = False
    _creates_state = True

    def __init__(
        self,
        params: Any,
        lr: float | Tensor = 1e-3,
        momentum: float = 0,
        dampening: float = 0,
        weight_decay: float | Tensor = 0,
        nesterov: bool = False,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
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
        if lr < 0.0:
            raise ValueError(f"Invalid learning rate: {lr}")
        if momentum < 0.0:
            raise ValueError(f"Invalid momentum value: {momentum}")
        if weight_decay < 0.0:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        defaults = {
            "lr": lr,
            "momentum": momentum,
            "dampening": dampening,
            "weight_decay": weight_decay,
            "nesterov": nesterov,
            "maximize": maximize,
            "foreach": foreach,
            "differentiable": differentiable,
            "fused": fused,
        }
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("Nesterov momentum requires a momentum and zero dampening")
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

    def _group_tensors(self, group: dict[str, Any]) -> TensorLists:
        params, grads, buffers = [], [], []
        for p in group["params"]:
            if p.grad is None:
                continue
            params.append(p)
            grads.append(p.grad)
            if group["momentum"] != 0:
                buffers.append(self.state[p].get("momentum_buffer"))
        return {"params": params, "grads": grads, "momentum_buffer_list": buffers}

    def _hyperparameters(self, group: dict[str, Any]) -> dict[str, Any]:
        return {
            "weight_decay": group["weight_decay"],
            "momentum": group["momentum"],
            "lr": group["lr"],
            "dampening": group["dampening"],
            "nesterov": group["nesterov"],
            "maximize": group["maximize"],
        }

    def _finish_group(self, group: dict[str, Any], tensors: TensorLists) -> None:
        if group["momentum"] != 0:
            for p, buffer in zip(tensors["params"], tensors["momentum_buffer_list"], strict=True):
                self.state[p]["momentum_buffer"] = buffer


class Momentum(SGD):
    r"""SGD with heavy-ball momentum (Polyak, 1964, "Some methods of speeding up the convergence
    of iteration methods"): :class:`SGD` with ``lr=0.01, momentum=0.9`` as defaults.

    .. math::
        b_t = \mu b_{t-1} + (1-\tau) d_t \;(b_1 = d_1), \quad \theta_t = \theta_{t-1} - \gamma b_t

    Momentum is its point, so ``momentum`` must be positive (use :class:`SGD` for plain gradient
    descent). Its param groups and state are SGD's, so state dicts interchange with
    ``torch.optim.SGD``.
    """

    def __init__(
        self,
        params: Any,
        lr: float | Tensor = 0.01,
        momentum: float = 0.9,
        dampening: float = 0,
        weight_decay: float | Tensor = 0,
        nesterov: bool = False,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        differentiable: bool = False,
        fused: bool | None = None,
        backend: str = "auto",
        max_grad_norm: float | None = None,
        skip_nonfinite: bool = False,
        float32_state: bool = False,
        record_norms: bool = False,
    ) -> None:
        if not momentum > 0.0:
            raise ValueError(
                f"Invalid momentum value: {momentum}; Momentum needs momentum > 0 "
                "(use SGD for plain gradient descent)"
            )
        super().__init__(
            params,
            lr,
            momentum,
            dampening,
            weight_decay,
            nesterov,
            maximize=maximize,
            foreach=foreach,
            differentiable=differentiable,
            fused=fused,
            backend=backend,
            max_grad_norm=max_grad_norm,
            skip_nonfinite=skip_nonfinite,
            float32_state=float32_state,
            record_norms=record_norms,
        )
