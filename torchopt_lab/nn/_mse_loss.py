"""Mean squared error, ``torch.nn.functional.mse_loss``: the functional with its validation, the
Function with a hand-written backward, and the module. No Triton kernel: on the Triton path the
torch path runs, recorded as ``nn.mse_loss.loss`` (torch) in :func:`torchopt_lab.backend_info`.

Notation: ``x`` the input (prediction), ``t`` the target, ``g = dL/d(loss)`` the incoming
gradient, ``ℓ_i`` the per-element loss before the reduction
(:func:`~torchopt_lab.nn._common.reduce`).
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
from torch import nn

from torchopt_lab.nn._autocast import autocast_inputs
from torchopt_lab.nn._common import check_floating, check_reduction, reduce, reduction_gradient
from torchopt_lab.nn._dispatch import record_torch_part, use_triton
from torchopt_lab.nn._function import apply, forward_mode


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
        return reduce(squared, reduction, denominator)

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
            return reduce(tangent, ctx.reduction, ctx.denominator)
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
        gamma = reduction_gradient(grad_output, ctx.reduction, denominator)
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


def mse_loss(
    input: torch.Tensor,
    target: torch.Tensor,
    size_average: bool | None = None,
    reduce: bool | None = None,
    reduction: str = "mean",
    weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean squared error, optionally weighted per element; see
    :class:`MSELossFunction`."""
    input, target, weight = autocast_inputs("mse_loss", input, target, weight)
    if target.size() != input.size():
        warnings.warn(
            f"Using a target size ({target.size()}) that is different to the input size "
            f"({input.size()}). This will likely lead to incorrect results due to broadcasting. "
            "Please ensure they have the same size.",
            stacklevel=2,
        )
    reduction = check_reduction(size_average, reduce, reduction)
    torch.broadcast_shapes(input.shape, target.shape)
    if weight is not None and weight.size() != input.size():
        raise ValueError(
            f"Weights and input must have the same size, got weight of size {list(weight.shape)} "
            f"and input of size {list(input.shape)}."
        )
    # An integer input or target is computed in the floating dtype of the other (as torch);
    # only both integer is refused.
    promoted = torch.promote_types(input.dtype, target.dtype)
    if not promoted.is_floating_point:
        raise NotImplementedError(
            f"mse_loss is not implemented for {promoted} tensors; it needs a floating-point dtype"
        )
    check_floating("mse_loss", weight)
    if use_triton("mse_loss", input, target, weight):
        # no kernel: the torch path, recorded as a part of the Triton path
        record_torch_part("nn.mse_loss.loss", input.device)
    return apply(MSELossFunction, input, target, weight, reduction)


class MSELoss(nn.MSELoss):
    """:class:`torch.nn.MSELoss` running :func:`mse_loss`."""

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return mse_loss(input, target, reduction=self.reduction)
