"""Softmax and log-softmax along one dimension, with hand-written backward passes.

Notation: ``x`` the input, ``y`` the output, ``g = dL/dy``, sums run over the softmax dimension.
``dtype`` casts the input before the operation (as in torch) and the gradient back after it.
"""

from __future__ import annotations

from typing import Any

import torch

from torchopt_lab.nn._function import forward_mode


def _setup_context(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
    input, ctx.dim, _ = inputs
    ctx.input_dtype = input.dtype
    ctx.save_for_backward(output)
    ctx.save_for_forward(output)


@forward_mode
class SoftmaxFunction(torch.autograd.Function):
    r"""``y_i = exp(x_i) / Σ_j exp(x_j)``; ``dL/dx = y ⊙ (g - Σ_j g_j y_j)``."""

    generate_vmap_rule = True

    @staticmethod
    def forward(input: torch.Tensor, dim: int, dtype: torch.dtype | None) -> torch.Tensor:
        return torch.softmax(input if dtype is None else input.to(dtype), dim)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
        _setup_context(ctx, inputs, output)

    @staticmethod
    def jvp(ctx: Any, input_tangent: torch.Tensor, *_: None) -> torch.Tensor:
        (output,) = ctx.saved_tensors
        tangent = input_tangent.to(output.dtype)
        # dy = y ⊙ (dx - Σ_j dx_j y_j)
        return output * (tangent - (tangent * output).sum(ctx.dim, keepdim=True))

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        (output,) = ctx.saved_tensors
        # dL/dx = y ⊙ (g - Σ_j g_j y_j)
        grad_input = output * (grad_output - (grad_output * output).sum(ctx.dim, keepdim=True))
        return grad_input.to(ctx.input_dtype), None, None


@forward_mode
class LogSoftmaxFunction(torch.autograd.Function):
    r"""``y_i = x_i - log Σ_j exp(x_j)``; ``dL/dx = g - exp(y) Σ_j g_j``."""

    generate_vmap_rule = True

    @staticmethod
    def forward(input: torch.Tensor, dim: int, dtype: torch.dtype | None) -> torch.Tensor:
        return torch.log_softmax(input if dtype is None else input.to(dtype), dim)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
        _setup_context(ctx, inputs, output)

    @staticmethod
    def jvp(ctx: Any, input_tangent: torch.Tensor, *_: None) -> torch.Tensor:
        (output,) = ctx.saved_tensors
        tangent = input_tangent.to(output.dtype)
        # dy = dx - Σ_j exp(y_j) dx_j
        return tangent - (output.exp() * tangent).sum(ctx.dim, keepdim=True)

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        (output,) = ctx.saved_tensors
        # dL/dx = g - softmax(x) Σ_j g_j, with softmax(x) = exp(y)
        grad_input = grad_output - output.exp() * grad_output.sum(ctx.dim, keepdim=True)
        return grad_input.to(ctx.input_dtype), None, None
