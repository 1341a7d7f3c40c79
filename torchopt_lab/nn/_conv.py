"""2-D convolution, ``torch.nn.functional.conv2d``: the functional, its Function with a
hand-written backward, and the module.

The convolutions run on torch's convolution primitives (the speed limit on every device; a Triton
kernel would not beat cuDNN there); which convolutions the backward computes is written out here.
On the Triton path the same Function runs, recorded as ``nn.conv2d.convolution`` (torch) in
:func:`torchopt_lab.backend_info`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from torchopt_lab.nn._autocast import autocast_inputs
from torchopt_lab.nn._dispatch import record_torch_part, use_triton
from torchopt_lab.nn._function import apply, forward_mode


def pair(value: int | tuple[int, ...] | list[int], name: str) -> tuple[int, int]:
    """``value`` as one number per spatial dimension (height, width)."""
    if isinstance(value, int):
        return value, value
    values = tuple(value)
    if len(values) == 1:
        return values[0], values[0]
    if len(values) != 2:
        raise RuntimeError(
            f"expected {name} to be a single integer value or a list of 2 values "
            f"to match the convolution dimensions, but got {name}={list(values)}"
        )
    return values[0], values[1]


def resolve_padding(
    padding: str | int | tuple[int, ...] | list[int],
    weight: torch.Tensor,
    stride: tuple[int, int],
    dilation: tuple[int, int],
) -> tuple[tuple[int, int], tuple[int, int]]:
    """``(symmetric, extra)`` padding per spatial dimension: ``symmetric`` rows/columns on both
    sides, then ``extra`` more on the bottom/right only (torch's rule for ``"same"`` when the total
    ``dilation * (kernel - 1)`` is odd)."""
    if not isinstance(padding, str):
        return pair(padding, "padding"), (0, 0)
    if padding == "valid":
        return (0, 0), (0, 0)
    if padding != "same":
        raise RuntimeError(f"Invalid padding string: {padding!r}")
    if stride != (1, 1):
        raise RuntimeError("padding='same' is not supported for strided convolutions")
    if weight.dim() != 4:
        return (0, 0), (0, 0)
    totals = [d * (k - 1) for d, k in zip(dilation, weight.shape[2:], strict=True)]
    symmetric = (totals[0] // 2, totals[1] // 2)
    return symmetric, (totals[0] - 2 * symmetric[0], totals[1] - 2 * symmetric[1])


@forward_mode
class Conv2dFunction(torch.autograd.Function):
    r"""2-D cross-correlation ``y = x ⋆ W + b`` for ``x`` of shape ``[N, C_in, H, W]`` (or
    unbatched ``[C_in, H, W]``), ``W`` of shape ``[C_out, C_in / groups, kH, kW]``.

    ``dL/dx`` is the transposed convolution of ``g`` with ``W``, ``dL/dW`` the correlation of ``x``
    with ``g``, ``dL/db = Σ_{n,h,w} g``. ``padding="same"`` with an odd total padding puts the
    extra row/column on the bottom/right, as torch does: ``x`` is zero-padded there first, and its
    gradient is that of the padded input cropped back.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(
        input: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        stride: tuple[int, int],
        padding: tuple[int, int],
        extra_padding: tuple[int, int],
        dilation: tuple[int, int],
        groups: int,
    ) -> torch.Tensor:
        return torch.conv2d(
            _pad_bottom_right(input, extra_padding), weight, bias, stride, padding, dilation, groups
        )

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
        input, weight, bias, *conv = inputs
        ctx.conv = tuple(conv)
        ctx.save_for_backward(input, weight, bias)
        ctx.save_for_forward(input, weight, bias)

    @staticmethod
    def jvp(
        ctx: Any,
        input_tangent: torch.Tensor | None,
        weight_tangent: torch.Tensor | None,
        bias_tangent: torch.Tensor | None,
        *_: None,
    ) -> torch.Tensor:
        input, weight, _ = ctx.saved_tensors
        stride, padding, extra_padding, dilation, groups = ctx.conv
        # dy = dx ⋆ W + x ⋆ dW + db (the convolution is bilinear in x and W)
        terms = []
        if input_tangent is not None:
            terms.append(
                torch.conv2d(
                    _pad_bottom_right(input_tangent, extra_padding),
                    weight,
                    None,
                    stride,
                    padding,
                    dilation,
                    groups,
                )
            )
        if weight_tangent is not None:
            terms.append(
                torch.conv2d(
                    _pad_bottom_right(input, extra_padding),
                    weight_tangent,
                    None,
                    stride,
                    padding,
                    dilation,
                    groups,
                )
            )
        if bias_tangent is not None:
            terms.append(bias_tangent.reshape(-1, 1, 1))
        tangent = terms[0]
        for term in terms[1:]:
            tangent = tangent + term
        return tangent

    @staticmethod
    def backward(
        ctx: Any, grad_output: torch.Tensor
    ) -> tuple[
        torch.Tensor | None, torch.Tensor | None, torch.Tensor | None, None, None, None, None, None
    ]:
        input, weight, bias = ctx.saved_tensors
        stride, padding, extra_padding, dilation, groups = ctx.conv
        unbatched = input.dim() == 3
        # x as the convolution saw it (zero rows/columns added for an odd "same" padding)
        padded = _pad_bottom_right(input, extra_padding)
        if unbatched:
            padded, grad_output = padded.unsqueeze(0), grad_output.unsqueeze(0)
        # dL/dx = g ⋆ᵀ W (transposed convolution), dL/dW = x ⋆ g (correlation over the batch)
        grad_padded, grad_weight, _ = torch.ops.aten.convolution_backward(
            grad_output,
            padded,
            weight,
            None,
            list(stride),
            list(padding),
            list(dilation),
            False,
            [0, 0],
            groups,
            [ctx.needs_input_grad[0], ctx.needs_input_grad[1], False],
        )
        grad_input = grad_bias = None
        if ctx.needs_input_grad[0]:
            if unbatched:
                grad_padded = grad_padded.squeeze(0)
            # dL/dx = dL/dx_padded cropped to x (the zero rows/columns added carry no input)
            grad_input = grad_padded[..., : input.shape[-2], : input.shape[-1]]
        if bias is not None and ctx.needs_input_grad[2]:
            # dL/db = Σ_{n,h,w} g
            grad_bias = grad_output.sum((0, 2, 3))
        return grad_input, grad_weight, grad_bias, None, None, None, None, None


