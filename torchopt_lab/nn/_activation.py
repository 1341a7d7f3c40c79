"""Elementwise activations as autograd Functions with hand-written backward passes.

Notation: ``x`` the input, ``y`` the output, ``g = dL/dy`` the incoming gradient. Every backward is
written with differentiable torch ops, so differentiating it again (double backward) is exact.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from torchopt_lab.nn._function import forward_mode


@forward_mode
class ReLUFunction(torch.autograd.Function):
    r"""``y = max(x, 0)``; ``dy/dx = 1[y > 0]`` (and 1 where ``y`` is NaN, as torch).

    ``inplace=True`` overwrites ``x`` with ``y`` (the mask is read back from ``y``, which is
    positive exactly where ``x`` is).
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(input: torch.Tensor, inplace: bool) -> torch.Tensor:
        return input.clamp_(min=0) if inplace else input.clamp(min=0)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
        if inputs[1]:
            ctx.mark_dirty(output)
        ctx.save_for_backward(output)
        ctx.save_for_forward(output)

    @staticmethod
    def jvp(ctx: Any, input_tangent: torch.Tensor, _: None) -> torch.Tensor:
        (output,) = ctx.saved_tensors
        # dy = dx * 1[y > 0]
        return torch.where(output > 0, input_tangent, 0)

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, None]:
        (output,) = ctx.saved_tensors
        # dL/dx = g where y > 0 or y is NaN, exactly 0 where y <= 0 even for a non-finite g:
        # torch's own relu backward, one fused pass (g · sign(y) gave 0 at NaN and NaN for an
        # infinite g), differentiable again (its derivative in g is itself, in y zero)
        grad_input = torch.ops.aten.threshold_backward(grad_output, output, 0)
        return grad_input, None


