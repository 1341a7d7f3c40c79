"""The affine map ``y = x Wᵀ + b``, ``torch.nn.functional.linear``: the functional, its Function
with a hand-written backward, and the module.

The products run on torch's GEMM (the speed limit on every device; a Triton kernel would not beat
cuBLAS there); which products the backward computes is written out here. On the Triton path the
same Function runs, recorded as ``nn.linear.gemm`` (torch) in :func:`torchopt_lab.backend_info`.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from torchopt_lab.nn._autocast import autocast_inputs
from torchopt_lab.nn._dispatch import record_torch_part, use_triton
from torchopt_lab.nn._function import apply, forward_mode


@forward_mode
class LinearFunction(torch.autograd.Function):
    r"""``y = x Wᵀ + b`` for ``x`` of shape ``[*, in]``, ``W`` of shape ``[out, in]`` and ``b``
    broadcastable to ``[*, out]``.

    ``dL/dx = g W``, ``dL/dW = Σ_batch gᵀ x``, ``dL/db = Σ g`` (over the dimensions ``b`` was
    broadcast along).
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(
        input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
    ) -> torch.Tensor:
        if input.dim() == 2 and bias is not None and bias.dim() <= 1:
            return torch.addmm(bias, input, weight.t())
        output = input.matmul(weight.t())
        return output if bias is None else output + bias

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
        ctx.save_for_backward(*inputs)
        ctx.save_for_forward(*inputs)

    @staticmethod
    def jvp(
        ctx: Any,
        input_tangent: torch.Tensor | None,
        weight_tangent: torch.Tensor | None,
        bias_tangent: torch.Tensor | None,
    ) -> torch.Tensor:
        input, weight, bias = ctx.saved_tensors
        # dy = dx Wᵀ + x dWᵀ + db
        tangent = torch.zeros((), dtype=input.dtype, device=input.device)
        if input_tangent is not None:
            tangent = tangent + input_tangent.matmul(weight.t())
        if weight_tangent is not None:
            tangent = tangent + input.matmul(weight_tangent.t())
        if bias_tangent is not None:
            tangent = tangent + bias_tangent
        return tangent.expand(_output_shape(input, weight, bias))

    @staticmethod
    def backward(
        ctx: Any, grad_output: torch.Tensor
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        input, weight, bias = ctx.saved_tensors
        grad_input = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            # dL/dx = g W
            grad_input = grad_output.matmul(weight)
        if ctx.needs_input_grad[1]:
            # dL/dW = gᵀ x, summed over every batch dimension
            grad_weight = _rows(grad_output).t().matmul(_rows(input))
        if bias is not None and ctx.needs_input_grad[2]:
            # dL/db = g summed over the dimensions b was broadcast along
            grad_bias = grad_output.sum_to_size(bias.shape)
        return grad_input, grad_weight, grad_bias


def linear(
    input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """``input @ weight.T + bias``, a 1-D ``weight`` as one row; see :class:`LinearFunction`."""
    input, weight, bias = autocast_inputs("linear", input, weight, bias)
    if use_triton("linear", input, weight, bias):
        record_torch_part("nn.linear.gemm", input.device)
    if weight.dim() == 1:
        if bias is not None:
            raise RuntimeError(
                "linear with a 1-D weight takes no bias (as in torch), got a bias of shape "
                f"{list(bias.shape)}"
            )
        return apply(LinearFunction, input, weight.unsqueeze(0), None).squeeze(-1)
    return apply(LinearFunction, input, weight, bias)


def _output_shape(
    input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> torch.Size:
    shape = input.shape[:-1] + weight.shape[:1]
    return shape if bias is None else torch.broadcast_shapes(shape, bias.shape)


def _rows(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` as a matrix with its last dimension as columns (every other dimension flattened
    into rows, also when some have size 0)."""
    return tensor.reshape(math.prod(tensor.shape[:-1]), tensor.shape[-1])


class Linear(nn.Linear):
    """:class:`torch.nn.Linear` running :func:`linear`."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return linear(input, self.weight, self.bias)
