"""Dropout (Srivastava et al., 2014) with a hand-written backward pass."""

from __future__ import annotations

from typing import Any

import torch


class DropoutFunction(torch.autograd.Function):
    r"""``y = x ⊙ m / (1 - p)`` with ``m_i ~ Bernoulli(1 - p)`` drawn once per call; ``dL/dx = g ⊙ m
    / (1 - p)``.

    The mask is drawn exactly as torch's CPU dropout draws it (``bernoulli_(1 - p)`` on a tensor
    like ``x``), so the same seed gives the same mask. The scaled mask is kept for the backward;
    the Triton path regenerates it from a seed instead. ``p = 1`` zeroes everything.
    """

    @staticmethod
    def forward(ctx: Any, input: torch.Tensor, p: float, inplace: bool) -> torch.Tensor:
        if p == 1:
            noise = torch.zeros((), dtype=input.dtype, device=input.device)
        else:
            noise = torch.empty_like(input).bernoulli_(1 - p).div_(1 - p)
        if inplace:
            output = input.mul_(noise)
            ctx.mark_dirty(output)
        else:
            output = input * noise
        ctx.save_for_backward(noise)
        return output

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        (noise,) = ctx.saved_tensors
        # dL/dx = g ⊙ m / (1 - p)
        return grad_output * noise, None, None
