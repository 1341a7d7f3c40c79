"""Cross-entropy, ``torch.nn.functional.cross_entropy``, paired with
``triton_kernels/nn/cross_entropy.py``: the functional with its validation, the torch-path
Functions (class indices and class probabilities) with hand-written backward passes, the
Triton-path Functions on the LSE-only kernels (the ``torchopt_lab::cross_entropy_*`` custom
ops), and the module.

Notation: ``x`` the logits, ``t`` the target, ``g = dL/d(loss)`` the incoming gradient, ``ℓ_i``
the per-sample loss before the reduction (:func:`~torchopt_lab.nn._common.reduce`), which maps
``ℓ`` to ``ℓ`` (``"none"``), ``Σ ℓ`` (``"sum"``) or ``Σ ℓ / D`` (``"mean"``, ``D`` stated per
Function); its backward sends ``g``, ``g`` or ``g / D`` to every ``ℓ_i``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from torchopt_lab.nn._autocast import autocast_inputs
from torchopt_lab.nn._common import (
    check_dtype,
    check_floating,
    check_reduction,
    reduce,
    reduction_gradient,
)
from torchopt_lab.nn._dispatch import (
    first_order_only,
    no_forward_mode,
    register_vmap_by_slices,
    statistics_dtype,
    triton_kernels,
    use_triton,
)
from torchopt_lab.nn._function import apply, forward_mode
from torchopt_lab.nn._softmax import LogSoftmaxFunction


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
        return reduce(loss, reduction, target_weight.sum()), log_probs

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
        return reduce(tangent, reduction, denominator), None

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
        gamma = torch.where(valid != 0, reduction_gradient(grad_output, reduction, denominator), 0)
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
        return reduce(loss, reduction, _samples(input, class_dim)), log_probs

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
        return reduce(tangent.sum(class_dim), reduction, denominator), None

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
        gamma = reduction_gradient(grad_output, reduction, denominator)
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


# The Triton path: the LSE-only kernels as custom ops.


@torch.library.custom_op("torchopt_lab::cross_entropy_forward", mutates_args=())
def cross_entropy_forward(
    input: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None,
    ignore_index: int,
    label_smoothing: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ℓ, lse)`` per row on the Triton kernel, the targets checked by the caller."""
    return triton_kernels().cross_entropy_forward(
        input, target, weight, ignore_index, label_smoothing, check_target=False
    )


