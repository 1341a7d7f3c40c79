"""Elementwise activations: ``relu``, ``leaky_relu``, ``sigmoid``, ``tanh``, ``gelu`` and ``silu``,
paired with ``triton_kernels/nn/activation.py``: each functional with its validation, the
torch-path Functions, the Triton-path Function on the bias + activation kernel (registered as the
``torchopt_lab::bias_activation_*`` custom ops), and the modules.

Notation: ``x`` the input, ``y`` the output, ``g = dL/dy`` the incoming gradient. Every torch-path
backward is written with differentiable torch ops, so differentiating it again (double backward)
is exact. The Triton path is differentiable once (:mod:`torchopt_lab.nn._dispatch`).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from torchopt_lab.nn._dispatch import (
    first_order_only,
    forward_mode_error,
    record_torch_part,
    register_vmap_by_slices,
    triton_kernels,
    use_triton,
)
from torchopt_lab.nn._function import apply, forward_mode


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


def _silu_derivative(input: torch.Tensor) -> torch.Tensor:
    """``dy/dx = σ(x) (1 + x (1 - σ(x)))``, with differentiable ops (double backward)."""
    sigmoid = torch.sigmoid(input)
    return sigmoid * (1 + input * (1 - sigmoid))


@forward_mode
class SiLUFunction(torch.autograd.Function):
    r"""SiLU / swish (Elfwing et al., 2017; Ramachandran et al., 2017): ``y = x σ(x)``;
    ``dL/dx = g σ(x) (1 + x (1 - σ(x)))``. Keeps ``x``."""

    generate_vmap_rule = True

    @staticmethod
    def forward(input: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.silu(input)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
        ctx.save_for_backward(inputs[0])
        ctx.save_for_forward(inputs[0])

    @staticmethod
    def jvp(ctx: Any, input_tangent: torch.Tensor) -> torch.Tensor:
        (input,) = ctx.saved_tensors
        # dy = dx σ(x) (1 + x (1 - σ(x)))
        return input_tangent * _silu_derivative(input)

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> torch.Tensor:
        (input,) = ctx.saved_tensors
        # dL/dx = g σ(x) (1 + x (1 - σ(x)))
        return grad_output * _silu_derivative(input)


# The Triton path: the bias + activation kernels as custom ops (``bias`` is also the fused
# linear_activation's, :mod:`torchopt_lab.nn.fused`).


@torch.library.custom_op("torchopt_lab::bias_activation_forward", mutates_args=())
def bias_activation_forward(
    input: torch.Tensor, bias: torch.Tensor | None, activation: str, negative_slope: float
) -> torch.Tensor:
    """``f(input + bias)`` on the Triton kernel (``input`` contiguous ``[*, columns]``)."""
    return triton_kernels().bias_activation_forward(input, bias, activation, negative_slope)


@bias_activation_forward.register_fake
def _(
    input: torch.Tensor, bias: torch.Tensor | None, activation: str, negative_slope: float
) -> torch.Tensor:
    return torch.empty_like(input)


@torch.library.custom_op("torchopt_lab::bias_activation_forward_", mutates_args=("input",))
def bias_activation_forward_(input: torch.Tensor, activation: str, negative_slope: float) -> None:
    """``input ← f(input)`` in place on the Triton kernel (``input`` contiguous)."""
    triton_kernels().bias_activation_forward(input, None, activation, negative_slope, out=input)


@bias_activation_forward_.register_fake
def _(input: torch.Tensor, activation: str, negative_slope: float) -> None:
    return None


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
    grad_input, grad_bias = triton_kernels().bias_activation_backward(
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


@torch.compiler.assume_constant_result
def saves_output(activation: str) -> bool:
    """Whether the kernel's backward reads ``f'`` from ``y`` (``OUTPUT_DERIVATIVE``) rather than
    from the input; a constant to ``torch.compile``."""
    return activation in triton_kernels().OUTPUT_DERIVATIVE


# Elementwise, so the vmapped dimension folds into the rows, unless the bias is vmapped too (or,
# in backward, its gradient is asked for: a sum over the rows of each slice, or only one of
# grad_output and the saved tensor is vmapped, as in jacrev).
register_vmap_by_slices(bias_activation_forward, folds=lambda in_dims, *args: in_dims[1] is None)
register_vmap_by_slices(
    bias_activation_backward,
    folds=lambda in_dims, *args: None not in in_dims[:2] and in_dims[2] is None and not args[5],
)


@forward_mode
class ActivationTritonFunction(torch.autograd.Function):
    """``y = f(x)`` on the bias + activation kernels (no bias). Keeps ``y`` where ``f'`` is a
    function of ``y`` (and in place, where ``x`` survives only as ``y``), else ``x``."""

    generate_vmap_rule = True

    @staticmethod
    def jvp(ctx: Any, *tangents: Any) -> Any:
        # (gelu(approximate="tanh") is the kernels' "gelu_tanh")
        raise forward_mode_error(ctx.options[0].removesuffix("_tanh"))

    @staticmethod
    def forward(
        input: torch.Tensor, activation: str, negative_slope: float, inplace: bool
    ) -> torch.Tensor:
        contiguous = input.contiguous()
        if not inplace:
            return bias_activation_forward(contiguous, None, activation, negative_slope)
        bias_activation_forward_(contiguous, activation, negative_slope)
        # (is_contiguous, not a data-pointer comparison, which torch.compile cannot trace)
        if not input.is_contiguous():
            input.copy_(contiguous)
        return input

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
        input, activation, negative_slope, inplace = inputs
        if inplace:
            ctx.mark_dirty(output)
        # In place, leaky_relu's f' is read from y: 1[y > 0] = 1[x > 0] for a slope >= 0 (the
        # functional refuses a negative slope in place when differentiated).
        from_output = inplace or saves_output(activation)
        ctx.options = (activation, negative_slope)
        ctx.save_for_backward(output if from_output else input)

    @staticmethod
    @first_order_only
    @once_differentiable
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        (saved,) = ctx.saved_tensors
        activation, negative_slope = ctx.options
        # dL/dx = g f'(x)
        grad_input, _ = bias_activation_backward(
            grad_output.contiguous(), saved.contiguous(), None, activation, negative_slope, False
        )
        return grad_input, None, None, None


def _on_torch_unless_real_float(
    name: str, input: torch.Tensor, function: type[torch.autograd.Function], *args: Any
) -> torch.Tensor | None:
    """Run ``nn.<name>`` for an input the float kernels cannot take on the torch path's
    ``function`` (recorded as ``nn.<name>.dtype``: torch): an integer input of relu (which torch
    keeps integer), a complex one of sigmoid and tanh (torch computes them; relu refuses it as
    torch does). None for a real floating-point input, which the kernels take."""
    if input.is_floating_point():
        return None
    record_torch_part(f"nn.{name}.dtype", input.device)
    return apply(function, input, *args)


def _promoted(input: torch.Tensor) -> torch.Tensor:
    """An integer or bool input in torch's default float dtype, as torch's sigmoid and tanh
    compute it."""
    if input.is_floating_point() or input.is_complex():
        return input
    return input.to(torch.get_default_dtype())


# The functionals: validation, then one backend decision.


def relu(input: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    """``max(input, 0)``, in place when ``inplace``; see :class:`ReLUFunction`."""
    if input.dtype == torch.bool:
        raise RuntimeError("Boolean inputs not supported for relu")
    if use_triton("relu", input):
        on_torch = _on_torch_unless_real_float("relu", input, ReLUFunction, inplace)
        if on_torch is not None:
            return on_torch
        return apply(ActivationTritonFunction, input, "relu", 0.0, inplace)
    return apply(ReLUFunction, input, inplace)


def leaky_relu(
    input: torch.Tensor, negative_slope: float = 0.01, inplace: bool = False
) -> torch.Tensor:
    """``input`` where positive, ``negative_slope * input`` elsewhere; see
    :class:`LeakyReLUFunction`."""
    if inplace and negative_slope < 0 and input.requires_grad and torch.is_grad_enabled():
        raise RuntimeError(
            f"leaky_relu(inplace=True) with negative_slope={negative_slope} cannot be "
            "differentiated: the sign of the input cannot be read back from the output. Use "
            "inplace=False or a non-negative slope."
        )
    if not input.is_floating_point():
        raise NotImplementedError(
            f"leaky_relu is not implemented for {input.dtype} tensors; it needs a floating-point "
            "dtype"
        )
    if use_triton("leaky_relu", input):
        return apply(ActivationTritonFunction, input, "leaky_relu", negative_slope, inplace)
    return apply(LeakyReLUFunction, input, negative_slope, inplace)


def sigmoid(input: torch.Tensor) -> torch.Tensor:
    """``1 / (1 + exp(-input))``; see :class:`SigmoidFunction`."""
    if use_triton("sigmoid", input):
        input = _promoted(input)
        on_torch = _on_torch_unless_real_float("sigmoid", input, SigmoidFunction)
        if on_torch is not None:
            return on_torch
        return apply(ActivationTritonFunction, input, "sigmoid", 0.0, False)
    return apply(SigmoidFunction, input)


def tanh(input: torch.Tensor) -> torch.Tensor:
    """``tanh(input)``; see :class:`TanhFunction`."""
    if use_triton("tanh", input):
        input = _promoted(input)
        on_torch = _on_torch_unless_real_float("tanh", input, TanhFunction)
        if on_torch is not None:
            return on_torch
        return apply(ActivationTritonFunction, input, "tanh", 0.0, False)
    return apply(TanhFunction, input)


def gelu(input: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    """GELU, exact (``approximate="none"``) or with the tanh approximation; see
    :class:`GELUFunction`."""
    if approximate not in ("none", "tanh"):
        raise RuntimeError(
            f"approximate argument must be either none or tanh, got approximate={approximate!r}"
        )
    if use_triton("gelu", input):
        activation = "gelu_tanh" if approximate == "tanh" else "gelu"
        return apply(ActivationTritonFunction, input, activation, 0.0, False)
    return apply(GELUFunction, input, approximate)


def silu(input: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    """``input * sigmoid(input)``, in place when ``inplace``, as ``torch.nn.functional.silu``; see
    :class:`SiLUFunction`. The backward needs ``x``, which an in-place result overwrites: in place,
    either path runs on a (differentiable) copy and copies the result back into the input."""
    if not input.is_floating_point():
        raise NotImplementedError(
            f"silu is not implemented for {input.dtype} tensors; it needs a floating-point dtype"
        )
    source = input.clone() if inplace else input
    if use_triton("silu", input):
        output = apply(ActivationTritonFunction, source, "silu", 0.0, False)
    else:
        output = apply(SiLUFunction, source)
    return input.copy_(output) if inplace else output


class ReLU(nn.ReLU):
    """:class:`torch.nn.ReLU` running :func:`relu`."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return relu(input, inplace=self.inplace)


class LeakyReLU(nn.LeakyReLU):
    """:class:`torch.nn.LeakyReLU` running :func:`leaky_relu`."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return leaky_relu(input, self.negative_slope, self.inplace)


class Sigmoid(nn.Sigmoid):
    """:class:`torch.nn.Sigmoid` running :func:`sigmoid`."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return sigmoid(input)


class Tanh(nn.Tanh):
    """:class:`torch.nn.Tanh` running :func:`tanh`."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return tanh(input)


class GELU(nn.GELU):
    """:class:`torch.nn.GELU` running :func:`gelu`."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return gelu(input, approximate=self.approximate)


class SiLU(nn.SiLU):
    """:class:`torch.nn.SiLU` running :func:`silu`."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return silu(input, inplace=self.inplace)
