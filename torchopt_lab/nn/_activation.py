"""Elementwise activations as autograd Functions with hand-written backward passes.

Notation: ``x`` the input, ``y`` the output, ``g = dL/dy`` the incoming gradient. Every backward is
written with differentiable torch ops, so differentiating it again (double backward) is exact.
"""

from __future__ import annotations

import math
from typing import Any

import torch


class ReLUFunction(torch.autograd.Function):
    r"""``y = max(x, 0)``; ``dy/dx = 1[y > 0]`` (and 1 where ``y`` is NaN, as torch).

    ``inplace=True`` overwrites ``x`` with ``y`` (the mask is read back from ``y``, which is
    positive exactly where ``x`` is).
    """

    @staticmethod
    def forward(ctx: Any, input: torch.Tensor, inplace: bool) -> torch.Tensor:
        if inplace:
            output = input.clamp_(min=0)
            ctx.mark_dirty(output)
        else:
            output = input.clamp(min=0)
        ctx.save_for_backward(output)
        return output

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, None]:
        (output,) = ctx.saved_tensors
        # dL/dx = g where y > 0 or y is NaN, exactly 0 where y <= 0 even for a non-finite g:
        # torch's own relu backward, one fused pass (g · sign(y) gave 0 at NaN and NaN for an
        # infinite g), differentiable again (its derivative in g is itself, in y zero)
        grad_input = torch.ops.aten.threshold_backward(grad_output, output, 0)
        return grad_input, None


class LeakyReLUFunction(torch.autograd.Function):
    r"""``y = x if x > 0 else a * x`` with ``a = negative_slope``; ``dy/dx = 1 if x > 0 else a``.

    ``inplace=True`` reads the sign of ``x`` back from ``y``, which needs ``a >= 0`` when the
    result is differentiated.
    """

    @staticmethod
    def forward(
        ctx: Any, input: torch.Tensor, negative_slope: float, inplace: bool
    ) -> torch.Tensor:
        ctx.negative_slope = negative_slope
        if inplace:
            positive = input > 0
            output = input.mul_(torch.where(positive, 1.0, negative_slope).to(input.dtype))
            ctx.mark_dirty(output)
        else:
            output = torch.where(input > 0, input, input * negative_slope)
        # In place, x survives only as y, whose sign is x's when a >= 0 (functional checks a).
        ctx.save_for_backward(output if inplace else input)
        return output

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, None, None]:
        (signed,) = ctx.saved_tensors
        # dL/dx = g * (1 if x > 0 else a)
        grad_input = torch.where(signed > 0, grad_output, grad_output * ctx.negative_slope)
        return grad_input, None, None


class SigmoidFunction(torch.autograd.Function):
    r"""``y = 1 / (1 + exp(-x))``; ``dy/dx = y (1 - y)``."""

    @staticmethod
    def forward(ctx: Any, input: torch.Tensor) -> torch.Tensor:
        output = torch.sigmoid(input)
        ctx.save_for_backward(output)
        return output

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> torch.Tensor:
        (output,) = ctx.saved_tensors
        # dL/dx = g * y * (1 - y), conjugated for a complex input (torch's convention; a no-op on
        # real tensors)
        return grad_output * (output * (1 - output)).conj()


class TanhFunction(torch.autograd.Function):
    r"""``y = tanh(x)``; ``dy/dx = 1 - y^2``."""

    @staticmethod
    def forward(ctx: Any, input: torch.Tensor) -> torch.Tensor:
        output = torch.tanh(input)
        ctx.save_for_backward(output)
        return output

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> torch.Tensor:
        (output,) = ctx.saved_tensors
        # dL/dx = g * (1 - y^2), conjugated for a complex input (as for the sigmoid)
        return grad_output * (1 - output * output).conj()


_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_INV_SQRT_2 = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
_GELU_CUBIC = 0.044715


class GELUFunction(torch.autograd.Function):
    r"""Gaussian error linear unit (Hendrycks & Gimpel, 2016).

    ``approximate="none"``: ``y = x Φ(x)`` with ``Φ(x) = (1 + erf(x / √2)) / 2`` and
    ``φ(x) = exp(-x² / 2) / √(2π)``, so ``dy/dx = Φ(x) + x φ(x)``.

    ``approximate="tanh"``: ``y = x (1 + t) / 2`` with ``t = tanh(u)``,
    ``u = √(2/π) (x + 0.044715 x³)``, so
    ``dy/dx = (1 + t) / 2 + x (1 - t²) √(2/π) (1 + 3 · 0.044715 x²) / 2``.
    """

    @staticmethod
    def forward(ctx: Any, input: torch.Tensor, approximate: str) -> torch.Tensor:
        ctx.approximate = approximate
        ctx.save_for_backward(input)
        return torch.nn.functional.gelu(input, approximate=approximate)

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor, None]:
        (x,) = ctx.saved_tensors
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
        return grad_input, None
