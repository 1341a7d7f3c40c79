"""Embedding lookup, ``torch.nn.functional.embedding``: the functional, its validation and its
Function with a hand-written backward, and the module.

``y[..., :] = W[i[...], :]`` for integer indices ``i`` into the ``N`` rows of ``W``. With
``g = dL/dy``: ``dL/dW_n = Σ_{k: i_k = n} g_k`` (divided by the number of such ``k`` with
``scale_grad_by_freq``), zero for the ``padding_idx`` row; dense, or a sparse COO tensor with
``sparse=True``. ``max_norm`` renormalises the looked-up rows of ``W`` in place before the
lookup, outside autograd, as torch does. Triton: no kernel (a gather is memory-bound as torch
runs it); every backend runs this torch path and records so (``nn.embedding``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from torchopt_lab.nn._dispatch import record_torch_only
from torchopt_lab.nn._function import apply, forward_mode


@forward_mode
class EmbeddingFunction(torch.autograd.Function):
    r"""``y = W[i]``; ``dL/dW = Σ_k e_{i_k} g_kᵀ`` (scatter-add of ``g``'s rows into ``i``'s rows),
    the ``padding_idx`` row (``-1``: none) zero, each row divided by its count in ``i`` when
    ``scale_grad_by_freq``."""

    generate_vmap_rule = True

    @staticmethod
    def forward(
        weight: torch.Tensor,
        indices: torch.Tensor,
        padding_idx: int,
        scale_grad_by_freq: bool,
        sparse: bool,
    ) -> torch.Tensor:
        rows = weight.index_select(0, indices.reshape(-1))
        return rows.reshape(*indices.shape, weight.shape[1])

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
        weight, indices, padding_idx, scale_grad_by_freq, sparse = inputs
        ctx.options = (weight.shape, padding_idx, scale_grad_by_freq, sparse)
        ctx.save_for_backward(indices)
        ctx.save_for_forward(indices)

    @staticmethod
    def jvp(ctx: Any, weight_tangent: torch.Tensor, *_: None) -> torch.Tensor:
        (indices,) = ctx.saved_tensors
        # dy = dW[i]
        rows = weight_tangent.index_select(0, indices.reshape(-1))
        return rows.reshape(*indices.shape, weight_tangent.shape[1])

    @staticmethod
    def backward(
        ctx: Any, grad_output: torch.Tensor
    ) -> tuple[torch.Tensor, None, None, None, None]:
        (indices,) = ctx.saved_tensors
        shape, padding_idx, scale_grad_by_freq, sparse = ctx.options
        flat = indices.reshape(-1)
        # g_k, one row per looked-up index
        grad_rows = grad_output.reshape(-1, shape[1])
        if padding_idx >= 0:
            # the padding row gets no gradient
            grad_rows = torch.where((flat == padding_idx).unsqueeze(1), 0, grad_rows)
        if scale_grad_by_freq:
            # g_k / #{k': i_k' = i_k}
            counts = torch.bincount(flat, minlength=shape[0])
            grad_rows = grad_rows / counts.index_select(0, flat).unsqueeze(1).to(grad_rows.dtype)
        if sparse:
            # dL/dW as a sparse COO tensor of the looked-up rows (duplicates summed on coalesce)
            grad_weight = torch.sparse_coo_tensor(flat.unsqueeze(0), grad_rows, shape)
        else:
            # dL/dW_n = Σ_{k: i_k = n} g_k
            grad_weight = grad_rows.new_zeros(shape).index_add(0, flat, grad_rows)
        return grad_weight, None, None, None, None


def embedding(
    input: torch.Tensor,
    weight: torch.Tensor,
    padding_idx: int | None = None,
    max_norm: float | None = None,
    norm_type: float = 2.0,
    scale_grad_by_freq: bool = False,
    sparse: bool = False,
) -> torch.Tensor:
    """Rows ``weight[input]``, as ``torch.nn.functional.embedding``; see
    :class:`EmbeddingFunction`."""
    if padding_idx is not None:
        if padding_idx > 0:
            assert padding_idx < weight.size(0), "Padding_idx must be within num_embeddings"
        elif padding_idx < 0:
            assert padding_idx >= -weight.size(0), "Padding_idx must be within num_embeddings"
            padding_idx = weight.size(0) + padding_idx
    else:
        padding_idx = -1
    if input.dtype not in (torch.long, torch.int):
        raise RuntimeError(
            "Expected tensor for argument #1 'indices' to have one of the following scalar types: "
            f"Long, Int; but got {input.dtype} instead (while checking arguments for embedding)"
        )
    if weight.dim() != 2:
        raise RuntimeError(f"'weight' must be 2-D, got a weight of shape {list(weight.shape)}")
    if max_norm is not None:
        input = input.contiguous()
        with torch.no_grad():
            torch.embedding_renorm_(weight, input, max_norm, norm_type)
    record_torch_only("embedding", weight)
    return apply(EmbeddingFunction, weight, input, padding_idx, scale_grad_by_freq, sparse)


class Embedding(nn.Embedding):
    """:class:`torch.nn.Embedding` running :func:`embedding`."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return embedding(
            input,
            self.weight,
            self.padding_idx,
            self.max_norm,
            self.norm_type,
            self.scale_grad_by_freq,
            self.sparse,
        )
