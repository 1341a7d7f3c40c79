"""Layer and batch normalisation, ``torch.nn.functional.layer_norm`` and ``batch_norm``, paired
with ``triton_kernels/nn/layer_norm.py`` and ``batch_norm.py``: the functionals with their
validation, the torch-path Functions with hand-written backward passes, the Triton-path Functions
on the kernels (the ``torchopt_lab::layer_norm_*``, ``batch_norm_*`` and ``channel_affine``
custom ops), and the modules. The two share the statistics and the derivative below.

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

import math
from typing import Any

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from torchopt_lab.nn._autocast import autocast_inputs
from torchopt_lab.nn._common import (
    check_dtype,
    check_floating,
    check_normalized_shape,
    normalized_rows,
)
from torchopt_lab.nn._dispatch import (
    first_order_only,
    no_forward_mode,
    register_vmap_by_slices,
    statistics_dtype,
    triton_kernels,
    use_triton,
)
from torchopt_lab.nn._function import apply, forward_mode


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


def _normalized_tangent(
    input: torch.Tensor,
    weight: torch.Tensor | None,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    dims: tuple[int, ...] | None,
    input_tangent: torch.Tensor | None,
    weight_tangent: torch.Tensor | None,
    bias_tangent: torch.Tensor | None,
) -> torch.Tensor:
    """The forward-mode derivative ``dy = w dx̂ + dw x̂ + db`` of ``y = w x̂ + b``, with
    ``dx̂ = r (dx - mean(dx) - x̂ mean(x̂ dx))`` over ``dims``, or ``dx̂ = r dx`` when the
    statistics are constants (``dims`` None: batch norm in evaluation)."""
    # x̂ = (x - μ) r
    normalized = (input - mean) * rstd
    tangent = torch.zeros_like(input)
    if input_tangent is not None:
        if dims is None:
            # dx̂ = r dx
            grad_normalized = rstd * input_tangent
        else:
            # dx̂ = r (dx - mean(dx) - x̂ mean(x̂ dx))
            grad_normalized = rstd * (
                input_tangent
                - input_tangent.mean(dims, keepdim=True)
                - normalized * (normalized * input_tangent).mean(dims, keepdim=True)
            )
        tangent = tangent + (grad_normalized if weight is None else weight * grad_normalized)
    if weight_tangent is not None:
        # + dw x̂
        tangent = tangent + weight_tangent * normalized
    if bias_tangent is not None:
        # + db
        tangent = tangent + bias_tangent
    return tangent


@forward_mode
class LayerNormFunction(torch.autograd.Function):
    r"""Layer normalisation (Ba et al., 2016) over the trailing dimensions ``normalized_shape``;
    ``w`` and ``b`` have that shape and are shared along the leading (batch) dimensions. The
    forward is torch's fused ``native_layer_norm`` kernel, which also returns ``μ`` and ``r``."""

    generate_vmap_rule = True

    @staticmethod
    def forward(
        input: torch.Tensor,
        normalized_dims: int,
        weight: torch.Tensor | None,
        bias: torch.Tensor | None,
        eps: float,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return torch.native_layer_norm(
            input, input.shape[input.dim() - normalized_dims :], weight, bias, eps
        )

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], outputs: tuple[torch.Tensor, ...]) -> None:
        input, normalized_dims, weight, bias, eps = inputs
        _, mean, rstd = outputs
        ctx.mark_non_differentiable(mean, rstd)
        ctx.dims, ctx.eps = tuple(range(input.dim() - normalized_dims, input.dim())), eps
        ctx.save_for_backward(input, weight, bias, mean, rstd)
        ctx.save_for_forward(input, weight, mean, rstd)

    @staticmethod
    def jvp(
        ctx: Any,
        input_tangent: torch.Tensor | None,
        _: None,
        weight_tangent: torch.Tensor | None,
        bias_tangent: torch.Tensor | None,
        *__: None,
    ) -> tuple[torch.Tensor, None, None]:
        input, weight, mean, rstd = ctx.saved_tensors
        return (
            _normalized_tangent(
                input, weight, mean, rstd, ctx.dims, input_tangent, weight_tangent, bias_tangent
            ),
            None,
            None,
        )

    @staticmethod
    def backward(
        ctx: Any, grad_output: torch.Tensor, *_: torch.Tensor | None
    ) -> tuple[torch.Tensor | None, ...]:
        input, weight, bias, mean, rstd = ctx.saved_tensors
        dims = ctx.dims
        if torch.is_grad_enabled():
            mean, rstd = _statistics(input, dims, ctx.eps)
        # x̂ = (x - μ) r (the subtraction's fresh result scaled in place)
        normalized = (input - mean).mul_(rstd)
        # w g, the gradient with respect to x̂
        grad_normalized = grad_output if weight is None else grad_output * weight
        grad_input = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            # c_1 = mean(x̂ ⊙ w g), over the normalised dimensions
            c1 = (normalized * grad_normalized).mean(dims, keepdim=True)
            # c_2 = mean(w g)
            c2 = grad_normalized.mean(dims, keepdim=True)
            # dL/dx = r (w g - x̂ c_1 - c_2) = (r w g - r c_2) - (r c_1) x̂, in place
            grad_input = normalized * (-rstd * c1)
            grad_input.addcmul_(grad_normalized, rstd).sub_(rstd * c2)
        # (sum_to_size, as sum(()) over no batch dimensions would sum over every dimension when
        # normalized_shape covers the whole input)
        if weight is not None and ctx.needs_input_grad[2]:
            # dL/dw = Σ_batch g x̂
            grad_weight = (grad_output * normalized).sum_to_size(weight.shape)
        if bias is not None and ctx.needs_input_grad[3]:
            # dL/db = Σ_batch g
            grad_bias = grad_output.sum_to_size(bias.shape)
        return grad_input, None, grad_weight, grad_bias, None