def conv2d(
    input: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    stride: int | tuple[int, int] = 1,
    padding: str | int | tuple[int, int] = 0,
    dilation: int | tuple[int, int] = 1,
    groups: int = 1,
) -> torch.Tensor:
    """2-D convolution, ``padding`` a number, a pair or ``"valid"``/``"same"``; see
    :class:`Conv2dFunction`."""
    input, weight, bias = autocast_inputs("conv2d", input, weight, bias)
    if use_triton("conv2d", input, weight, bias):
        record_torch_part("nn.conv2d.convolution", input.device)
    stride, dilation = pair(stride, "stride"), pair(dilation, "dilation")
    symmetric, extra = resolve_padding(padding, weight, stride, dilation)
    return apply(Conv2dFunction, input, weight, bias, stride, symmetric, extra, dilation, groups)


def _pad_bottom_right(input: torch.Tensor, extra_padding: tuple[int, int]) -> torch.Tensor:
    if extra_padding == (0, 0):
        return input
    return torch.constant_pad_nd(input, (0, extra_padding[1], 0, extra_padding[0]), 0.0)


class Conv2d(nn.Conv2d):
    """:class:`torch.nn.Conv2d` running :func:`conv2d`.

    A ``padding_mode`` other than ``"zeros"`` pads with :func:`torch.nn.functional.pad` (torch's
    own derivative) before the convolution, as torch does.
    """

    def _conv_forward(
        self, input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
    ) -> torch.Tensor:
        if self.padding_mode != "zeros":
            padded = nn.functional.pad(
                input, self._reversed_padding_repeated_twice, mode=self.padding_mode
            )
            return conv2d(padded, weight, bias, self.stride, 0, self.dilation, self.groups)
        return conv2d(input, weight, bias, self.stride, self.padding, self.dilation, self.groups)
