"""Softmax and log-softmax along one dimension, paired with ``triton_kernels/nn/softmax.py``: the
functionals with their validation, the torch-path Functions with hand-written backward passes,
the Triton-path Function on the row kernels (the ``torchopt_lab::softmax_*`` custom ops), and the
modules.

Notation: ``x`` the input, ``y`` the output, ``g = dL/dy``, sums run over the softmax dimension.
``dtype`` casts the input before the operation (as in torch) and the gradient back after it.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from torchopt_lab.nn._autocast import autocast_inputs
from torchopt_lab.nn._dispatch import (
    first_order_only,
    forward_mode_error,
    register_vmap_by_slices,
    triton_kernels,
    use_triton,
)
from torchopt_lab.nn._function import apply, forward_mode


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


@torch.library.custom_op("torchopt_lab::softmax_forward", mutates_args=())
def softmax_forward(input: torch.Tensor, dim: int, log: bool) -> torch.Tensor:
    """``softmax(input, dim)`` (``log_softmax`` when ``log``) on the row kernel, contiguous."""
    return triton_kernels().softmax_forward(input, dim, log)[0].contiguous()


@softmax_forward.register_fake
def _(input: torch.Tensor, dim: int, log: bool) -> torch.Tensor:
    return input.new_empty(input.shape)


@torch.library.custom_op("torchopt_lab::softmax_backward", mutates_args=())
def softmax_backward(
    grad_output: torch.Tensor, output: torch.Tensor, dim: int, log: bool
) -> torch.Tensor:
    """``dL/dx`` of (log-)softmax on the row kernel, contiguous."""
    return triton_kernels().softmax_backward(grad_output, output, dim, log).contiguous()


@softmax_backward.register_fake
def _(grad_output: torch.Tensor, output: torch.Tensor, dim: int, log: bool) -> torch.Tensor:
    return output.new_empty(output.shape)


register_vmap_by_slices(softmax_forward)
register_vmap_by_slices(softmax_backward)


@forward_mode
class SoftmaxTritonFunction(torch.autograd.Function):
    """Softmax (or, with ``log``, log-softmax) along ``dim`` on the row kernels, ``dim`` moved
    last; keeps the output."""

    generate_vmap_rule = True

    @staticmethod
    def jvp(ctx: Any, *tangents: Any) -> Any:
        raise forward_mode_error("log_softmax" if ctx.options[1] else "softmax")

    @staticmethod
    def forward(
        input: torch.Tensor, dim: int, dtype: torch.dtype | None, log: bool
    ) -> torch.Tensor:
        return softmax_forward(input if dtype is None else input.to(dtype), dim, log)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
        input, dim, _, log = inputs
        ctx.options = (dim, log, input.dtype)
        ctx.save_for_backward(output)

    @staticmethod
    @first_order_only
    @once_differentiable
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        (output,) = ctx.saved_tensors
        dim, log, input_dtype = ctx.options
        # dL/dx = y (g - Σ g y), or g - exp(y) Σ g for log-softmax
        grad_input = softmax_backward(grad_output, output, dim, log).to(input_dtype)
        return grad_input, None, None, None


def _softmax_dim(name: str, input: torch.Tensor, dim: int | None, stacklevel: int) -> int:
    if dim is not None:
        return dim
    warnings.warn(
        f"Implicit dimension choice for {name} has been deprecated. "
        "Change the call to include dim=X as an argument.",
        stacklevel=stacklevel,
    )
    return 0 if input.dim() in (0, 1, 3) else 1


def softmax(
    input: torch.Tensor,
    dim: int | None = None,
    _stacklevel: int = 3,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Softmax along ``dim`` (computed in ``dtype`` when given); see :class:`SoftmaxFunction`."""
    if dtype is None:
        (input,) = autocast_inputs("softmax", input)
    dim = _softmax_dim("softmax", input, dim, _stacklevel)
    if use_triton("softmax", input):
        return apply(SoftmaxTritonFunction, input, dim, dtype, False)
    return apply(SoftmaxFunction, input, dim, dtype)


def log_softmax(
    input: torch.Tensor,
    dim: int | None = None,
    _stacklevel: int = 3,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Log-softmax along ``dim`` (computed in ``dtype`` when given); see
    :class:`LogSoftmaxFunction`."""
    if dtype is None:
        (input,) = autocast_inputs("log_softmax", input)
    dim = _softmax_dim("log_softmax", input, dim, _stacklevel)
    if use_triton("log_softmax", input):
        return apply(SoftmaxTritonFunction, input, dim, dtype, True)
    return apply(LogSoftmaxFunction, input, dim, dtype)


class Softmax(nn.Softmax):
    """:class:`torch.nn.Softmax` running :func:`softmax`."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return softmax(input, self.dim, _stacklevel=5)


class LogSoftmax(nn.LogSoftmax):
    """:class:`torch.nn.LogSoftmax` running :func:`log_softmax`."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return log_softmax(input, self.dim, _stacklevel=5)
