"""Fused layers: ``linear`` followed by an activation, as one op.

On the Triton path the product runs on torch's GEMM and the bias add and activation are one kernel
pass over its output (and one pass backward for ``dL/dz`` and ``dL/db``), where
``linear`` then ``relu`` would read and write the ``[*, out]`` tensor twice more; see
:class:`LinearActivationTritonFunction`. On the torch path it is
:func:`~torchopt_lab.nn.functional.linear` followed by the activation, each with its hand-written
(twice-differentiable) backward.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch.autograd.function import once_differentiable

from torchopt_lab.nn._activation import (
    GELUFunction,
    LeakyReLUFunction,
    ReLUFunction,
    SigmoidFunction,
    SiLUFunction,
    TanhFunction,
    bias_activation_backward,
    bias_activation_forward,
    saves_output,
)
from torchopt_lab.nn._autocast import autocast_inputs
from torchopt_lab.nn._dispatch import (
    first_order_only,
    no_forward_mode,
    record_torch_part,
    use_triton,
)
from torchopt_lab.nn._function import apply, forward_mode
from torchopt_lab.nn._linear import LinearFunction

__all__ = ["ACTIVATIONS", "linear_activation"]

ACTIVATIONS = ("identity", "relu", "leaky_relu", "sigmoid", "tanh", "gelu", "gelu_tanh", "silu")


@forward_mode
class LinearActivationTritonFunction(torch.autograd.Function):
    """``y = f(x Wᵀ + b)``: the product on torch's GEMM, the bias and activation fused in one
    Triton pass; backward ``dL/dz = g f'`` and ``dL/db = Σ dL/dz`` in one Triton pass, then
    ``dL/dx = dL/dz W`` and ``dL/dW = dL/dzᵀ x`` on the GEMM. The second output is the
    product ``z = x Wᵀ``, kept where ``f'`` is read from ``z``."""

    generate_vmap_rule = True
    jvp = no_forward_mode("linear_activation")

    @staticmethod
    def forward(
        input: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        activation: str,
        negative_slope: float,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        record_torch_part("nn.linear_activation.gemm", input.device)
        product = input.matmul(weight.t()).contiguous()
        return bias_activation_forward(product, bias, activation, negative_slope), product

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], outputs: tuple[torch.Tensor, ...]) -> None:
        input, weight, bias, activation, negative_slope = inputs
        output, product = outputs
        ctx.options = (activation, negative_slope)
        ctx.mark_non_differentiable(product)
        ctx.save_for_backward(input, weight, bias, output if saves_output(activation) else product)

    @staticmethod
    @first_order_only
    @once_differentiable
    def backward(ctx: Any, grad_output: torch.Tensor, _: Any) -> tuple[torch.Tensor | None, ...]:
        input, weight, bias, saved = ctx.saved_tensors
        activation, negative_slope = ctx.options
        with_bias = bias is not None and ctx.needs_input_grad[2]
        # dL/dz = g f'(x Wᵀ + b), and dL/db = Σ_rows dL/dz from the same pass
        grad_product, grad_bias = bias_activation_backward(
            grad_output.contiguous(),
            saved.contiguous(),
            bias,
            activation,
            negative_slope,
            with_bias,
        )
        grad_bias = grad_bias if with_bias else None
        grad_input = grad_weight = None
        if ctx.needs_input_grad[0]:
            # dL/dx = dL/dz W
            grad_input = grad_product.matmul(weight)
        if ctx.needs_input_grad[1]:
            # dL/dW = dL/dzᵀ x, summed over every batch dimension
            rows = math.prod(input.shape[:-1])
            grad_weight = grad_product.reshape(rows, -1).t().matmul(input.reshape(rows, -1))
        return grad_input, grad_weight, grad_bias, None, None


def _activate(output: torch.Tensor, activation: str, negative_slope: float) -> torch.Tensor:
    if activation == "relu":
        return apply(ReLUFunction, output, False)
    if activation == "leaky_relu":
        return apply(LeakyReLUFunction, output, negative_slope, False)
    if activation == "sigmoid":
        return apply(SigmoidFunction, output)
    if activation == "tanh":
        return apply(TanhFunction, output)
    if activation in ("gelu", "gelu_tanh"):
        return apply(GELUFunction, output, "tanh" if activation == "gelu_tanh" else "none")
    if activation == "silu":
        return apply(SiLUFunction, output)
    return output


def linear_activation(
    input: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str = "relu",
    negative_slope: float = 0.01,
) -> torch.Tensor:
    """``f(input @ weight.T + bias)`` for ``input`` of shape ``[*, in]``, ``weight`` of shape
    ``[out, in]``, ``bias`` of shape ``[out]`` or None; ``activation`` one of :data:`ACTIVATIONS`
    (``"gelu_tanh"`` is ``gelu(approximate="tanh")``, ``negative_slope`` is leaky_relu's)."""
    input, weight, bias = autocast_inputs("linear_activation", input, weight, bias)
    if activation not in ACTIVATIONS:
        raise ValueError(f"Unknown activation {activation!r}; expected one of {ACTIVATIONS}")
    if weight.dim() != 2:
        raise RuntimeError(f"linear_activation expects a 2-D weight, got {list(weight.shape)}")
    if input.dim() == 0 or input.shape[-1] != weight.shape[1]:
        raise RuntimeError(
            f"mat1 and mat2 shapes cannot be multiplied (input {list(input.shape)} and weight.T "
            f"{[weight.shape[1], weight.shape[0]]})"
        )
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise RuntimeError(
            f"linear_activation expects a bias of shape [{weight.shape[0]}], got {list(bias.shape)}"
        )
    if use_triton("linear_activation", input, weight, bias):
        return apply(
            LinearActivationTritonFunction, input, weight, bias, activation, negative_slope
        )[0]
    return _activate(apply(LinearFunction, input, weight, bias), activation, negative_slope)
