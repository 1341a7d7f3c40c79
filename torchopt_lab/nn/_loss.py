"""Losses with hand-written backward passes: mean squared error and cross-entropy.

Notation: ``x`` the input (prediction or logits), ``t`` the target, ``g = dL/d(loss)`` the incoming
gradient, ``ℓ_i`` the per-element (or per-sample) loss before the reduction. The reduction maps
``ℓ`` to ``ℓ`` (``"none"``), ``Σ ℓ`` (``"sum"``) or ``Σ ℓ / D`` (``"mean"``, ``D`` stated per loss);
its backward sends ``g``, ``g`` or ``g / D`` to every ``ℓ_i``.
"""

from __future__ import annotations

from typing import Any

import torch

from torchopt_lab.nn._softmax import LogSoftmaxFunction


def _reduce(loss: torch.Tensor, reduction: str, denominator: torch.Tensor | float) -> torch.Tensor:
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    return loss.sum() / denominator


def _per_element(
    grad_output: torch.Tensor, reduction: str, denominator: torch.Tensor | float
) -> torch.Tensor:
    """dL/dℓ_i for every i: the backward of :func:`_reduce` (broadcastable against ℓ)."""
    if reduction == "mean":
        return grad_output / denominator
    return grad_output


class MSELossFunction(torch.autograd.Function):
    r"""``ℓ = w (x - t)²`` (``w = 1`` without weight), ``x`` and ``t`` broadcast together.
    ``"mean"`` divides by the number of elements, or by ``Σ w`` when weighted (as torch does).

    With ``d = x - t`` and ``γ = dL/dℓ``: ``dL/dx = 2 γ w d``, ``dL/dt = -2 γ w d``,
    ``dL/dw = γ d²`` (``"none"``/``"sum"``) or ``(d² - L) / Σ w`` (``"mean"``, ``L`` the loss).
    """

    @staticmethod
    def forward(
        ctx: Any,
        input: torch.Tensor,
        target: torch.Tensor,
        weight: torch.Tensor | None,
        reduction: str,
    ) -> torch.Tensor:
        difference = input - target
        squared = difference * difference
        if weight is not None:
            squared = squared * weight
        denominator = weight.sum() if weight is not None else float(squared.numel())
        loss = _reduce(squared, reduction, denominator)
        ctx.reduction, ctx.denominator = reduction, denominator
        ctx.save_for_backward(input, target, weight, loss)
        return loss

    @staticmethod
    def backward(
        ctx: Any, grad_output: torch.Tensor
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None, None]:
        input, target, weight, loss = ctx.saved_tensors
        # d = x - t
        difference = input - target
        # Σ w recomputed from w, so a second derivative sees its w-dependence
        denominator = ctx.denominator if weight is None else weight.sum()
        # γ = dL/dℓ
        gamma = _per_element(grad_output, ctx.reduction, denominator)
        # dL/dd = 2 γ w d
        grad_difference = 2 * gamma * difference
        if weight is not None:
            grad_difference = grad_difference * weight
        grad_input = grad_target = grad_weight = None
        if ctx.needs_input_grad[0]:
            # dL/dx = dL/dd, summed over the dimensions x was broadcast along
            grad_input = grad_difference.sum_to_size(input.shape).to(input.dtype)
        if ctx.needs_input_grad[1]:
            # dL/dt = -dL/dd, summed over the dimensions t was broadcast along
            grad_target = (-grad_difference).sum_to_size(target.shape).to(target.dtype)
        if weight is not None and ctx.needs_input_grad[2]:
            squared = difference * difference
            if ctx.reduction == "mean":
                # dL/dw = γ (d² - L), with L = Σ w d² / Σ w
                squared = squared - loss
            # dL/dw = γ d² (plus the mean's correction above)
            grad_weight = (gamma * squared).sum_to_size(weight.shape).to(weight.dtype)
        return grad_input, grad_target, grad_weight, None


def _class_view(tensor: torch.Tensor, ndim: int, class_dim: int) -> torch.Tensor:
    """A per-class vector shaped to broadcast along ``class_dim`` of an ``ndim``-D tensor."""
    shape = [1] * ndim
    shape[class_dim] = -1
    return tensor.reshape(shape)


