"""Root-mean-square layer normalisation (Zhang & Sennrich, 2019), ``torch.nn.functional.rms_norm``:
paired with ``triton_kernels/nn/rms_norm.py``: the functional with its validation, the torch-path
Function with a hand-written backward, the Triton-path Function on the kernels, and the module.

Over the trailing ``normalized_shape`` dimensions (``n`` elements): ``r = 1 / √(mean(x²) + eps)``,
``x̂ = x r``, ``y = w x̂``. With ``g = dL/dy``:

``dL/dx = r (w g - x̂ c_1)``, ``c_1 = mean(x̂ ⊙ w g)``, ``dL/dw = Σ_batch g x̂``.

``eps=None`` is ``torch.finfo(x.dtype).eps``; a float16/bfloat16 input is normalised in float32
and ``y`` has the input's dtype, as in torch. Triton: the kernels of
``triton_kernels/nn/rms_norm.py`` (the ``torchopt_lab::rms_norm_*`` custom ops), ``x`` flattened
to rows of the normalised elements; a weight of another dtype than the input's (torch computes
with it unrounded) runs the torch path, recorded as ``nn.rms_norm.dtype`` (torch).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from torchopt_lab.nn._autocast import autocast_inputs
from torchopt_lab.nn._common import check_normalized_shape, normalized_rows
from torchopt_lab.nn._dispatch import (
    first_order_only,
    no_forward_mode,
    record_torch_part,
    register_vmap_by_slices,
    statistics_dtype,
    triton_kernels,
    use_triton,
)
from torchopt_lab.nn._function import apply, forward_mode


def _rstd(input: torch.Tensor, dims: tuple[int, ...], eps: float) -> torch.Tensor:
    """``r = 1 / √(mean(x²) + eps)`` over ``dims``, kept as size-1 dimensions."""
    return torch.rsqrt((input * input).mean(dims, keepdim=True) + eps)


@forward_mode
class RMSNormFunction(torch.autograd.Function):
    r"""``y = w x r`` with ``r = 1 / √(mean(x²) + eps)`` over the last ``normalized_dims``
    dimensions; ``w`` (optional) has their shape. Keeps ``x`` and ``r``; a backward run with
    ``create_graph=True`` recomputes ``r`` from ``x`` so the second derivative sees it."""

    generate_vmap_rule = True

    @staticmethod
    def forward(
        input: torch.Tensor, normalized_dims: int, weight: torch.Tensor | None, eps: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        dims = tuple(range(input.dim() - normalized_dims, input.dim()))
        # float16/bfloat16 computed in float32 and the result in the input's dtype, as torch
        compute = input.float() if input.dtype in (torch.float16, torch.bfloat16) else input
        rstd = _rstd(compute, dims, eps)
        output = compute * rstd
        output = output if weight is None else output * weight
        return output.to(input.dtype), rstd

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], outputs: tuple[torch.Tensor, ...]) -> None:
        input, normalized_dims, weight, eps = inputs
        rstd = outputs[1]
        ctx.mark_non_differentiable(rstd)
        ctx.dims, ctx.eps = tuple(range(input.dim() - normalized_dims, input.dim())), eps
        ctx.save_for_backward(input, weight, rstd)
        ctx.save_for_forward(input, weight, rstd)

    @staticmethod
    def jvp(
        ctx: Any,
        input_tangent: torch.Tensor | None,
        _: None,
        weight_tangent: torch.Tensor | None,
        *__: None,
    ) -> tuple[torch.Tensor, None]:
        input, weight, rstd = ctx.saved_tensors
        # x̂ = x r
        normalized = input * rstd
        tangent = torch.zeros_like(normalized)
        if input_tangent is not None:
            # dx̂ = r (dx - x̂ mean(x̂ dx))
            grad_normalized = rstd * (
                input_tangent
                - normalized * (normalized * input_tangent).mean(ctx.dims, keepdim=True)
            )
            tangent = tangent + (grad_normalized if weight is None else weight * grad_normalized)
        if weight_tangent is not None:
            # dy += dw x̂
            tangent = tangent + weight_tangent * normalized
        return tangent.to(input.dtype), None

    @staticmethod
    def backward(
        ctx: Any, grad_output: torch.Tensor, _: torch.Tensor | None
    ) -> tuple[torch.Tensor | None, None, torch.Tensor | None, None]:
        input, weight, rstd = ctx.saved_tensors
        if torch.is_grad_enabled():
            rstd = _rstd(input, ctx.dims, ctx.eps)
        # x̂ = x r
        normalized = input * rstd
        # w g, the gradient with respect to x̂
        grad_normalized = grad_output if weight is None else grad_output * weight
        grad_input = grad_weight = None
        if ctx.needs_input_grad[0]:
            # c_1 = mean(x̂ ⊙ w g)
            c1 = (normalized * grad_normalized).mean(ctx.dims, keepdim=True)
            # dL/dx = r (w g - x̂ c_1)
            grad_input = rstd * (grad_normalized - normalized * c1)
        if weight is not None and ctx.needs_input_grad[2]:
            # dL/dw = Σ_batch g x̂
            grad_weight = (grad_output * normalized).sum_to_size(weight.shape)
        return grad_input, None, grad_weight, None


# The Triton path: the RMS-norm kernels as custom ops.


@torch.library.custom_op("torchopt_lab::rms_norm_forward", mutates_args=())
def rms_norm_forward(
    input: torch.Tensor, weight: torch.Tensor | None, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(y, r)`` normalising the last dimension of contiguous rows on the Triton kernel."""
    return triton_kernels().rms_norm_forward(input, weight, eps)


