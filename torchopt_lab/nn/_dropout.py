"""Dropout (Srivastava et al., 2014), ``torch.nn.functional.dropout``, paired with
``triton_kernels/nn/dropout.py``: the functional with its validation, the torch-path Function with
a hand-written backward, the Triton-path Function on the seeded kernel (the
``torchopt_lab::dropout_*`` custom ops, their seed a traced CPU tensor, so ``torch.compile``
sees no host-side random draw), and the module.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from torchopt_lab.nn._dispatch import (
    first_order_only,
    no_forward_mode,
    register_vmap_by_slices,
    triton_kernels,
    use_triton,
)
from torchopt_lab.nn._function import apply, forward_mode


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


# The Triton path: the seeded kernel as custom ops. The seed is a CPU int64 scalar tensor drawn by
# the Function with torch.randint on torch's CPU generator (so ``torch.manual_seed`` repeats it, no
# device sync, and ``torch.compile`` traces the draw, a random op its common-subexpression pass
# keeps apart: two dropouts of one tensor get two seeds), an input of the forward and backward ops.
# The launcher's seed range is [0, 2³¹ - 1] (``triton_kernels/nn/dropout.py``; it refuses others).
_SEED_BOUND = 2**31 - 1


@torch.library.custom_op("torchopt_lab::dropout_forward", mutates_args=())
def dropout_forward(input: torch.Tensor, p: float, seed: torch.Tensor) -> torch.Tensor:
    """``input ⊙ m / (1 - p)`` on the Triton kernel, ``m`` the mask of ``seed``."""
    return triton_kernels().dropout_forward(input, p, int(seed))


@dropout_forward.register_fake
def _(input: torch.Tensor, p: float, seed: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(input)


@torch.library.custom_op("torchopt_lab::dropout_forward_", mutates_args=("input",))
def dropout_forward_(input: torch.Tensor, p: float, seed: torch.Tensor) -> None:
    """``input ← input ⊙ m / (1 - p)`` in place on the Triton kernel, ``m`` the mask of
    ``seed``."""
    triton_kernels().dropout_forward(input, p, int(seed), out=input)


@dropout_forward_.register_fake
def _(input: torch.Tensor, p: float, seed: torch.Tensor) -> None:
    return None


@torch.library.custom_op("torchopt_lab::dropout_backward", mutates_args=())
def dropout_backward(grad_output: torch.Tensor, p: float, seed: torch.Tensor) -> torch.Tensor:
    """``grad_output ⊙ m / (1 - p)`` on the Triton kernel, ``m`` regenerated from ``seed``."""
    return triton_kernels().dropout_backward(grad_output, p, int(seed))


@dropout_backward.register_fake
def _(grad_output: torch.Tensor, p: float, seed: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(grad_output)


register_vmap_by_slices(dropout_forward)
register_vmap_by_slices(dropout_backward)


@forward_mode
class DropoutTritonFunction(torch.autograd.Function):
    """Dropout on the seeded kernel: keeps one integer seed (the second output; empty for
    ``p = 1``), and the backward regenerates the forward's mask from it. Under ``vmap`` the seed
    is drawn with ``torch.randint``, so vmap's ``randomness`` applies as to torch's dropout:
    "error" raises, "different" draws a mask per slice, "same" one mask for all."""

    generate_vmap_rule = True
    jvp = no_forward_mode("dropout")

    @staticmethod
    def forward(input: torch.Tensor, p: float, inplace: bool) -> tuple[torch.Tensor, torch.Tensor]:
        if p == 1:
            # Everything dropped: zeros, no mask to draw (as torch).
            output = input.zero_() if inplace else torch.zeros_like(input)
            return output, torch.empty(0, dtype=torch.long)
        seed = torch.randint(0, _SEED_BOUND, (), device="cpu")
        if not inplace:
            return dropout_forward(input.contiguous(), p, seed), seed
        contiguous = input.contiguous()
        dropout_forward_(contiguous, p, seed)
        # (is_contiguous, not a data-pointer comparison, which torch.compile cannot trace)
        if not input.is_contiguous():
            input.copy_(contiguous)
        return input, seed

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], outputs: tuple[torch.Tensor, ...]) -> None:
        _, ctx.p, inplace = inputs
        if inplace:
            ctx.mark_dirty(outputs[0])
        ctx.mark_non_differentiable(outputs[1])
        ctx.save_for_backward(outputs[1])

    @staticmethod
    @first_order_only
    @once_differentiable
    def backward(ctx: Any, grad_output: torch.Tensor, _: Any) -> tuple[torch.Tensor | None, ...]:
        (seed,) = ctx.saved_tensors
        if ctx.p == 1:
            # dL/dx = 0: every element was dropped
            return torch.zeros_like(grad_output), None, None
        # dL/dx = g m / (1 - p), m regenerated from the seed
        return dropout_backward(grad_output.contiguous(), ctx.p, seed), None, None


def dropout(
    input: torch.Tensor, p: float = 0.5, training: bool = True, inplace: bool = False
) -> torch.Tensor:
    """Zero each element with probability ``p`` and scale the rest by ``1 / (1 - p)`` (when
    ``training``); see :class:`DropoutFunction`."""
    if p < 0.0 or p > 1.0:
        raise ValueError(f"dropout probability has to be between 0 and 1, but got {p}")
    if not training or p == 0 or input.numel() == 0:
        return input
    if not input.is_floating_point() and not input.is_complex():
        # torch's error for an integer or bool input (its float mask cannot be cast back)
        raise RuntimeError(
            f"result type Float can't be cast to the desired output type {input.dtype}"
        )
    if use_triton("dropout", input):
        return apply(DropoutTritonFunction, input, p, inplace)[0]
    return apply(DropoutFunction, input, p, inplace)[0]


class Dropout(nn.Dropout):
    """:class:`torch.nn.Dropout` running :func:`dropout`."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return dropout(input, self.p, self.training, self.inplace)