def _channel_view(tensor: torch.Tensor, ndim: int) -> torch.Tensor:
    """A per-channel vector shaped to broadcast along dimension 1 of an ``ndim``-D input."""
    return tensor.reshape([1, -1] + [1] * (ndim - 2))


@forward_mode
class BatchNormFunction(torch.autograd.Function):
    r"""Batch normalisation (Ioffe & Szegedy, 2015) of ``x`` of shape ``[N, C, *]`` per channel.

    Training: ``μ``, ``σ²`` over the ``n = N · Π *`` elements of a channel, and the running
    statistics (when given) updated in place, ``running_mean ← (1 - m) running_mean + m μ``,
    ``running_var ← (1 - m) running_var + m σ² n / (n - 1)`` (unbiased). Evaluation: ``μ`` and
    ``σ²`` are the running statistics, constants, so ``dL/dx = r w g``. The forward is torch's
    fused ``native_batch_norm`` kernel (one pass, torch's exact running-statistics update).

    The backward reads the per-channel sums ``S_g = Σ g`` and ``S_gx = Σ g x`` once:
    ``dL/db = S_g``, ``dL/dw = Σ g x̂ = r (S_gx - μ S_g)``, ``c_1 = w dL/dw / n``,
    ``c_2 = w dL/db / n``, and ``dL/dx = r (w g - x̂ c_1 - c_2)`` is evaluated in three passes as
    ``(w r) g - (r² c_1) x + r (r c_1 μ - c_2)``.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(
        input: torch.Tensor,
        running_mean: torch.Tensor | None,
        running_var: torch.Tensor | None,
        weight: torch.Tensor | None,
        bias: torch.Tensor | None,
        training: bool,
        momentum: float,
        eps: float,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if input.numel() == 0:
            # Nothing to normalise, no statistics to update (as in torch).
            output, mean, rstd = input.clone(), input.new_zeros(0), input.new_zeros(0)
        else:
            output, mean, rstd = torch.native_batch_norm(
                input, weight, bias, running_mean, running_var, training, momentum, eps
            )
        if not training:
            # Copies: the running statistics may change before the backward runs.
            mean, rstd = running_mean.clone(), torch.rsqrt(running_var + eps)
        return output, mean, rstd

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], outputs: tuple[torch.Tensor, ...]) -> None:
        input, _, _, weight, _, training, _, eps = inputs
        _, mean, rstd = outputs
        ctx.mark_non_differentiable(mean, rstd)
        ctx.dims, ctx.training, ctx.eps = (0, *range(2, input.dim())), training, eps
        ctx.save_for_backward(input, weight, mean, rstd)
        ctx.save_for_forward(input, weight, mean, rstd)

    @staticmethod
    def jvp(
        ctx: Any,
        input_tangent: torch.Tensor | None,
        _: None,
        __: None,
        weight_tangent: torch.Tensor | None,
        bias_tangent: torch.Tensor | None,
        *___: None,
    ) -> tuple[torch.Tensor, None, None]:
        input, weight, mean, rstd = ctx.saved_tensors
        shape = [1, -1] + [1] * (input.dim() - 2)
        tangent = _normalized_tangent(
            input,
            None if weight is None else weight.reshape(shape),
            mean.reshape(shape),
            rstd.reshape(shape),
            ctx.dims if ctx.training else None,
            input_tangent,
            None if weight_tangent is None else weight_tangent.reshape(shape),
            None if bias_tangent is None else bias_tangent.reshape(shape),
        )
        return tangent, None, None

    @staticmethod
    def backward(
        ctx: Any, grad_output: torch.Tensor, *_: torch.Tensor | None
    ) -> tuple[torch.Tensor | None, ...]:
        input, weight, mean, rstd = ctx.saved_tensors
        if input.dtype in (torch.float16, torch.bfloat16):
            # Accumulate in float32, as torch's kernel does: S_gx - μ S_g cancels, which in
            # bfloat16 leaves rounding noise (autograd casts the gradients back to x's dtype).
            input, grad_output = input.float(), grad_output.float()
        dims, ndim = ctx.dims, input.dim()
        count = input.numel() // input.shape[1]
        if input.numel() == 0:
            # dL/dx: empty like x
            grad_input = torch.zeros_like(input) if ctx.needs_input_grad[0] else None
            # dL/dw = dL/db = 0: sums over no elements
            grad_weight = input.new_zeros(input.shape[1]) if ctx.needs_input_grad[3] else None
            grad_bias = input.new_zeros(input.shape[1]) if ctx.needs_input_grad[4] else None
            return grad_input, None, None, grad_weight, grad_bias, None, None, None
        if ctx.training and torch.is_grad_enabled():
            mean, rstd = (t.reshape(-1) for t in _statistics(input, dims, ctx.eps))
        # S_g = Σ g, which is dL/db
        grad_bias = grad_output.sum(dims)
        # dL/dw = Σ g x̂ = r (S_gx - μ S_g)
        grad_weight = rstd * ((grad_output * input).sum(dims) - mean * grad_bias)
        grad_input = None
        if ctx.needs_input_grad[0]:
            affine = torch.ones_like(rstd) if weight is None else weight
            scale = affine * rstd
            if ctx.training:
                # c_1 = w dL/dw / n
                c1 = affine * grad_weight / count
                # c_2 = w dL/db / n
                c2 = affine * grad_bias / count
                # -(r² c_1) x, the x term of dL/dx (a fresh tensor, updated in place below)
                grad_input = input * _channel_view(-rstd * rstd * c1, ndim)
                # dL/dx = (w r) g - (r² c_1) x + r (r c_1 μ - c_2)
                grad_input.addcmul_(grad_output, _channel_view(scale, ndim)).add_(
                    _channel_view(rstd * (rstd * c1 * mean - c2), ndim)
                )
            else:
                # dL/dx = r w g (μ and r are the running statistics, constants)
                grad_input = grad_output * _channel_view(scale, ndim)
        return (
            grad_input,
            None,
            None,
            grad_weight if ctx.needs_input_grad[3] else None,
            grad_bias if ctx.needs_input_grad[4] else None,
            None,
            None,
            None,
        )


# The Triton path: the layer-norm and batch-norm kernels as custom ops.


@torch.library.custom_op("torchopt_lab::layer_norm_forward", mutates_args=())
def layer_norm_forward(
    input: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(y, μ, r)`` normalising the last dimension of contiguous rows on the Triton kernel."""
    return triton_kernels().layer_norm_forward(input, weight, bias, eps)