class CrossEntropyFunction(torch.autograd.Function):
    r"""Cross-entropy of logits ``x`` (classes along ``class_dim``) against class indices.

    With ``log p = log_softmax(x)``, class weights ``w`` (ones if none), ``v_i = 1[t_i ≠
    ignore_index]``, smoothing ``ε`` and ``C`` classes:

    ``ℓ_i = v_i [(1 - ε) w_{t_i} (-log p_{i,t_i}) + (ε / C) Σ_c w_c (-log p_{i,c})]``,
    ``"mean"`` divides by ``D = Σ_i v_i w_{t_i}`` (torch's rule, also for the smoothing term).

    Writing ``q_{i,c} = v_i [(1 - ε) w_{t_i} 1[c = t_i] + (ε / C) w_c]``, ``ℓ_i = -Σ_c q_{i,c} log
    p_{i,c}``, so ``dℓ_i/dx_{i,c} = p_{i,c} s_i - q_{i,c}`` with ``s_i = Σ_c q_{i,c} =
    v_i [(1 - ε) w_{t_i} + (ε / C) Σ_c w_c]``. The class weights get no gradient (as in torch).
    """

    @staticmethod
    def forward(
        ctx: Any,
        input: torch.Tensor,
        target: torch.Tensor,
        weight: torch.Tensor | None,
        class_dim: int,
        ignore_index: int,
        reduction: str,
        label_smoothing: float,
    ) -> torch.Tensor:
        log_probs = torch.log_softmax(input, class_dim)
        ignored = target == ignore_index
        safe_target = target.masked_fill(ignored, 0).unsqueeze(class_dim)
        # v_i as a float of the input's dtype (a bool times a Python float would be float32)
        valid = (~ignored).to(log_probs.dtype)
        target_weight = valid
        if weight is not None:
            target_weight = target_weight * weight[safe_target.squeeze(class_dim)]
        loss = (
            -(1 - label_smoothing)
            * target_weight
            * log_probs.gather(class_dim, safe_target).squeeze(class_dim)
        )
        if label_smoothing > 0:
            class_sum = (
                log_probs.sum(class_dim)
                if weight is None
                else (log_probs * _class_view(weight, input.dim(), class_dim)).sum(class_dim)
            )
            loss = loss - (label_smoothing / input.shape[class_dim]) * valid * class_sum
        denominator = target_weight.sum()
        ctx.options = (class_dim, reduction, label_smoothing)
        ctx.save_for_backward(
            input, log_probs, valid, safe_target, target_weight, weight, denominator
        )
        return _reduce(loss, reduction, denominator)

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        input, log_probs, valid, safe_target, target_weight, weight, denominator = ctx.saved_tensors
        class_dim, reduction, label_smoothing = ctx.options
        if torch.is_grad_enabled():
            # log p recomputed by our own Function: a second derivative sees its x-dependence
            log_probs = LogSoftmaxFunction.apply(input, class_dim, None)
        # ε / C
        smoothing = label_smoothing / input.shape[class_dim]
        # γ_i = dL/dℓ_i, exactly 0 on an ignored row: "mean" over rows that are all ignored
        # divides by D = 0, and 0 · (g / 0) would make their gradient NaN where torch's is 0
        gamma = torch.where(valid != 0, _per_element(grad_output, reduction, denominator), 0)
        # Σ_c w_c
        weight_total = float(input.shape[class_dim]) if weight is None else weight.sum()
        # γ_i s_i, with s_i = (1 - ε) w_{t_i} v_i + (ε / C) Σ_c w_c v_i
        scaled = gamma * ((1 - label_smoothing) * target_weight + smoothing * weight_total * valid)
        # dL/dx_{i,c} = γ_i (p_{i,c} s_i - q_{i,c}): first the p s term
        grad_input = log_probs.exp() * scaled.unsqueeze(class_dim)
        if label_smoothing > 0:
            # w_c along the class dimension
            class_weight = 1.0 if weight is None else _class_view(weight, input.dim(), class_dim)
            # dL/dx_{i,c} -= γ_i v_i (ε / C) w_c
            grad_input = (
                grad_input - (gamma * valid).unsqueeze(class_dim) * smoothing * class_weight
            )
        # dL/dx_{i,t_i} -= γ_i (1 - ε) w_{t_i} v_i
        grad_input = grad_input.scatter_add(
            class_dim,
            safe_target,
            (-(1 - label_smoothing) * gamma * target_weight).unsqueeze(class_dim),
        )
        return grad_input, None, None, None, None, None, None