@forward_mode
class LeakyReLUFunction(torch.autograd.Function):
    r"""``y = x if x > 0 else a * x`` with ``a = negative_slope``; ``dy/dx = 1 if x > 0 else a``.

    ``inplace=True`` reads the sign of ``x`` back from ``y``, which needs ``a >= 0`` when the
    result is differentiated.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(input: torch.Tensor, negative_slope: float, inplace: bool) -> torch.Tensor:
        if inplace:
            positive = input > 0
            return input.mul_(torch.where(positive, 1.0, negative_slope).to(input.dtype))
        return torch.where(input > 0, input, input * negative_slope)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
        input, negative_slope, inplace = inputs
        ctx.negative_slope = negative_slope
        if inplace:
            ctx.mark_dirty(output)
        # In place, x survives only as y, whose sign is x's when a >= 0 (functional checks a).
        ctx.save_for_backward(output if inplace else input)
        ctx.save_for_forward(output if inplace else input)

    @staticmethod
    def jvp(ctx: Any, input_tangent: torch.Tensor, *_: None) -> torch.Tensor:
        (signed,) = ctx.saved_tensors
        # dy = dx * (1 if x > 0 else a)
        return torch.where(signed > 0, input_tangent, input_tangent * ctx.negative_slope)

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, None, None]:
        (signed,) = ctx.saved_tensors
        # dL/dx = g * (1 if x > 0 else a)
        grad_input = torch.where(signed > 0, grad_output, grad_output * ctx.negative_slope)
        return grad_input, None, None


@forward_mode
class SigmoidFunction(torch.autograd.Function):
    r"""``y = 1 / (1 + exp(-x))``; ``dy/dx = y (1 - y)``."""

    generate_vmap_rule = True

    @staticmethod
    def forward(input: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(input)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
        ctx.save_for_backward(output)
        ctx.save_for_forward(output)

    @staticmethod
    def jvp(ctx: Any, input_tangent: torch.Tensor) -> torch.Tensor:
        (output,) = ctx.saved_tensors
        # dy = dx * y * (1 - y)
        return input_tangent * output * (1 - output)

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> torch.Tensor:
        (output,) = ctx.saved_tensors
        # dL/dx = g * y * (1 - y), conjugated for a complex input (torch's convention; a no-op on
        # real tensors)
        return grad_output * (output * (1 - output)).conj()


@forward_mode
class TanhFunction(torch.autograd.Function):
    r"""``y = tanh(x)``; ``dy/dx = 1 - y^2``."""

    generate_vmap_rule = True

    @staticmethod
    def forward(input: torch.Tensor) -> torch.Tensor:
        return torch.tanh(input)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
        ctx.save_for_backward(output)
        ctx.save_for_forward(output)

    @staticmethod
    def jvp(ctx: Any, input_tangent: torch.Tensor) -> torch.Tensor:
        (output,) = ctx.saved_tensors
        # dy = dx * (1 - y^2)
        return input_tangent * (1 - output * output)

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> torch.Tensor:
        (output,) = ctx.saved_tensors
        # dL/dx = g * (1 - y^2), conjugated for a complex input (as for the sigmoid)
        return grad_output * (1 - output * output).conj()


_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_INV_SQRT_2 = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
_GELU_CUBIC = 0.044715


@forward_mode
class GELUFunction(torch.autograd.Function):
    r"""Gaussian error linear unit (Hendrycks & Gimpel, 2016).

    ``approximate="none"``: ``y = x Φ(x)`` with ``Φ(x) = (1 + erf(x / √2)) / 2`` and
    ``φ(x) = exp(-x² / 2) / √(2π)``, so ``dy/dx = Φ(x) + x φ(x)``.

    ``approximate="tanh"``: ``y = x (1 + t) / 2`` with ``t = tanh(u)``,
    ``u = √(2/π) (x + 0.044715 x³)``, so
    ``dy/dx = (1 + t) / 2 + x (1 - t²) √(2/π) (1 + 3 · 0.044715 x²) / 2``.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(input: torch.Tensor, approximate: str) -> torch.Tensor:
        return torch.nn.functional.gelu(input, approximate=approximate)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
        input, ctx.approximate = inputs
        ctx.save_for_backward(input)
        ctx.save_for_forward(input)

    @staticmethod
    def jvp(ctx: Any, input_tangent: torch.Tensor, _: None) -> torch.Tensor:
        # dy = dx * dy/dx: the backward's formula with g = dx
        return GELUFunction.backward(ctx, input_tangent)[0]

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor, None]:
        (x,) = ctx.saved_tensors
        # A float16/bfloat16 input is differentiated in float32 and rounded once, as torch's own
        # kernel does: the formula below evaluated in half precision was off by up to 54 units in
        # the last place (torch: 0.5). The casts are differentiable, so double backward holds.
        half = x.dtype in (torch.float16, torch.bfloat16)
        result_dtype = grad_output.dtype
        if half:
            x, grad_output = x.float(), grad_output.float()
        if ctx.approximate == "tanh":
            # t = tanh(u)
            t = torch.tanh(_SQRT_2_OVER_PI * (x + _GELU_CUBIC * x * x * x))
            # du/dx = √(2/π) (1 + 3 · 0.044715 x²)
            du = _SQRT_2_OVER_PI * (1 + 3 * _GELU_CUBIC * x * x)
            # dL/dx = g * ((1 + t) / 2 + x (1 - t²) du/dx / 2)
            grad_input = grad_output * (0.5 * (1 + t) + 0.5 * x * (1 - t * t) * du)
        else:
            # Φ(x), the standard normal CDF
            cdf = 0.5 * (1 + torch.erf(x * _INV_SQRT_2))
            # φ(x) = dΦ/dx, the standard normal density
            pdf = _INV_SQRT_2PI * torch.exp(-0.5 * x * x)
            # dL/dx = g * (Φ(x) + x φ(x))
            grad_input = grad_output * (cdf + x * pdf)
        return grad_input.to(result_dtype) if half else grad_input, None
