"""Losses with hand-written backward passes: mean squared error and cross-entropy.

Notation: ``x`` the input (prediction or logits), ``t`` the target, ``g = dL/d(loss)`` the incoming
gradient, ``ℓ_i`` the per-element (or per-sample) loss before the reduction. The reduction maps
``ℓ`` to ``ℓ`` (``"none"``), ``Σ ℓ`` (``"sum"``) or ``Σ ℓ / D`` (``"mean"``, ``D`` stated per loss);
its backward sends ``g``, ``g`` or ``g / D`` to every ``ℓ_i``.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from torchopt_lab.nn._function import apply, forward_mode
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


@forward_mode
class MSELossFunction(torch.autograd.Function):
    r"""``ℓ = w (x - t)²`` (``w = 1`` without weight), ``x`` and ``t`` broadcast together.
    ``"mean"`` divides by the number of elements, or by ``Σ w`` when weighted (as torch does).

    With ``d = x - t`` and ``γ = dL/dℓ``: ``dL/dx = 2 γ w d``, ``dL/dt = -2 γ w d``,
    ``dL/dw = γ d²`` (``"none"``/``"sum"``) or ``(d² - L) / Σ w`` (``"mean"``, ``L`` the loss).
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(
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
        return _reduce(squared, reduction, denominator)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
        input, target, weight, reduction = inputs
        # the element count (the backward recomputes Σ w when weighted)
        ctx.reduction = reduction
        ctx.denominator = float(math.prod(torch.broadcast_shapes(input.shape, target.shape)))
        ctx.save_for_backward(input, target, weight, output)
        ctx.save_for_forward(input, target, weight, output)

    @staticmethod
    def jvp(
        ctx: Any,
        input_tangent: torch.Tensor | None,
        target_tangent: torch.Tensor | None,
        weight_tangent: torch.Tensor | None,
        _: None,
    ) -> torch.Tensor:
        input, target, weight, loss = ctx.saved_tensors
        # d = x - t
        difference = input - target
        # dℓ = 2 w d (dx - dt) + dw d²
        tangent = torch.zeros_like(difference)
        if input_tangent is not None:
            tangent = tangent + input_tangent
        if target_tangent is not None:
            tangent = tangent - target_tangent
        tangent = 2 * difference * tangent
        if weight is not None:
            tangent = tangent * weight
            if weight_tangent is not None:
                tangent = tangent + weight_tangent * difference * difference
        if weight is None or ctx.reduction != "mean":
            return _reduce(tangent, ctx.reduction, ctx.denominator)
        total = weight.sum()
        # L = Σ w d² / Σ w, so dL = (Σ dℓ - L Σ dw) / Σ w
        if weight_tangent is None:
            return tangent.sum() / total
        return (tangent.sum() - loss * weight_tangent.sum()) / total

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


def _target_terms(
    target: torch.Tensor,
    weight: torch.Tensor | None,
    class_dim: int,
    ignore_index: int,
    dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(v, t, v w_t)``: the valid-sample mask ``v_i = 1[t_i ≠ ignore_index]`` (in ``dtype``),
    the target with ignored entries set to class 0 (unsqueezed along ``class_dim``) and each
    sample's weight ``v_i w_{t_i}``."""
    ignored = target == ignore_index
    safe_target = target.masked_fill(ignored, 0).unsqueeze(class_dim)
    # v_i as a float of the input's dtype (a bool times a Python float would be float32)
    valid = (~ignored).to(dtype)
    target_weight = valid
    if weight is not None:
        target_weight = target_weight * weight[safe_target.squeeze(class_dim)]
    return valid, safe_target, target_weight


@forward_mode
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

    generate_vmap_rule = True

    @staticmethod
    def forward(
        input: torch.Tensor,
        target: torch.Tensor,
        weight: torch.Tensor | None,
        class_dim: int,
        ignore_index: int,
        reduction: str,
        label_smoothing: float,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        log_probs = torch.log_softmax(input, class_dim)
        valid, safe_target, target_weight = _target_terms(
            target, weight, class_dim, ignore_index, log_probs.dtype
        )
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
        return _reduce(loss, reduction, target_weight.sum()), log_probs

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], outputs: tuple[torch.Tensor, ...]) -> None:
        input, target, weight, class_dim, ignore_index, reduction, label_smoothing = inputs
        log_probs = outputs[1]
        ctx.mark_non_differentiable(log_probs)
        valid, safe_target, target_weight = _target_terms(
            target, weight, class_dim, ignore_index, log_probs.dtype
        )
        denominator = target_weight.sum()
        ctx.options = (class_dim, reduction, label_smoothing)
        saved = (input, log_probs, valid, safe_target, target_weight, weight, denominator)
        ctx.save_for_backward(*saved)
        ctx.save_for_forward(*saved)

    @staticmethod
    def jvp(ctx: Any, input_tangent: torch.Tensor, *_: None) -> tuple[torch.Tensor, None]:
        _, log_probs, valid, safe_target, target_weight, weight, denominator = ctx.saved_tensors
        class_dim, reduction, label_smoothing = ctx.options
        classes = log_probs.shape[class_dim]
        smoothing = label_smoothing / classes
        # Σ_c w_c
        weight_total = float(classes) if weight is None else weight.sum()
        # s_i = (1 - ε) w_{t_i} v_i + (ε / C) Σ_c w_c v_i
        scale = (1 - label_smoothing) * target_weight + smoothing * weight_total * valid
        # dℓ_i = Σ_c (p_{i,c} s_i - q_{i,c}) dx_{i,c}: first s_i Σ_c p_{i,c} dx_{i,c}
        tangent = scale * (log_probs.exp() * input_tangent).sum(class_dim)
        # - (1 - ε) w_{t_i} v_i dx_{i,t_i}
        picked = input_tangent.gather(class_dim, safe_target).squeeze(class_dim)
        tangent = tangent - (1 - label_smoothing) * target_weight * picked
        if label_smoothing > 0:
            class_weight = (
                1.0 if weight is None else _class_view(weight, log_probs.dim(), class_dim)
            )
            # - (ε / C) v_i Σ_c w_c dx_{i,c}
            tangent = tangent - smoothing * valid * (class_weight * input_tangent).sum(class_dim)
        return _reduce(tangent, reduction, denominator), None

    @staticmethod
    def backward(
        ctx: Any, grad_output: torch.Tensor, _: torch.Tensor | None
    ) -> tuple[torch.Tensor | None, ...]:
        input, log_probs, valid, safe_target, target_weight, weight, denominator = ctx.saved_tensors
        class_dim, reduction, label_smoothing = ctx.options
        if torch.is_grad_enabled():
            # log p recomputed by our own Function: a second derivative sees its x-dependence
            log_probs = apply(LogSoftmaxFunction, input, class_dim, None)
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


def _samples(input: torch.Tensor, class_dim: int) -> float:
    """The number of samples ``numel(x) / C`` ("mean"'s denominator with probability targets),
    NaN for an empty input."""
    return input.numel() / input.shape[class_dim] if input.numel() else float("nan")


@forward_mode
class CrossEntropyProbabilitiesFunction(torch.autograd.Function):
    r"""Cross-entropy of logits ``x`` against class probabilities ``t`` (same shape as ``x``).

    With ``log p = log_softmax(x)``, smoothed targets ``t' = (1 - ε) t + ε / C`` and class weights
    ``w`` (ones if none): ``ℓ_i = -Σ_c w_c t'_{i,c} log p_{i,c}``; ``"mean"`` divides by the number
    of samples ``D = numel(x) / C``.

    With ``q = w t'``: ``dℓ_i/dx_{i,c} = p_{i,c} Σ_c q_{i,c} - q_{i,c}``,
    ``dℓ_i/dt_{i,c} = -(1 - ε) w_c log p_{i,c}``, ``dL/dw_c = -Σ_i γ_i t'_{i,c} log p_{i,c}``.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(
        input: torch.Tensor,
        target: torch.Tensor,
        weight: torch.Tensor | None,
        class_dim: int,
        reduction: str,
        label_smoothing: float,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        log_probs = torch.log_softmax(input, class_dim)
        classes = input.shape[class_dim]
        smoothed = target * (1 - label_smoothing) + label_smoothing / classes
        q = smoothed if weight is None else smoothed * _class_view(weight, input.dim(), class_dim)
        loss = -(log_probs * q).sum(class_dim)
        return _reduce(loss, reduction, _samples(input, class_dim)), log_probs

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], outputs: tuple[torch.Tensor, ...]) -> None:
        input, target, weight, class_dim, reduction, label_smoothing = inputs
        ctx.mark_non_differentiable(outputs[1])
        ctx.options = (class_dim, reduction, label_smoothing, _samples(input, class_dim))
        ctx.save_for_backward(input, target, weight, outputs[1])
        ctx.save_for_forward(target, weight, outputs[1])

    @staticmethod
    def jvp(
        ctx: Any,
        input_tangent: torch.Tensor | None,
        target_tangent: torch.Tensor | None,
        weight_tangent: torch.Tensor | None,
        *_: None,
    ) -> tuple[torch.Tensor, None]:
        target, weight, log_probs = ctx.saved_tensors
        class_dim, reduction, label_smoothing, denominator = ctx.options
        # w_c along the class dimension
        class_weight = 1.0 if weight is None else _class_view(weight, log_probs.dim(), class_dim)
        # t' = (1 - ε) t + ε / C, q = w t'
        smoothed = target * (1 - label_smoothing) + label_smoothing / log_probs.shape[class_dim]
        q = smoothed * class_weight
        tangent = torch.zeros_like(log_probs)
        if input_tangent is not None:
            # dℓ_i/dx_{i,c} = p_{i,c} Σ_c q_{i,c} - q_{i,c}
            tangent = tangent + (log_probs.exp() * q.sum(class_dim, keepdim=True) - q) * (
                input_tangent
            )
        if target_tangent is not None:
            # dℓ_i/dt_{i,c} = -(1 - ε) w_c log p_{i,c}
            tangent = tangent - (1 - label_smoothing) * class_weight * log_probs * target_tangent
        if weight_tangent is not None:
            # dℓ_i/dw_c = -t'_{i,c} log p_{i,c}
            tangent = tangent - smoothed * log_probs * _class_view(
                weight_tangent, log_probs.dim(), class_dim
            )
        return _reduce(tangent.sum(class_dim), reduction, denominator), None

    @staticmethod
    def backward(
        ctx: Any, grad_output: torch.Tensor, _: torch.Tensor | None
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None, None, None, None]:
        input, target, weight, log_probs = ctx.saved_tensors
        class_dim, reduction, label_smoothing, denominator = ctx.options
        if torch.is_grad_enabled():
            # log p recomputed by our own Function: a second derivative sees its x-dependence
            log_probs = apply(LogSoftmaxFunction, input, class_dim, None)
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