class CrossEntropyProbabilitiesFunction(torch.autograd.Function):
    r"""Cross-entropy of logits ``x`` against class probabilities ``t`` (same shape as ``x``).

    With ``log p = log_softmax(x)``, smoothed targets ``t' = (1 - ε) t + ε / C`` and class weights
    ``w`` (ones if none): ``ℓ_i = -Σ_c w_c t'_{i,c} log p_{i,c}``; ``"mean"`` divides by the number
    of samples ``D = numel(x) / C``.

    With ``q = w t'``: ``dℓ_i/dx_{i,c} = p_{i,c} Σ_c q_{i,c} - q_{i,c}``,
    ``dℓ_i/dt_{i,c} = -(1 - ε) w_c log p_{i,c}``, ``dL/dw_c = -Σ_i γ_i t'_{i,c} log p_{i,c}``.
    """

    @staticmethod
    def forward(
        ctx: Any,
        input: torch.Tensor,
        target: torch.Tensor,
        weight: torch.Tensor | None,
        class_dim: int,
        reduction: str,
        label_smoothing: float,
    ) -> torch.Tensor:
        log_probs = torch.log_softmax(input, class_dim)
        classes = input.shape[class_dim]
        smoothed = target * (1 - label_smoothing) + label_smoothing / classes
        q = smoothed if weight is None else smoothed * _class_view(weight, input.dim(), class_dim)
        loss = -(log_probs * q).sum(class_dim)
        denominator = input.numel() / classes if input.numel() else float("nan")
        ctx.options = (class_dim, reduction, label_smoothing, denominator)
        ctx.save_for_backward(input, target, weight, log_probs)
        return _reduce(loss, reduction, denominator)

    @staticmethod
    def backward(
        ctx: Any, grad_output: torch.Tensor
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None, None, None, None]:
        input, target, weight, log_probs = ctx.saved_tensors
        class_dim, reduction, label_smoothing, denominator = ctx.options
        if torch.is_grad_enabled():
            # log p recomputed by our own Function: a second derivative sees its x-dependence
            log_probs = LogSoftmaxFunction.apply(input, class_dim, None)
        # w_c along the class dimension
        class_weight = 1.0 if weight is None else _class_view(weight, input.dim(), class_dim)
        # t' = (1 - ε) t + ε / C
        smoothed = target * (1 - label_smoothing) + label_smoothing / input.shape[class_dim]
        # γ_i = dL/dℓ_i, broadcast along the classes
        gamma = _per_element(grad_output, reduction, denominator)
        gamma = gamma.unsqueeze(class_dim) if reduction == "none" else gamma
        grad_input = grad_target = grad_weight = None
        if ctx.needs_input_grad[0]:
            # q = w t'
            q = smoothed * class_weight
            # dL/dx_{i,c} = γ_i (p_{i,c} Σ_c q_{i,c} - q_{i,c})
            grad_input = gamma * (log_probs.exp() * q.sum(class_dim, keepdim=True) - q)
        if ctx.needs_input_grad[1]:
            # dL/dt_{i,c} = -γ_i (1 - ε) w_c log p_{i,c}
            grad_target = -gamma * (1 - label_smoothing) * class_weight * log_probs
        if weight is not None and ctx.needs_input_grad[2]:
            dims = [d for d in range(input.dim()) if d != class_dim]
            # dL/dw_c = -Σ_i γ_i t'_{i,c} log p_{i,c}
            grad_weight = (
                -(gamma * smoothed * log_probs).sum(dims)
                if dims
                else -(gamma * smoothed * log_probs)
            )
        return grad_input, grad_target, grad_weight, None, None, None
