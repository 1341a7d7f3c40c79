"""Softmax and log-softmax along one dimension, with hand-written backward passes.

Notation: ``x`` the input, ``y`` the output, ``g = dL/dy``, sums run over the softmax dimension.
``dtype`` casts the input before the operation (as in torch) and the gradient back after it.
"""

from __future__ import annotations

from typing import Any

import torch


class SoftmaxFunction(torch.autograd.Function):
    r"""``y_i = exp(x_i) / Σ_j exp(x_j)``; ``dL/dx = y ⊙ (g - Σ_j g_j y_j)``."""

    @staticmethod
    def forward(ctx: Any, input: torch.Tensor, dim: int, dtype: torch.dtype | None) -> torch.Tensor:
        ctx.dim, ctx.input_dtype = dim, input.dtype
        output = torch.softmax(input if dtype is None else input.to(dtype), dim)
        ctx.save_for_backward(output)
        return output

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        (output,) = ctx.saved_tensors
        # dL/dx = y ⊙ (g - Σ_j g_j y_j)
        grad_input = output * (grad_output - (grad_output * output).sum(ctx.dim, keepdim=True))
        return grad_input.to(ctx.input_dtype), None, None


class LogSoftmaxFunction(torch.autograd.Function):
    r"""``y_i = x_i - log Σ_j exp(x_j)``; ``dL/dx = g - exp(y) Σ_j g_j``."""

    @staticmethod
    def forward(ctx: Any, input: torch.Tensor, dim: int, dtype: torch.dtype | None) -> torch.Tensor:
        ctx.dim, ctx.input_dtype = dim, input.dtype
        output = torch.log_softmax(input if dtype is None else input.to(dtype), dim)
        ctx.save_for_backward(output)
        return output

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        (output,) = ctx.saved_tensors
        # dL/dx = g - softmax(x) Σ_j g_j, with softmax(x) = exp(y)
        grad_input = grad_output - output.exp() * grad_output.sum(ctx.dim, keepdim=True)
        return grad_input.to(ctx.input_dtype), None, None