@layer_norm_forward.register_fake
def _(
    input: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    rows = math.prod(input.shape[:-1])
    dtype = statistics_dtype(input.dtype)
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
    grad_input, grad_weight, grad_bias = triton_kernels().layer_norm_backward(
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


@torch.library.custom_op("torchopt_lab::batch_norm_statistics", mutates_args=())
def batch_norm_statistics(input: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(μ, σ²)`` per channel of a contiguous ``[N, C, *]`` input on the Triton kernel."""
    return triton_kernels().batch_norm_statistics(input)


@batch_norm_statistics.register_fake
def _(input: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    dtype = statistics_dtype(input.dtype)
    return input.new_empty(input.shape[1], dtype=dtype), input.new_empty(
        input.shape[1], dtype=dtype
    )


@torch.library.custom_op("torchopt_lab::batch_norm_gradient_sums", mutates_args=())
def batch_norm_gradient_sums(
    grad_output: torch.Tensor, input: torch.Tensor, mean: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(Σ g, Σ g (x - μ))`` per channel on the Triton kernel."""
    return triton_kernels().batch_norm_gradient_sums(grad_output, input, mean)


@batch_norm_gradient_sums.register_fake
def _(
    grad_output: torch.Tensor, input: torch.Tensor, mean: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    dtype = statistics_dtype(input.dtype)
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
    return triton_kernels().channel_affine(input, scale, shift, second, second_scale)


@channel_affine.register_fake
def _(
    input: torch.Tensor,
    scale: torch.Tensor,
    shift: torch.Tensor,
    second: torch.Tensor | None = None,
    second_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    return torch.empty_like(input)


register_vmap_by_slices(layer_norm_forward)
register_vmap_by_slices(layer_norm_backward)
register_vmap_by_slices(batch_norm_statistics)
register_vmap_by_slices(batch_norm_gradient_sums)
register_vmap_by_slices(channel_affine)


def _flat(parameter: torch.Tensor | None, rows: torch.Tensor) -> torch.Tensor | None:
    """A weight or bias as one contiguous row; float32 parameters of a float16/bfloat16 input are
    read in the input's dtype."""
    if parameter is None:
        return None
    return parameter.to(rows.dtype).contiguous().reshape(rows.shape[1])


def _kernel_rows(
    input: torch.Tensor, normalized_dims: int, weight: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """What the layer-norm kernels read, as forward and backward both build it: the input as rows
    (:func:`normalized_rows`) and the weight as one row (:func:`_flat`)."""
    rows = normalized_rows(input, normalized_dims)
    return rows, _flat(weight, rows)


@forward_mode
class LayerNormTritonFunction(torch.autograd.Function):
    """Layer normalisation over the trailing ``normalized_dims`` dimensions (flattened into one
    row) on the layer-norm kernels; keeps ``x``, ``w``, and ``μ`` and ``r`` (the second and third
    outputs)."""

    generate_vmap_rule = True
    jvp = no_forward_mode("layer_norm")

    @staticmethod
    def forward(
        input: torch.Tensor,
        normalized_dims: int,
        weight: torch.Tensor | None,
        bias: torch.Tensor | None,
        eps: float,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        rows, flat_weight = _kernel_rows(input, normalized_dims, weight)
        output, mean, rstd = layer_norm_forward(rows, flat_weight, _flat(bias, rows), eps)
        return output.reshape(input.shape), mean, rstd

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], outputs: tuple[torch.Tensor, ...]) -> None:
        input, ctx.normalized_dims, weight, _, _ = inputs
        ctx.mark_non_differentiable(*outputs[1:])
        ctx.save_for_backward(input, weight, *outputs[1:])

    @staticmethod
    @first_order_only
    @once_differentiable
    def backward(ctx: Any, grad_output: torch.Tensor, *_: Any) -> tuple[torch.Tensor | None, ...]:
        input, weight, mean, rstd = ctx.saved_tensors
        rows, flat_weight = _kernel_rows(input, ctx.normalized_dims, weight)
        normalized_shape = input.shape[input.dim() - ctx.normalized_dims :]
        parameters = ctx.needs_input_grad[2] or ctx.needs_input_grad[3]
        # dL/dx = r (w g - x̂ c_1 - c_2); dL/dw = Σ g x̂, dL/db = Σ g (partial sums, added)
        grad_input, grad_weight, grad_bias = layer_norm_backward(
            grad_output.contiguous().reshape(rows.shape),
            rows,
            flat_weight,
            mean,
            rstd,
            parameters,
        )
        grad_weight = grad_weight.reshape(normalized_shape) if ctx.needs_input_grad[2] else None
        grad_bias = grad_bias.reshape(normalized_shape) if ctx.needs_input_grad[3] else None
        return grad_input.reshape(input.shape), None, grad_weight, grad_bias, None


@forward_mode
class BatchNormTritonFunction(torch.autograd.Function):
    """Batch normalisation of ``[N, C, *]`` on the batch-norm kernels: statistics (training), the
    per-channel affine map ``y = (w r) x + (b - μ w r)``, and in backward the per-channel sums
    ``Σ g``, ``Σ g (x - μ)`` and the affine map ``dL/dx = (w r) g - (r² c_1) x + r (r c_1 μ -
    c_2)``. The running statistics are updated in torch ops on the ``[C]`` vectors, as torch
    does: ``(1 - m) running + m · batch`` with the unbiased batch variance. ``μ`` and ``r`` are
    the second and third outputs."""

    generate_vmap_rule = True
    jvp = no_forward_mode("batch_norm")

    @staticmethod
    def forward(
        input: torch.Tensor,
        running_mean: torch.Tensor | None,
        running_var: torch.Tensor | None,
        weight: torch.Tensor | None,
        bias: torch.Tensor | None,
        training: bool,
        momentum: float,
        eps: float,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = input.contiguous()
        if x.numel() == 0:
            # Nothing to normalise, no statistics to update (as in torch).
            return x.clone(), x.new_empty(0), x.new_empty(0)
        channels = x.shape[1]
        count = x.numel() // channels if channels else 0
        statistics_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        if training:
            mean, variance = batch_norm_statistics(x)
            with torch.no_grad():
                if running_mean is not None:
                    running_mean.mul_(1 - momentum).add_(
                        mean.to(running_mean.dtype), alpha=momentum
                    )
                if running_var is not None:
                    unbiased = variance * (count / max(count - 1, 1))
                    running_var.mul_(1 - momentum).add_(
                        unbiased.to(running_var.dtype), alpha=momentum
                    )
        else:
            mean = running_mean.to(statistics_dtype).clone()
            variance = running_var.to(statistics_dtype)
        # r = 1 / √(σ² + eps)
        rstd = torch.rsqrt(variance + eps)
        affine = torch.ones_like(rstd) if weight is None else weight.to(statistics_dtype)
        shift = -mean * affine * rstd
        if bias is not None:
            shift = shift + bias.to(statistics_dtype)
        # y = (w r) x + (b - μ w r)
        output = channel_affine(x, (affine * rstd).contiguous(), shift.contiguous())
        return output, mean, rstd

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], outputs: tuple[torch.Tensor, ...]) -> None:
        input, _, _, weight, _, training, _, _ = inputs
        ctx.empty = input.numel() == 0
        channels = input.shape[1] if input.dim() > 1 else 0
        ctx.options = (training, input.numel() // channels if channels else 0)
        ctx.mark_non_differentiable(*outputs[1:])
        ctx.save_for_backward(input, weight, *outputs[1:])

    @staticmethod
    @first_order_only
    @once_differentiable
    def backward(ctx: Any, grad_output: torch.Tensor, *_: Any) -> tuple[torch.Tensor | None, ...]:
        if ctx.empty:
            # dL/dx: empty like x; dL/dw = dL/db = 0, sums over no elements
            zeros = grad_output.new_zeros(grad_output.shape[1])
            grad_weight = zeros if ctx.needs_input_grad[3] else None
            grad_bias = zeros.clone() if ctx.needs_input_grad[4] else None
            grad_input = torch.zeros_like(grad_output)
            return grad_input, None, None, grad_weight, grad_bias, None, None, None
        input, weight, mean, rstd = ctx.saved_tensors
        x = input.contiguous()
        training, count = ctx.options
        g = grad_output.contiguous()
        affine = torch.ones_like(rstd) if weight is None else weight.to(rstd.dtype)
        # S_g = Σ g = dL/db, and Σ g (x - μ)
        grad_bias, centered_dot = batch_norm_gradient_sums(g, x, mean)
        # dL/dw = Σ g x̂ = r Σ g (x - μ)
        grad_weight = rstd * centered_dot
        grad_input = None
        if ctx.needs_input_grad[0]:
            if training:
                # c_1 = w dL/dw / n, c_2 = w dL/db / n
                c1 = affine * grad_weight / count
                c2 = affine * grad_bias / count
                # dL/dx = (w r) g - (r² c_1) x + r (r c_1 μ - c_2)
                grad_input = channel_affine(
                    x,
                    (-rstd * rstd * c1).contiguous(),
                    (rstd * (rstd * c1 * mean - c2)).contiguous(),
                    g,
                    (affine * rstd).contiguous(),
                )
            else:
                # dL/dx = (w r) g (μ and r are the running statistics, constants)
                grad_input = channel_affine(g, (affine * rstd).contiguous(), torch.zeros_like(rstd))
        parameter_dtype = x.dtype if weight is None else weight.dtype
        grad_weight = grad_weight.to(parameter_dtype) if ctx.needs_input_grad[3] else None
        grad_bias = grad_bias.to(parameter_dtype) if ctx.needs_input_grad[4] else None
        return grad_input, None, None, grad_weight, grad_bias, None, None, None


def layer_norm(
    input: torch.Tensor,
    normalized_shape: list[int] | tuple[int, ...] | torch.Size,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
) -> torch.Tensor:
    """Layer normalisation over the trailing ``normalized_shape`` dimensions; see
    :class:`LayerNormFunction`."""
    input, weight, bias = autocast_inputs("layer_norm", input, weight, bias)
    normalized_shape = check_normalized_shape("layer_norm", input, normalized_shape, ", ")
    count = len(normalized_shape)
    for name, tensor in (("weight", weight), ("bias", bias)):
        if tensor is not None and list(tensor.shape) != normalized_shape:
            raise RuntimeError(
                f"Expected {name} to be of same shape as normalized_shape, but got {name} of "
                f"shape {list(tensor.shape)} and normalized_shape = {normalized_shape}"
            )
    check_floating("layer_norm", input)
    check_dtype("layer_norm", input, weight=weight, bias=bias)
    if use_triton("layer_norm", input, weight, bias):
        return apply(LayerNormTritonFunction, input, count, weight, bias, eps)[0]
    return apply(LayerNormFunction, input, count, weight, bias, eps)[0]


def batch_norm(
    input: torch.Tensor,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> torch.Tensor:
    """Batch normalisation over dimension 1 of ``[N, C, *]``; in training it updates
    ``running_mean``/``running_var`` in place (when given) as torch does; see
    :class:`BatchNormFunction`."""
    if training:
        if input.dim() == 0:
            raise IndexError("batch_norm expects an input of shape [N, C, *], got a 0-D input")
        # torch's rule: N times the spatial size, not counting C (1 for [1, 0] too)
        if input.shape[0] * math.prod(input.shape[2:]) == 1:
            raise ValueError(
                "Expected more than 1 value per channel when training, got input size "
                f"{input.size()}"
            )
    if training and eps <= 0.0:
        raise ValueError(f"batch_norm eps must be positive during training, but got {eps}")
    if eps < 0.0:
        raise ValueError(f"batch_norm eps must be non-negative, but got {eps}")
    if input.dim() == 1 and input.numel() == 0:
        # torch returns an empty result for an empty 1-D input, whatever the other arguments
        return input.clone()
    if input.dim() < 2:
        # torch's errors: a 1-D input has no channel dimension (0 channels for the per-channel
        # tensors, an IndexError for the rest); a 0-D one fails a size check
        for name, tensor in (
            ("running_mean", running_mean),
            ("running_var", running_var),
            ("weight", weight),
            ("bias", bias),
        ):
            if input.dim() == 1 and tensor is not None and tensor.numel():
                raise RuntimeError(f"{name} should contain 0 elements not {tensor.numel()}")
        error = IndexError if input.dim() == 1 else RuntimeError
        raise error(
            f"batch_norm expects an input of shape [N, C, *], got input of size {list(input.shape)}"
        )
    channels = input.shape[1]
    for name, tensor in (
        ("weight", weight),
        ("bias", bias),
        ("running_mean", running_mean),
        ("running_var", running_var),
    ):
        if tensor is not None and tensor.numel() != channels:
            raise RuntimeError(f"{name} should contain {channels} elements not {tensor.numel()}")
    if not training and (running_mean is None or running_var is None):
        missing = "running_mean" if running_mean is None else "running_var"
        raise RuntimeError(f"{missing} must be defined in evaluation mode")
    check_floating("batch_norm", input)
    check_dtype(
        "batch_norm",
        input,
        weight=weight,
        bias=bias,
        running_mean=running_mean,
        running_var=running_var,
    )
    if use_triton("batch_norm", input, weight, bias):
        return apply(
            BatchNormTritonFunction,
            input,
            running_mean,
            running_var,
            weight,
            bias,
            training,
            momentum,
            eps,
        )[0]
    return apply(
        BatchNormFunction, input, running_mean, running_var, weight, bias, training, momentum, eps
    )[0]


class LayerNorm(nn.LayerNorm):
    """:class:`torch.nn.LayerNorm` running :func:`layer_norm`."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return layer_norm(input, self.normalized_shape, self.weight, self.bias, self.eps)


class _BatchNormForward:
    """The forward of torch's ``_BatchNorm``, calling our ``batch_norm``: ``momentum=None``
    means a cumulative moving average (factor ``1 / num_batches_tracked``)."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(input)
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:
                factor = 1.0 / float(self.num_batches_tracked)
        # Batch statistics in training, and in evaluation when no running statistics are kept.
        use_batch_statistics = self.training or (
            self.running_mean is None and self.running_var is None
        )
        # The running statistics are passed only where they are used or updated.
        keep = not self.training or self.track_running_stats
        return batch_norm(
            input,
            self.running_mean if keep else None,
            self.running_var if keep else None,
            self.weight,
            self.bias,
            use_batch_statistics,
            factor,
            self.eps,
        )


class BatchNorm1d(_BatchNormForward, nn.BatchNorm1d):
    """:class:`torch.nn.BatchNorm1d` running :func:`batch_norm`."""


class BatchNorm2d(_BatchNormForward, nn.BatchNorm2d):
    """:class:`torch.nn.BatchNorm2d` running :func:`batch_norm`."""
