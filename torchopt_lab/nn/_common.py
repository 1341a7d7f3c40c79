"""Argument checks that several ops share, with torch's exception types and messages."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch.nn import _reduction

_REDUCTIONS = ("none", "mean", "sum")


def check_reduction(size_average: bool | None, reduce: bool | None, reduction: str) -> str:
    """``reduction``, or the one the deprecated ``size_average``/``reduce`` name, checked."""
    if size_average is not None or reduce is not None:
        reduction = _reduction.legacy_get_string(size_average, reduce)
    if reduction not in _REDUCTIONS:
        raise ValueError(f"{reduction} is not a valid value for reduction")
    return reduction


def check_floating(name: str, *tensors: torch.Tensor | None) -> None:
    """NotImplementedError (torch's type) for a tensor that is not floating-point."""
    for tensor in tensors:
        if tensor is not None and not tensor.is_floating_point():
            raise NotImplementedError(
                f"{name} is not implemented for {tensor.dtype} tensors; it needs a floating-point "
                "dtype"
            )


def check_dtype(name: str, input: torch.Tensor, **tensors: torch.Tensor | None) -> None:
    """Parameters and statistics share the input's dtype (float32 ones may go with a float16 or
    bfloat16 input, as torch allows for mixed precision)."""
    for argument, tensor in tensors.items():
        if tensor is None or tensor.dtype == input.dtype:
            continue
        if tensor.dtype == torch.float32 and input.dtype in (torch.float16, torch.bfloat16):
            continue
        raise RuntimeError(
            f"{name}: expected {argument} to have the input's dtype {input.dtype}, got "
            f"{tensor.dtype}"
        )


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
    if count == 0:
        raise RuntimeError(
            "Expected normalized_shape to be at least 1-dimensional, i.e., containing at least "
            f"one element, but got normalized_shape = {normalized_shape}"
        )
    if list(input.shape[input.dim() - count :]) != normalized_shape:
        raise RuntimeError(
            f"Given normalized_shape={normalized_shape}, expected input with shape "
            f"[*{separator}{', '.join(map(str, normalized_shape))}], but got input of size"
            f"{list(input.shape)}"
        )
    return normalized_shape


def reduce(loss: torch.Tensor, reduction: str, denominator: torch.Tensor | float) -> torch.Tensor:
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    return loss.sum() / denominator


def reduction_gradient(
    grad_output: torch.Tensor, reduction: str, denominator: torch.Tensor | float
) -> torch.Tensor:
    """dL/dℓ_i for every i: the backward of :func:`reduce` (broadcastable against ℓ)."""
    if reduction == "mean":
        return grad_output / denominator
    return grad_output


def normalized_rows(input: torch.Tensor, normalized_dims: int) -> torch.Tensor:
    """``input`` as contiguous ``[rows, width]``, the trailing ``normalized_dims`` flattened;
    rows counted from the leading dimensions (reshape(-1, 0) is ambiguous for an empty row).
    What the layer-norm and RMS-norm kernels take."""
    leading = input.dim() - normalized_dims
    return input.contiguous().reshape(
        math.prod(input.shape[:leading]), math.prod(input.shape[leading:])
    )
