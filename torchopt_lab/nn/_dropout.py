"""Dropout (Srivastava et al., 2014) with a hand-written backward pass."""

from __future__ import annotations

from typing import Any

import torch

from torchopt_lab.nn._function import forward_mode


@forward_mode
class DropoutFunction(torch.autograd.Function):
    r"""``y = x ⊙ m / (1 - p)`` with ``m_i ~ Bernoulli(1 - p)`` drawn once per call; ``dL/dx = g ⊙ m
    / (1 - p)``.

    The mask is drawn exactly as torch's CPU dropout draws it (``bernoulli_(1 - p)`` on a tensor
    like ``x``), so the same seed gives the same mask. The mask is a second (non-differentiable)
    output, so that ``setup_context`` can keep it. The scaled mask is kept for the backward;
    the Triton path regenerates it from a seed instead. ``p = 1`` zeroes everything.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(input: torch.Tensor, p: float, inplace: bool) -> tuple[torch.Tensor, torch.Tensor]:
        if p == 1:
            noise = torch.zeros((), dtype=input.dtype, device=input.device)
        else:
            noise = torch.empty_like(input).bernoulli_(1 - p).div_(1 - p)
        output = input.mul_(noise) if inplace else input * noise
        return output, noise

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], outputs: tuple[torch.Tensor, ...]) -> None:
        output, noise = outputs
        if inputs[2]:
            ctx.mark_dirty(output)
        ctx.mark_non_differentiable(noise)
        ctx.save_for_backward(noise)
        ctx.save_for_forward(noise)

    @staticmethod
    def jvp(ctx: Any, input_tangent: torch.Tensor, *_: None) -> tuple[torch.Tensor, None]:
        (noise,) = ctx.saved_tensors
        # dy = dx ⊙ m / (1 - p)
        return input_tangent * noise, None

    @staticmethod
    def backward(
        ctx: Any, grad_output: torch.Tensor, _: torch.Tensor | None
    ) -> tuple[torch.Tensor, None, None]:
        (noise,) = ctx.saved_tensors
        # dL/dx = g ⊙ m / (1 - p)
        return grad_output * noise, None, None
