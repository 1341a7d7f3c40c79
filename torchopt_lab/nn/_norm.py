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

from torchopt_lab.nn._function import forward_mode


def check_normalized_shape(
    op: str, input: torch.Tensor, normalized_shape: Any, separator: str
) -> list[int]:
    """torch's checks of ``normalized_shape`` for ``layer_norm``/``rms_norm``, with their exact
    messages (the two differ in ``separator`` after the ``*``); returns it as a list."""
    if not isinstance(normalized_shape, (list, tuple, torch.Size)):
        raise TypeError(
            f"{op}(): argument 'normalized_shape' (position 2) must be tuple of ints, not "
            f"{type(normalized_shape).__name__}"
        )
    normalized_shape = list(normalized_shape)
    count = len(normalized_shape)
    if count == 0 or list(input.shape[input.dim() - count :]) != normalized_shape:
        raise RuntimeError(
            f"Given normalized_shape={normalized_shape}, expected input with shape "
            f"[*{separator}{', '.join(map(str, normalized_shape))}], but got input of size"
            f"{list(input.shape)}"
        )
    return normalized_shape


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
