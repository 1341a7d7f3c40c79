"""Layer and batch normalisation with hand-written backward passes.

Both normalise ``x`` over a set of ``n`` elements that share statistics, then apply an affine map:
``μ = mean(x)``, ``σ² = mean((x - μ)²)`` (biased), ``r = 1 / √(σ² + eps)``, ``x̂ = (x - μ) r``,
``y = w x̂ + b``. With ``g = dL/dy``, the backward (as in Triton's layer-norm tutorial) is

``dL/dx = r (w g - x̂ c_1 - c_2)``, ``c_1 = mean(x̂ ⊙ w g)``, ``c_2 = mean(w g)``,
``dL/dw = Σ g x̂``, ``dL/db = Σ g``,

the means over the ``n`` elements of a group and the sums over the dimensions ``w`` is shared
along. When the backward is itself differentiated (``create_graph=True``), ``μ`` and ``r`` are
recomputed from ``x`` with differentiable ops, so the second derivative sees that they depend on
``x``; otherwise the values saved by the forward are used.
"""

from __future__ import annotations

from typing import Any

import torch


def _variance_mean(input: torch.Tensor, dims: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(σ², μ)`` over ``dims``, kept as size-1 dimensions; NaN for an empty input (without
    torch's degrees-of-freedom warning: there is nothing to normalise)."""
    if input.numel() == 0:
        shape = [1 if dim in dims else size for dim, size in enumerate(input.shape)]
        nan = input.new_full(shape, float("nan"))
        return nan, nan
    return torch.var_mean(input, dims, correction=0, keepdim=True)


def _statistics(
    input: torch.Tensor, dims: tuple[int, ...], eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(μ, r)`` over ``dims``, kept as size-1 dimensions."""
    variance, mean = _variance_mean(input, dims)
    return mean, torch.rsqrt(variance + eps)


class LayerNormFunction(torch.autograd.Function):
    r"""Layer normalisation (Ba et al., 2016) over the trailing dimensions ``normalized_shape``;
    ``w`` and ``b`` have that shape and are shared along the leading (batch) dimensions."""

    @staticmethod
    def forward(
        ctx: Any,
        input: torch.Tensor,
        normalized_dims: int,
        weight: torch.Tensor | None,
        bias: torch.Tensor | None,
        eps: float,
    ) -> torch.Tensor:
        dims = tuple(range(input.dim() - normalized_dims, input.dim()))
        mean, rstd = _statistics(input, dims, eps)
        output = (input - mean) * rstd
        if weight is not None:
            output = output * weight
        if bias is not None:
            output = output + bias
        ctx.dims, ctx.eps = dims, eps
        ctx.save_for_backward(input, weight, bias, mean, rstd)
        return output

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        input, weight, bias, mean, rstd = ctx.saved_tensors
        dims = ctx.dims
        if torch.is_grad_enabled():
            mean, rstd = _statistics(input, dims, ctx.eps)
        batch_dims = tuple(range(input.dim() - len(dims)))
        # x̂ = (x - μ) r
        normalized = (input - mean) * rstd
        # w g, the gradient with respect to x̂
        grad_normalized = grad_output if weight is None else grad_output * weight
        grad_input = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            # c_1 = mean(x̂ ⊙ w g), over the normalised dimensions
            c1 = (normalized * grad_normalized).mean(dims, keepdim=True)
            # c_2 = mean(w g)
            c2 = grad_normalized.mean(dims, keepdim=True)
            # dL/dx = r (w g - x̂ c_1 - c_2)
            grad_input = rstd * (grad_normalized - normalized * c1 - c2)
        if weight is not None and ctx.needs_input_grad[2]:
            # dL/dw = Σ_batch g x̂
            grad_weight = (grad_output * normalized).sum(batch_dims)
        if bias is not None and ctx.needs_input_grad[3]:
            # dL/db = Σ_batch g
            grad_bias = grad_output.sum(batch_dims)
        return grad_input, None, grad_weight, grad_bias, None


def _channel_view(tensor: torch.Tensor, ndim: int) -> torch.Tensor:
    """A per-channel vector shaped to broadcast along dimension 1 of an ``ndim``-D input."""
    return tensor.reshape([1, -1] + [1] * (ndim - 2))


class BatchNormFunction(torch.autograd.Function):
    r"""Batch normalisation (Ioffe & Szegedy, 2015) of ``x`` of shape ``[N, C, *]`` per channel.

    Training: ``μ``, ``σ²`` over the ``n = N · Π *`` elements of a channel; the running statistics
    (when given) are updated in place as torch does, ``running_mean ← (1 - m) running_mean + m μ``,
    ``running_var ← (1 - m) running_var + m σ² n / (n - 1)`` (unbiased). Evaluation: ``μ`` and
    ``σ²`` are the running statistics, constants, so ``dL/dx = r w g``.
    """

    @staticmethod
    def forward(
        ctx: Any,
        input: torch.Tensor,
        running_mean: torch.Tensor | None,
        running_var: torch.Tensor | None,
        weight: torch.Tensor | None,
        bias: torch.Tensor | None,
        training: bool,
        momentum: float,
        eps: float,
    ) -> torch.Tensor:
        dims = (0, *range(2, input.dim()))
        if training:
            variance, mean = _variance_mean(input, dims)
            rstd = torch.rsqrt(variance + eps)
            count = input.numel() // input.shape[1]
            if running_mean is not None and count > 0:
                running_mean.mul_(1 - momentum).add_(mean.reshape(-1), alpha=momentum)
            if running_var is not None and count > 0:
                unbiased = variance.reshape(-1) * (count / max(count - 1, 1))
                running_var.mul_(1 - momentum).add_(unbiased, alpha=momentum)
        else:
            mean = _channel_view(running_mean, input.dim())
            rstd = _channel_view(torch.rsqrt(running_var + eps), input.dim())
        output = (input - mean) * rstd
        if weight is not None:
            output = output * _channel_view(weight, input.dim())
        if bias is not None:
            output = output + _channel_view(bias, input.dim())
        ctx.dims, ctx.training, ctx.eps = dims, training, eps
        ctx.save_for_backward(input, weight, bias, mean, rstd)
        return output

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        input, weight, bias, mean, rstd = ctx.saved_tensors
        dims = ctx.dims
        if ctx.training and torch.is_grad_enabled():
            mean, rstd = _statistics(input, dims, ctx.eps)
        # x̂ = (x - μ) r
        normalized = (input - mean) * rstd
        # w g, the gradient with respect to x̂
        grad_normalized = (
            grad_output if weight is None else grad_output * _channel_view(weight, input.dim())
        )
        grad_input = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            if ctx.training:
                # c_1 = mean(x̂ ⊙ w g), over the elements of a channel
                c1 = (normalized * grad_normalized).mean(dims, keepdim=True)
                # c_2 = mean(w g)
                c2 = grad_normalized.mean(dims, keepdim=True)
                # dL/dx = r (w g - x̂ c_1 - c_2)
                grad_input = rstd * (grad_normalized - normalized * c1 - c2)
            else:
                # dL/dx = r w g (μ and r are the running statistics, constants)
                grad_input = rstd * grad_normalized
        if weight is not None and ctx.needs_input_grad[3]:
            # dL/dw = Σ g x̂ over the elements of a channel
            grad_weight = (grad_output * normalized).sum(dims)
        if bias is not None and ctx.needs_input_grad[4]:
            # dL/db = Σ g over the elements of a channel
            grad_bias = grad_output.sum(dims)
        return grad_input, None, None, grad_weight, grad_bias, None, None, None