@cross_entropy_forward.register_fake
def _(
    input: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None,
    ignore_index: int,
    label_smoothing: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    rows = input.shape[0]
    dtype = statistics_dtype(input.dtype)
    return input.new_empty(rows, dtype=dtype), input.new_empty(rows, dtype=dtype)


@torch.library.custom_op("torchopt_lab::cross_entropy_backward", mutates_args=())
def cross_entropy_backward(
    grad_loss: torch.Tensor,
    input: torch.Tensor,
    target: torch.Tensor,
    log_sum_exp: torch.Tensor,
    weight: torch.Tensor | None,
    ignore_index: int,
    label_smoothing: float,
) -> torch.Tensor:
    """``dL/dx`` on the Triton kernel from the saved ``lse``."""
    return triton_kernels().cross_entropy_backward(
        grad_loss, input, target, log_sum_exp, weight, ignore_index, label_smoothing
    )


@cross_entropy_backward.register_fake
def _(
    grad_loss: torch.Tensor,
    input: torch.Tensor,
    target: torch.Tensor,
    log_sum_exp: torch.Tensor,
    weight: torch.Tensor | None,
    ignore_index: int,
    label_smoothing: float,
) -> torch.Tensor:
    return torch.empty_like(input)


@torch.library.custom_op("torchopt_lab::cross_entropy_probabilities_forward", mutates_args=())
def cross_entropy_probabilities_forward(
    input: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None, label_smoothing: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(ℓ, lse, Q)`` per row against class probabilities on the Triton kernel."""
    return triton_kernels().cross_entropy_probabilities_forward(
        input, target, weight, label_smoothing
    )


@cross_entropy_probabilities_forward.register_fake
def _(
    input: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None, label_smoothing: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    rows = input.shape[0]
    dtype = statistics_dtype(input.dtype)
    return (
        input.new_empty(rows, dtype=dtype),
        input.new_empty(rows, dtype=dtype),
        input.new_empty(rows, dtype=dtype),
    )


@torch.library.custom_op("torchopt_lab::cross_entropy_probabilities_backward", mutates_args=())
def cross_entropy_probabilities_backward(
    grad_loss: torch.Tensor,
    input: torch.Tensor,
    target: torch.Tensor,
    log_sum_exp: torch.Tensor,
    mass: torch.Tensor,
    weight: torch.Tensor | None,
    label_smoothing: float,
) -> torch.Tensor:
    """``dL/dx`` against class probabilities on the Triton kernel from the saved ``lse`` and
    ``Q``."""
    return triton_kernels().cross_entropy_probabilities_backward(
        grad_loss, input, target, log_sum_exp, mass, weight, label_smoothing
    )


@cross_entropy_probabilities_backward.register_fake
def _(
    grad_loss: torch.Tensor,
    input: torch.Tensor,
    target: torch.Tensor,
    log_sum_exp: torch.Tensor,
    mass: torch.Tensor,
    weight: torch.Tensor | None,
    label_smoothing: float,
) -> torch.Tensor:
    return torch.empty_like(input)


def _rows(tensor: torch.Tensor, classes: int) -> torch.Tensor:
    """``[N, C, *]`` (or ``[C]``) as contiguous ``[rows, C]``, the class dimension moved last."""
    moved = tensor.movedim(1, -1) if tensor.dim() > 2 else tensor
    return moved.reshape(-1, classes).contiguous()


def _unrows(rows: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """The inverse of :func:`_rows`."""
    if len(shape) > 2:
        rows = rows.reshape(shape[0], *shape[2:], shape[1]).movedim(-1, 1)
    return rows.reshape(shape)


register_vmap_by_slices(cross_entropy_forward)
register_vmap_by_slices(cross_entropy_backward)
register_vmap_by_slices(cross_entropy_probabilities_forward)
register_vmap_by_slices(cross_entropy_probabilities_backward)


def _kernel_weight(weight: torch.Tensor | None, input: torch.Tensor) -> torch.Tensor | None:
    """``weight`` as the kernels read it: float32 weights of a float16/bfloat16 input are read in
    the input's dtype."""
    return None if weight is None else weight.to(input.dtype).contiguous()


def _kernel_inputs(
    input: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None, probabilities: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """What the kernels read, as forward and backward both build it: the logits as contiguous
    ``[rows, C]``, the targets as rows (class indices flattened, or class probabilities as
    ``[rows, C]`` in the input's dtype) and the weight (:func:`_kernel_weight`)."""
    classes = input.shape[1] if input.dim() >= 2 else input.shape[0]
    if probabilities:
        rows_target = _rows(target.to(input.dtype), classes)
    else:
        rows_target = target.reshape(-1).contiguous()
    return _rows(input, classes), rows_target, _kernel_weight(weight, input)


@forward_mode
class CrossEntropyTritonFunction(torch.autograd.Function):
    """Cross-entropy against class indices on the LSE-only kernels: keeps the logits (which the
    caller's graph holds anyway) and, as the second and third outputs, one log-sum-exp per row
    and the denominator ``D = Σ_i v_i w_{t_i}`` that ``"mean"`` divides by; the backward
    recomputes the softmax from them."""

    generate_vmap_rule = True
    jvp = no_forward_mode("cross_entropy")

    @staticmethod
    def forward(
        input: torch.Tensor,
        target: torch.Tensor,
        weight: torch.Tensor | None,
        ignore_index: int,
        reduction: str,
        label_smoothing: float,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        logits, rows_target, weight = _kernel_inputs(input, target, weight, probabilities=False)
        classes = logits.shape[1]
        loss, lse = cross_entropy_forward(
            logits, rows_target, weight, ignore_index, label_smoothing
        )
        valid = rows_target != ignore_index
        # D = Σ_i v_i w_{t_i}
        if weight is None:
            denominator = valid.sum().to(loss.dtype)
        else:
            denominator = (weight[rows_target.clamp(0, classes - 1)].to(loss.dtype) * valid).sum()
        if reduction == "none":
            return loss.reshape(target.shape).to(input.dtype), lse, denominator
        if reduction == "sum":
            return loss.sum().to(input.dtype), lse, denominator
        return (loss.sum() / denominator).to(input.dtype), lse, denominator

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], outputs: tuple[torch.Tensor, ...]) -> None:
        input, target, weight, ignore_index, reduction, label_smoothing = inputs
        ctx.options = (ignore_index, reduction, label_smoothing)
        ctx.mark_non_differentiable(*outputs[1:])
        ctx.save_for_backward(input, target, weight, *outputs[1:])

    @staticmethod
    @first_order_only
    @once_differentiable
    def backward(ctx: Any, grad_output: torch.Tensor, *_: Any) -> tuple[torch.Tensor | None, ...]:
        input, target, weight, lse, denominator = ctx.saved_tensors
        ignore_index, reduction, label_smoothing = ctx.options
        # γ_i = dL/dℓ_i: g_i, g, or g / D
        gamma = grad_output.reshape(-1) if reduction == "none" else grad_output.reshape(1)
        if reduction == "mean":
            gamma = gamma / denominator
        # dL/dx = γ_i [p s_i - q_i], p recomputed from the saved lse
        logits, rows_target, kernel_weight = _kernel_inputs(
            input, target, weight, probabilities=False
        )
        grad = cross_entropy_backward(
            gamma, logits, rows_target, lse, kernel_weight, ignore_index, label_smoothing
        )
        return _unrows(grad, input.shape), None, None, None, None, None


@forward_mode
class CrossEntropyProbabilitiesTritonFunction(torch.autograd.Function):
    """Cross-entropy against class probabilities on the kernels, keeping per row only ``lse_i``
    and the target mass ``Q_i`` (the second and third outputs). ``"mean"`` divides by the number
    of rows (samples), as torch. With ``log p = x - lse`` rebuilt only when asked for:
    ``dL/dt_{i,c} = -γ_i (1 - ε) w_c log p_{i,c}``, ``dL/dw_c = -Σ_i γ_i t'_{i,c} log p_{i,c}``."""

    generate_vmap_rule = True
    jvp = no_forward_mode("cross_entropy")

    @staticmethod
    def forward(
        input: torch.Tensor,
        target: torch.Tensor,
        weight: torch.Tensor | None,
        reduction: str,
        label_smoothing: float,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        logits, rows_target, kernel_weight = _kernel_inputs(
            input, target, weight, probabilities=True
        )
        loss, lse, mass = cross_entropy_probabilities_forward(
            logits, rows_target, kernel_weight, label_smoothing
        )
        if reduction == "none":
            sample_shape = input.shape[:1] + input.shape[2:] if input.dim() >= 2 else ()
            return loss.reshape(sample_shape).to(input.dtype), lse, mass
        total = loss.sum()
        if reduction == "mean":
            total = total / logits.shape[0] if logits.shape[0] else total.new_tensor(float("nan"))
        return total.to(input.dtype), lse, mass

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], outputs: tuple[torch.Tensor, ...]) -> None:
        input, target, weight, reduction, label_smoothing = inputs
        ctx.options = (reduction, label_smoothing)
        ctx.mark_non_differentiable(*outputs[1:])
        ctx.save_for_backward(input, target, weight, *outputs[1:])

    @staticmethod
    @first_order_only
    @once_differentiable
    def backward(ctx: Any, grad_output: torch.Tensor, *_: Any) -> tuple[torch.Tensor | None, ...]:
        input, target_input, weight, lse, mass = ctx.saved_tensors
        reduction, label_smoothing = ctx.options
        shape = input.shape
        logits, target, kernel_weight = _kernel_inputs(
            input, target_input, weight, probabilities=True
        )
        target_dtype = target_input.dtype
        # γ_i = dL/dℓ_i: g_i, g, or g / rows
        gamma = grad_output.reshape(-1) if reduction == "none" else grad_output.reshape(1)
        if reduction == "mean":
            gamma = gamma / logits.shape[0]
        grad_input = grad_target = grad_weight = None
        if ctx.needs_input_grad[0]:
            # dL/dx = γ_i (p Q_i - q), p recomputed from the saved lse
            grad_input = _unrows(
                cross_entropy_probabilities_backward(
                    gamma, logits, target, lse, mass, kernel_weight, label_smoothing
                ),
                shape,
            )
        if ctx.needs_input_grad[1] or (weight is not None and ctx.needs_input_grad[2]):
            # log p = x - lse, rebuilt only for these rarely needed gradients
            log_probs = logits - lse.to(logits.dtype)[:, None]
            gamma_rows = gamma.to(logits.dtype).expand(logits.shape[0])[:, None]
            class_weight = 1.0 if weight is None else weight.to(logits.dtype)
            if ctx.needs_input_grad[1]:
                # dL/dt = -γ (1 - ε) w log p
                grad = -gamma_rows * (1 - label_smoothing) * class_weight * log_probs
                grad_target = _unrows(grad, shape).to(target_dtype)
            if weight is not None and ctx.needs_input_grad[2]:
                # t' = (1 - ε) t + ε / C
                smoothed = target * (1 - label_smoothing) + label_smoothing / logits.shape[1]
                # dL/dw = -Σ_i γ_i t' log p
                grad_weight = (-(gamma_rows * smoothed * log_probs).sum(0)).to(weight.dtype)
        return grad_input, grad_target, grad_weight, None, None


def cross_entropy(
    input: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None = None,
    size_average: bool | None = None,
    ignore_index: int = -100,
    reduce: bool | None = None,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """Cross-entropy between logits ``input`` (classes along dimension 1, or 0 for a 1-D input)
    and class indices or class probabilities ``target``; see
    :class:`CrossEntropyFunction` and :class:`CrossEntropyProbabilitiesFunction`."""
    input, target, weight = autocast_inputs("cross_entropy", input, target, weight)
    reduction = check_reduction(size_average, reduce, reduction)
    # torch's rule: only a value above 1 is refused; one that is not above 0 (negative, NaN)
    # means no smoothing
    if label_smoothing > 1.0:
        raise RuntimeError(f"label_smoothing must be between 0.0 and 1.0. Got: {label_smoothing}")
    label_smoothing = float(label_smoothing) if label_smoothing > 0.0 else 0.0
    if input.dim() == 0:
        raise IndexError(
            "cross_entropy expects an input of at least 1 dimension (classes), got a 0-D input"
        )
    check_floating("cross_entropy", input)
    class_dim = 1 if input.dim() >= 2 else 0
    classes = input.shape[class_dim]
    if weight is not None and (weight.dim() != 1 or weight.numel() != classes):
        raise RuntimeError(
            f"weight tensor should be defined either for all {classes} classes or no classes but "
            f"got weight tensor of shape: {list(weight.shape)}"
        )
    check_dtype("cross_entropy", input, weight=weight)
    probabilities = target.shape == input.shape
    if probabilities:
        if not target.is_floating_point():
            raise RuntimeError(
                "Expected floating point type for target with class probabilities, got "
                f"{target.dtype}"
            )
        if ignore_index >= 0:
            raise RuntimeError(
                f"ignore_index is not supported for floating point target, got "
                f"ignore_index={ignore_index}"
            )
    else:
        if weight is not None and weight.requires_grad and torch.is_grad_enabled():
            raise RuntimeError(
                "cross_entropy with class-index targets is not differentiable with respect to "
                "weight (as in torch): weight cannot have requires_grad=True"
            )
        _check_class_target(input, target, class_dim, classes, ignore_index)
        target = target.long()
    if use_triton("cross_entropy", input, target, weight):
        if probabilities:
            return apply(
                CrossEntropyProbabilitiesTritonFunction,
                input,
                target,
                weight,
                reduction,
                label_smoothing,
            )[0]
        return apply(
            CrossEntropyTritonFunction,
            input,
            target,
            weight,
            ignore_index,
            reduction,
            label_smoothing,
        )[0]
    if probabilities:
        return apply(
            CrossEntropyProbabilitiesFunction,
            input,
            target,
            weight,
            class_dim,
            reduction,
            label_smoothing,
        )[0]
    return apply(
        CrossEntropyFunction,
        input,
        target,
        weight,
        class_dim,
        ignore_index,
        reduction,
        label_smoothing,
    )[0]


def _check_class_target(
    input: torch.Tensor, target: torch.Tensor, class_dim: int, classes: int, ignore_index: int
) -> None:
    if target.dtype not in (torch.long, torch.uint8):
        raise RuntimeError(f"expected target dtype to be Long or Byte, but got {target.dtype}")
    expected = input.shape[:class_dim] + input.shape[class_dim + 1 :]
    if target.shape != expected:
        if input.dim() >= 2 and target.dim() >= 1 and target.shape[0] != input.shape[0]:
            raise ValueError(
                f"Expected input batch_size ({input.shape[0]}) to match target batch_size "
                f"({target.shape[0]})."
            )
        raise RuntimeError(
            f"size mismatch (got input: {list(input.shape)}, target: {list(target.shape)})"
        )
    if not torch.compiler.is_compiling() and torch._C._functorch.is_functorch_wrapped_tensor(
        target
    ):
        # Under torch.func transforms a check cannot branch on the (maybe batched) values: the
        # Function's gather refuses an out-of-range class index itself (RuntimeError).
        return
    out_of_range = ((target < 0) | (target >= classes)) & (target != ignore_index)
    if target.device.type != "cpu" or torch.compiler.is_compiling():
        # No host synchronisation (and no graph break under torch.compile): the device checks and
        # raises RuntimeError when it gets there, as torch's CUDA kernel asserts on the device.
        torch._assert_async(
            ~out_of_range.any(), f"cross_entropy: a target is out of bounds [0, {classes})"
        )
    elif out_of_range.any():
        raise IndexError(f"Target {target[out_of_range][0].item()} is out of bounds.")


class CrossEntropyLoss(nn.CrossEntropyLoss):
    """:class:`torch.nn.CrossEntropyLoss` running :func:`cross_entropy`."""

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return cross_entropy(
            input,
            target,
            weight=self.weight,
            ignore_index=self.ignore_index,
            reduction=self.reduction,
            label_smoothing=self.label_smoothing,
        )
