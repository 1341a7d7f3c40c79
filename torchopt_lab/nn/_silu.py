"""SiLU / swish (Elfwing et al., 2017; Ramachandran et al., 2017), ``torch.nn.functional.silu``:
the functional and its Function with a hand-written backward.

``y = x σ(x)``, ``dy/dx = σ(x) (1 + x (1 - σ(x)))``. Triton: the bias + activation kernel
(``triton_kernels/nn/activation.py``, ``"silu"``), as for the other activations.
"""

from __future__ import annotations

from typing import Any

import torch

from torchopt_lab.nn._dispatch import triton_function, use_triton
from torchopt_lab.nn._function import apply, forward_mode


def _derivative(input: torch.Tensor) -> torch.Tensor:
    """``dy/dx = σ(x) (1 + x (1 - σ(x)))``, with differentiable ops (double backward)."""
    sigmoid = torch.sigmoid(input)
    return sigmoid * (1 + input * (1 - sigmoid))


@forward_mode
class SiLUFunction(torch.autograd.Function):
    r"""``y = x σ(x)``; ``dL/dx = g σ(x) (1 + x (1 - σ(x)))``. Keeps ``x``."""

    generate_vmap_rule = True

    @staticmethod
    def forward(input: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.silu(input)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
        ctx.save_for_backward(inputs[0])
        ctx.save_for_forward(inputs[0])

    @staticmethod
    def jvp(ctx: Any, input_tangent: torch.Tensor) -> torch.Tensor:
        (input,) = ctx.saved_tensors
        # dy = dx σ(x) (1 + x (1 - σ(x)))
        return input_tangent * _derivative(input)

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> torch.Tensor:
        (input,) = ctx.saved_tensors
        # dL/dx = g σ(x) (1 + x (1 - σ(x)))
        return grad_output * _derivative(input)


def silu(input: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    """``input * sigmoid(input)``, in place when ``inplace``, as ``torch.nn.functional.silu``; see
    :class:`SiLUFunction`."""
    if not input.is_floating_point():
        raise NotImplementedError(
            f"silu is not implemented for {input.dtype} tensors; it needs a floating-point dtype"
        )
    if use_triton("silu", input):
        return triton_function("silu")(input, inplace)
    if inplace:
        # The backward needs x, which the in-place result overwrites: the Function runs on a
        # (differentiable) copy and the result is copied back into the input.
        return input.copy_(apply(SiLUFunction, input.clone()))
    return apply(SiLUFunction, input)
