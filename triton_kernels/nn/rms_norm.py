"""Root-mean-square normalisation (Zhang & Sennrich, 2019) over the last dimension, forward and
backward: ``torch.nn.functional.rms_norm`` with ``normalized_shape`` flattened into the last
dimension.

For a row ``x`` of ``n`` elements (the names of ``torchopt_lab/nn/_rms_norm.py``):
``r = 1 / √(mean(x²) + eps)``, ``x̂ = x r``, ``y = w x̂``. The forward keeps ``r`` per row. With
``g = dL/dy``: ``dL/dx = r (w g - x̂ c_1)``, ``c_1 = mean(x̂ ⊙ w g)``, ``dL/dw = Σ_rows g x̂``.

The kernels are layer norm's (:mod:`triton_kernels.nn.layer_norm`) with ``CENTERED=False``:
``μ = 0``, no bias, ``c_2 = 0``. So the same design: whole rows in registers (several rows per
program) up to 32 KB of the compute dtype, two-pass column slices beyond; a backward of a fixed
number of programs, each accumulating its partial ``dL/dw`` in registers; int64 offsets; every
grid within CUDA's limits (:func:`~triton_kernels.nn._common.block_shape`,
:func:`~triton_kernels.nn._common.backward_grid`). float16 and bfloat16 are computed in float32
and ``y = x r w`` rounded once to the input's dtype, as torch 2.13 does; ``r`` is kept in the
compute dtype. ``eps`` is a runtime argument: one compiled kernel for every value.

API (for the layer's Triton path; ``x2d = input.reshape(-1, prod(normalized_shape))``,
contiguous; ``weight`` flattened to ``[columns]`` or None)::

    output, rstd = rms_norm_forward(x2d, weight, eps)       # eps None: torch's default
    grad_input, grad_weight = rms_norm_backward(grad_output, x2d, weight, rstd)

``grad_weight`` is None without a weight (or with ``compute_weight_grad=False``).
"""

from __future__ import annotations

import torch

from triton_kernels.nn.layer_norm import row_norm_backward, row_norm_forward

__all__ = ["default_eps", "rms_norm_backward", "rms_norm_forward"]


def default_eps(dtype: torch.dtype) -> float:
    """torch's ``eps=None``: the machine epsilon of the dtype it computes in, float32's for
    float16 and bfloat16 inputs (2⁻²³, not bfloat16's 2⁻⁷), float64's for float64."""
    return torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).eps


def rms_norm_forward(
    input: torch.Tensor, weight: torch.Tensor | None = None, eps: float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(y, r)`` normalising the last dimension of the contiguous ``input`` (at least 1-D, of
    float16, bfloat16, float32 or float64); ``weight`` of shape ``[columns]`` and the input's
    dtype, or None; ``r`` of shape ``[rows]`` in the compute dtype (float64 for float64 input,
    else float32). ``eps`` None is :func:`default_eps`."""
    eps = default_eps(input.dtype) if eps is None else eps
    output, _, rstd = row_norm_forward("rms_norm_forward", input, weight, None, eps, centered=False)
    return output, rstd


def rms_norm_backward(
    grad_output: torch.Tensor,
    input: torch.Tensor,
    weight: torch.Tensor | None,
    rstd: torch.Tensor,
    compute_weight_grad: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(dL/dx, dL/dw)`` from ``grad_output`` (the input's shape and dtype, contiguous) and the
    forward's ``input``, ``weight`` and ``r``; ``dL/dw`` (the weight's dtype) is None without a
    weight or unless ``compute_weight_grad``."""
    grad_input, grad_weight, _ = row_norm_backward(
        "rms_norm_backward", grad_output, input, weight, None, rstd, compute_weight_grad
    )
    return grad_input, grad_weight