@rms_norm_forward.register_fake
def _(
    input: torch.Tensor, weight: torch.Tensor | None, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    rows = math.prod(input.shape[:-1])
    return torch.empty_like(input), input.new_empty(rows, dtype=statistics_dtype(input.dtype))


@torch.library.custom_op("torchopt_lab::rms_norm_backward", mutates_args=())
def rms_norm_backward(
    grad_output: torch.Tensor,
    input: torch.Tensor,
    weight: torch.Tensor | None,
    rstd: torch.Tensor,
    compute_weight_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dL/dx, dL/dw)`` on the Triton kernels; ``dL/dw`` is empty without a weight or unless
    ``compute_weight_grad`` (a custom op returns tensors, not None)."""
    grad_input, grad_weight = triton_kernels().rms_norm_backward(
        grad_output, input, weight, rstd, compute_weight_grad
    )
    return grad_input, input.new_empty(0) if grad_weight is None else grad_weight


@rms_norm_backward.register_fake
def _(
    grad_output: torch.Tensor,
    input: torch.Tensor,
    weight: torch.Tensor | None,
    rstd: torch.Tensor,
    compute_weight_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    with_weight = weight is not None and compute_weight_grad
    return torch.empty_like(input), (
        torch.empty_like(weight) if with_weight else input.new_empty(0)
    )


register_vmap_by_slices(rms_norm_forward)
register_vmap_by_slices(rms_norm_backward)


@forward_mode
class RMSNormTritonFunction(torch.autograd.Function):
    """RMS normalisation over the trailing ``normalized_dims`` dimensions (flattened into one
    row) on the RMS-norm kernels; keeps ``x``, ``w`` and ``r`` (the second output)."""

    generate_vmap_rule = True
    jvp = no_forward_mode("rms_norm")

    @staticmethod
    def forward(
        input: torch.Tensor, normalized_dims: int, weight: torch.Tensor | None, eps: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        rows = normalized_rows(input, normalized_dims)
        flat_weight = None if weight is None else weight.contiguous().reshape(rows.shape[1])
        output, rstd = rms_norm_forward(rows, flat_weight, eps)
        return output.reshape(input.shape), rstd

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], outputs: tuple[torch.Tensor, ...]) -> None:
        input, ctx.normalized_dims, weight, _ = inputs
        ctx.mark_non_differentiable(outputs[1])
        ctx.save_for_backward(input, weight, outputs[1])

    @staticmethod
    @first_order_only
    @once_differentiable
    def backward(ctx: Any, grad_output: torch.Tensor, _: Any) -> tuple[torch.Tensor | None, ...]:
        input, weight, rstd = ctx.saved_tensors
        rows = normalized_rows(input, ctx.normalized_dims)
        flat_weight = None if weight is None else weight.contiguous().reshape(rows.shape[1])
        with_weight = weight is not None and ctx.needs_input_grad[2]
        # dL/dx = r (w g - x̂ c_1); dL/dw = Σ_rows g x̂
        grad_input, grad_weight = rms_norm_backward(
            grad_output.contiguous().reshape(rows.shape), rows, flat_weight, rstd, with_weight
        )
        grad_weight = grad_weight.reshape(weight.shape) if with_weight else None
        return grad_input.reshape(input.shape), None, grad_weight, None


def rms_norm(
    input: torch.Tensor,
    normalized_shape: list[int] | tuple[int, ...] | torch.Size,
    weight: torch.Tensor | None = None,
    eps: float | None = None,
) -> torch.Tensor:
    """RMS normalisation over the trailing ``normalized_shape`` dimensions, as
    ``torch.nn.functional.rms_norm``; see :class:`RMSNormFunction`."""
    normalized_shape = check_normalized_shape("rms_norm", input, normalized_shape, "")
    count = len(normalized_shape)
    if weight is not None and list(weight.shape) != normalized_shape:
        raise RuntimeError(
            "Expected weight to be of same shape as normalized_shape, but got weight of shape "
            f"{list(weight.shape)} and normalized_shape = {normalized_shape}"
        )
    if not input.is_floating_point():
        raise NotImplementedError(
            f"rms_norm is not implemented for {input.dtype} tensors; it needs a floating-point "
            "dtype"
        )
    input, weight = autocast_inputs("rms_norm", input, weight)
    if eps is None:
        # torch's default: the machine epsilon of the dtype it computes in (float32 for
        # float16/bfloat16 inputs), not of the input's dtype (bfloat16's is 2^-7)
        low_precision = input.dtype in (torch.float16, torch.bfloat16)
        eps = torch.finfo(torch.float32 if low_precision else input.dtype).eps
    if use_triton("rms_norm", input, weight):
        if weight is None or weight.dtype == input.dtype:
            return apply(RMSNormTritonFunction, input, count, weight, eps)[0]
        record_torch_part("nn.rms_norm.dtype", input.device)
    return apply(RMSNormFunction, input, count, weight, eps)[0]


class RMSNorm(nn.RMSNorm):
    """:class:`torch.nn.RMSNorm` running :func:`rms_norm`."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return rms_norm(input, self.normalized_shape, self.weight, self.eps)
