"""Dropout whose mask is regenerated from a seed instead of stored.

``y_i = x_i m_i / (1 - p)``, ``m_i = 1[u_i ≥ p]``, ``u_i = rand(seed, i)`` uniform on ``[0, 1)``
(``tl.rand``: Philox keyed by the seed, counter ``i``), so ``P(m_i = 1) = 1 - p``. The backward
``dL/dx_i = g_i m_i / (1 - p)`` is the same kernel applied to ``g`` with the same seed: it
recomputes exactly the forward's mask, and only the seed (one integer) is kept between the passes.
The masks differ from torch's own dropout (a different generator); their statistics are the same.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from triton_kernels.nn._common import (
    check_contiguous,
    check_floating,
    check_numel,
    check_same,
    check_shape,
    compute_dtype,
    warps,
)

_BLOCK = 1024
_MAX_SEED = 2**31 - 1


@triton.jit
def _dropout_kernel(
    input_pointer,
    output_pointer,
    numel,
    seed,
    p: tl.float64,
    COMPUTE_DTYPE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """``y_i = x_i 1[rand(seed, i) ≥ p] / (1 - p)`` on one block of the flat tensor; ``p`` a
    runtime argument (one compile for every probability)."""
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < numel
    x = tl.load(input_pointer + offsets, mask=mask).to(COMPUTE_DTYPE)
    # u_i ≥ p compared in float32, u's own type (as the constexpr p was before)
    keep = tl.rand(seed, offsets) >= tl.full((), p, tl.float32)
    # x / (1 - p) where kept, 0 elsewhere; 1 / (1 - p) in float64 (torch's host scalar), then
    # rounded once to the compute dtype
    scale = tl.full((), 1.0 / (1.0 - p), COMPUTE_DTYPE)
    y = tl.where(keep, x * scale, 0.0)
    tl.store(output_pointer + offsets, y.to(output_pointer.dtype.element_ty), mask=mask)


def _check(name: str, input: torch.Tensor, p: float, seed: int) -> None:
    check_floating(name, "input", input)
    check_contiguous(name, input=input)
    check_numel(name, input)
    if not 0.0 <= p < 1.0:
        raise ValueError(f"{name}: dropout probability has to be in [0, 1), but got {p}")
    if not 0 <= seed <= _MAX_SEED:
        raise ValueError(f"{name}: seed must be in [0, {_MAX_SEED}], got {seed}")


def new_seed(generator: torch.Generator | None = None) -> int:
    """A seed drawn from torch's CPU generator (no device sync), so ``torch.manual_seed`` makes
    dropout repeat."""
    return int(torch.randint(0, _MAX_SEED, (), generator=generator, device="cpu"))


def launch_grid(numel: int) -> tuple[tuple[int], int]:
    """``(grid, BLOCK)``: blocks of ``_BLOCK`` values, one program each, along grid axis 0
    (CUDA's limit 2³¹ - 1): at most 2²¹ programs within
    :data:`~triton_kernels.nn._common.MAX_NUMEL`. In-kernel offsets stay int32: a block starts at
    a multiple of ``_BLOCK`` below ``numel``, so its last offset is at most 2³¹ - 1."""
    return (triton.cdiv(numel, _BLOCK),), _BLOCK


def _launch(input: torch.Tensor, output: torch.Tensor, p: float, seed: int) -> None:
    if input.numel():
        grid, block = launch_grid(input.numel())
        _dropout_kernel[grid](
            input,
            output,
            input.numel(),
            seed,
            p=float(p),
            COMPUTE_DTYPE=compute_dtype(input.dtype),
            BLOCK=block,
            num_warps=warps(block, input.dtype),
        )


def dropout_forward(
    input: torch.Tensor, p: float, seed: int, out: torch.Tensor | None = None
) -> torch.Tensor:
    """``input ⊙ m / (1 - p)`` with the mask ``m`` of ``seed`` (``0 ≤ p < 1``; ``p = 1``, all
    zeros, needs no kernel); written into ``out`` when given (which may be ``input``)."""
    name = "dropout_forward"
    _check(name, input, p, seed)
    if out is None:
        out = torch.empty_like(input)
    else:
        check_same(name, input, out=out)
        check_shape(name, "out", out, tuple(input.shape))
        check_contiguous(name, out=out)
    _launch(input, out, p, seed)
    return out


def dropout_backward(grad_output: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    """``grad_output ⊙ m / (1 - p)``, ``m`` regenerated from the forward's ``seed``."""
    _check("dropout_backward", grad_output, p, seed)
    grad_input = torch.empty_like(grad_output)
    _launch(grad_output, grad_input, p, seed)
    return grad_input
