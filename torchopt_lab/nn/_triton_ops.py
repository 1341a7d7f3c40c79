"""Triton launchers of ``triton_kernels.nn`` registered as PyTorch custom ops
(``torch.library.custom_op`` with fake implementations), so ``torch.compile`` treats a kernel
launch as one opaque op of known output shapes instead of tracing into Triton's launcher (a
graph break, and under the interpreter a failure). The Triton-path Functions of
:mod:`torchopt_lab.nn._triton` call these ops in their forward and backward.

Registered: the bias + activation, class-index cross-entropy, batch-norm, softmax and layer-norm
kernels. Dropout (its seed is drawn on the host) and the class-probability cross-entropy kernels
are still called directly and graph-break under ``torch.compile``.
"""

from __future__ import annotations

import importlib
import math

import torch

from torchopt_lab import backend

_kernels = importlib.import_module(f"{backend.kernels().__name__}.nn")
_statistics_dtype = importlib.import_module(
    f"{backend.kernels().__name__}.nn._common"
).statistics_dtype


@torch.library.custom_op("torchopt_lab::bias_activation_forward", mutates_args=())
def bias_activation_forward(
    input: torch.Tensor, bias: torch.Tensor | None, activation: str, negative_slope: float
) -> torch.Tensor:
    """``f(input + bias)`` on the Triton kernel (``input`` contiguous ``[*, columns]``)."""
    return _kernels.bias_activation_forward(input, bias, activation, negative_slope)


@bias_activation_forward.register_fake
def _(
    input: torch.Tensor, bias: torch.Tensor | None, activation: str, negative_slope: float
) -> torch.Tensor:
    return torch.empty_like(input)


@torch.library.custom_op("torchopt_lab::bias_activation_backward", mutates_args=())
def bias_activation_backward(
    grad_output: torch.Tensor,
    saved: torch.Tensor,
    bias: torch.Tensor | None,
    activation: str,
    negative_slope: float,
    compute_grad_bias: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dL/dz, dL/db)`` on the Triton kernel; ``dL/db`` is empty unless ``compute_grad_bias``
    (a custom op returns tensors, not None)."""
    grad_input, grad_bias = _kernels.bias_activation_backward(
        grad_output, saved, bias, activation, negative_slope, compute_grad_bias=compute_grad_bias
    )
    return grad_input, saved.new_empty(0) if grad_bias is None else grad_bias


@bias_activation_backward.register_fake
def _(
    grad_output: torch.Tensor,
    saved: torch.Tensor,
    bias: torch.Tensor | None,
    activation: str,
    negative_slope: float,
    compute_grad_bias: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    columns = saved.shape[-1] if compute_grad_bias else 0
    return torch.empty_like(saved), saved.new_empty(columns)


@torch.library.custom_op("torchopt_lab::cross_entropy_forward", mutates_args=())
def cross_entropy_forward(
    input: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None,
    ignore_index: int,
    label_smoothing: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ℓ, lse)`` per row on the Triton kernel, the targets checked by the caller."""
    return _kernels.cross_entropy_forward(
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
    dtype = _statistics_dtype(input.dtype)
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
    return _kernels.cross_entropy_backward(
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


@torch.library.custom_op("torchopt_lab::batch_norm_statistics", mutates_args=())
def batch_norm_statistics(input: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(μ, σ²)`` per channel of a contiguous ``[N, C, *]`` input on the Triton kernel."""
    return _kernels.batch_norm_statistics(input)


@batch_norm_statistics.register_fake
def _(input: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    dtype = _statistics_dtype(input.dtype)
    return input.new_empty(input.shape[1], dtype=dtype), input.new_empty(
        input.shape[1], dtype=dtype
    )


@torch.library.custom_op("torchopt_lab::batch_norm_gradient_sums", mutates_args=())
def batch_norm_gradient_sums(
    grad_output: torch.Tensor, input: torch.Tensor, mean: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(Σ g, Σ g (x - μ))`` per channel on the Triton kernel."""
    return _kernels.batch_norm_gradient_sums(grad_output, input, mean)


@batch_norm_gradient_sums.register_fake
def _(
    grad_output: torch.Tensor, input: torch.Tensor, mean: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    dtype = _statistics_dtype(input.dtype)
    return input.new_empty(input.shape[1], dtype=dtype), input.new_empty(
        input.shape[1], dtype=dtype
    )


@torch.library.custom_op("torchopt_lab::channel_affine", mutates_args=())
def channel_affine(
    input: torch.Tensor,
    scale: torch.Tensor,
    shift: torch.Tensor,
    second: torch.Tensor | None = None,
    second_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """``scale_c x + shift_c (+ second_scale_c second)`` per channel on the Triton kernel."""
    return _kernels.channel_affine(input, scale, shift, second, second_scale)


@channel_affine.register_fake
def _(
    input: torch.Tensor,
    scale: torch.Tensor,
    shift: torch.Tensor,
    second: torch.Tensor | None = None,
    second_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    return torch.empty_like(input)


@torch.library.custom_op("torchopt_lab::softmax_forward", mutates_args=())
def softmax_forward(input: torch.Tensor, dim: int, log: bool) -> torch.Tensor:
    """``softmax(input, dim)`` (``log_softmax`` when ``log``) on the row kernel, contiguous."""
    return _kernels.softmax_forward(input, dim, log)[0].contiguous()


@softmax_forward.register_fake
def _(input: torch.Tensor, dim: int, log: bool) -> torch.Tensor:
    return input.new_empty(input.shape)


@torch.library.custom_op("torchopt_lab::softmax_backward", mutates_args=())
def softmax_backward(
    grad_output: torch.Tensor, output: torch.Tensor, dim: int, log: bool
) -> torch.Tensor:
    """``dL/dx`` of (log-)softmax on the row kernel, contiguous."""
    return _kernels.softmax_backward(grad_output, output, dim, log).contiguous()


@softmax_backward.register_fake
def _(grad_output: torch.Tensor, output: torch.Tensor, dim: int, log: bool) -> torch.Tensor:
    return output.new_empty(output.shape)


@torch.library.custom_op("torchopt_lab::layer_norm_forward", mutates_args=())
def layer_norm_forward(
    input: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(y, μ, r)`` normalising the last dimension of contiguous rows on the Triton kernel."""
    return _kernels.layer_norm_forward(input, weight, bias, eps)


@layer_norm_forward.register_fake
def _(
    input: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    rows = math.prod(input.shape[:-1])
    dtype = _statistics_dtype(input.dtype)
    return (
        torch.empty_like(input),
        input.new_empty(rows, dtype=dtype),
        input.new_empty(rows, dtype=dtype),
    )


@torch.library.custom_op("torchopt_lab::layer_norm_backward", mutates_args=())
def layer_norm_backward(
    grad_output: torch.Tensor,
    input: torch.Tensor,
    weight: torch.Tensor | None,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    compute_parameter_grads: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dL/dx, dL/dw, dL/db)`` on the Triton kernels; the parameter gradients are empty unless
    ``compute_parameter_grads``."""
    grad_input, grad_weight, grad_bias = _kernels.layer_norm_backward(
        grad_output, input, weight, mean, rstd, compute_parameter_grads
    )
    if grad_weight is None:
        return grad_input, input.new_empty(0), input.new_empty(0)
    return grad_input, grad_weight, grad_bias


@layer_norm_backward.register_fake
def _(
    grad_output: torch.Tensor,
    input: torch.Tensor,
    weight: torch.Tensor | None,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    compute_parameter_grads: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    columns = input.shape[-1] if compute_parameter_grads else 0
    return torch.empty_like(input), input.new_empty(columns), input.new_empty(columns)
