"""Cross-entropy of logits against class indices that keeps only the per-row log-sum-exp.

For row ``i`` of logits ``x`` (``C`` classes, contiguous), target ``t_i``, class weights ``w``
(ones if none), ``W = Σ_c w_c``, ``v_i = 1[t_i ≠ ignore_index]`` and smoothing ``ε`` (the
definitions of ``torchopt_lab/nn/_loss.py``), with ``lse_i = log Σ_c exp(x_{i,c})``:

``ℓ_i = v_i [(1 - ε) w_{t_i} (lse_i - x_{i,t_i}) + (ε / C) (W lse_i - Σ_c w_c x_{i,c})]``.

The forward reads the row once (log-sum-exp and ``Σ_c w_c x_{i,c}`` in the same pass) and keeps
``lse_i``; the backward recomputes ``p_{i,c} = exp(x_{i,c} - lse_i)`` from it, so no ``[rows, C]``
softmax is ever kept between the passes. With ``γ_i = dL/dℓ_i``:

``dL/dx_{i,c} = γ_i v_i [(1 - ε) w_{t_i} (p_{i,c} - 1[c = t_i]) + (ε / C) (W p_{i,c} - w_c)]``.

Class probabilities ``t_{i,c}`` (same shape as the logits): with ``q_{i,c} = w_c ((1 - ε) t_{i,c}
+ ε / C)`` and its row mass ``Q_i = Σ_c q_{i,c}``, ``ℓ_i = -Σ_c q_{i,c} log p_{i,c} = Q_i lse_i -
Σ_c q_{i,c} x_{i,c}`` and ``dL/dx_{i,c} = γ_i (p_{i,c} Q_i - q_{i,c})``; the forward keeps
``lse_i`` and ``Q_i``.

The reduction over rows (``"mean"`` divides by ``Σ_i v_i w_{t_i}``, or by the number of rows for
probabilities) is left to the caller, in torch ops on the ``[rows]`` losses; it scales ``γ``
accordingly.

``ε`` is a runtime argument (float64, rounded in the kernel to the compute dtype), so every
smoothing value shares one compiled kernel per dtype. The class-index kernels also take the
constexpr ``SMOOTHING = ε > 0``: without smoothing they skip the class-weight loads and the
``Σ_c w_c x_c`` reduction (the common case pays nothing for the feature), so at most two
variants compile, ``ε = 0`` and ``ε > 0``. The probability kernels need no such flag: their
``q_c`` costs the same with or without smoothing.
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
    statistics_dtype,
    warps,
)
from triton_kernels.nn.softmax import block_size


@triton.jit
def _row_target(
    target_pointer,
    weight_pointer,
    row,
    classes,
    ignore_index,
    has_weight: tl.constexpr,
    COMPUTE_DTYPE: tl.constexpr,
):
    """Row ``i``'s target ``t``: whether it counts (``t != ignore_index``), whether it is a class
    (``0 ≤ t < C``), ``t`` or 0 when it does not count or is no class (an index safe to load:
    an unchecked target outside the classes is never read), and its class weight ``w_t`` (1
    without weights)."""
    target = tl.load(target_pointer + row)
    valid = target != ignore_index
    in_range = (target >= 0) & (target < classes)
    safe_target = tl.where(valid & in_range, target, 0)
    if has_weight:
        target_weight = tl.load(weight_pointer + safe_target).to(COMPUTE_DTYPE)
    else:
        target_weight = tl.full((), 1.0, COMPUTE_DTYPE)
    return valid, in_range, safe_target, target_weight


@triton.jit
def _cross_entropy_forward_kernel(
    input_pointer,
    target_pointer,
    weight_pointer,
    weight_total_pointer,
    loss_pointer,
    log_sum_exp_pointer,
    classes,
    ignore_index,
    label_smoothing: tl.float64,
    SMOOTHING: tl.constexpr,
    has_weight: tl.constexpr,
    COMPUTE_DTYPE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """One row: ``lse_i`` (saved) and ``ℓ_i`` in one pass over the classes."""
    row = tl.program_id(0).to(tl.int64)
    input_row = input_pointer + row * classes
    valid, in_range, safe_target, target_weight = _row_target(
        target_pointer, weight_pointer, row, classes, ignore_index, has_weight, COMPUTE_DTYPE
    )
    maximum = tl.full((), float("-inf"), COMPUTE_DTYPE)
    total = tl.full((), 0.0, COMPUTE_DTYPE)
    weighted_sum = tl.full((), 0.0, COMPUTE_DTYPE)
    for start in range(0, classes, BLOCK):
        column = start + tl.arange(0, BLOCK)
        mask = column < classes
        x = tl.load(input_row + column, mask=mask, other=float("-inf")).to(COMPUTE_DTYPE)
        new_maximum = tl.maximum(maximum, tl.max(x, axis=0))
        shift = tl.where(new_maximum == float("-inf"), 0.0, new_maximum)
        total = total * tl.exp(maximum - shift) + tl.sum(tl.exp(x - shift), axis=0)
        maximum = new_maximum
        if SMOOTHING:
            if has_weight:
                w = tl.load(weight_pointer + column, mask=mask, other=0.0).to(COMPUTE_DTYPE)
            else:
                w = tl.where(mask, 1.0, 0.0).to(COMPUTE_DTYPE)
            # Σ_c w_c x_c (the masked tail's -inf replaced, as 0 · -inf is NaN)
            weighted_sum += tl.sum(w * tl.where(mask, x, 0.0), axis=0)
    lse = maximum + tl.log(total)
    tl.store(log_sum_exp_pointer + row, lse)
    target_logit = tl.load(input_row + safe_target).to(COMPUTE_DTYPE)
    # (1 - ε) w_t (lse - x_t), as log s + (m - x_t): exact where lse - x_t would cancel
    hard_scale = tl.full((), 1.0 - label_smoothing, COMPUTE_DTYPE)
    loss = hard_scale * target_weight * (tl.log(total) + (maximum - target_logit))
    if SMOOTHING:
        weight_total = tl.load(weight_total_pointer).to(COMPUTE_DTYPE)
        # + (ε / C) (W lse - Σ_c w_c x_c)
        smoothing = tl.full((), label_smoothing, COMPUTE_DTYPE) / classes
        loss += smoothing * (weight_total * lse - weighted_sum)
    # NaN for a counted target outside the classes (only reachable with check_target=False)
    loss = tl.where(in_range, loss, float("nan"))
    tl.store(loss_pointer + row, tl.where(valid, loss, 0.0))


@triton.jit
def _cross_entropy_backward_kernel(
    grad_loss_pointer,
    input_pointer,
    target_pointer,
    weight_pointer,
    weight_total_pointer,
    log_sum_exp_pointer,
    grad_input_pointer,
    classes,
    ignore_index,
    label_smoothing: tl.float64,
    SMOOTHING: tl.constexpr,
    has_weight: tl.constexpr,
    COMPUTE_DTYPE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """One row: ``dL/dx`` from ``γ_i``, the logits and ``lse_i``, the softmax recomputed."""
    row = tl.program_id(0).to(tl.int64)
    input_row = input_pointer + row * classes
    grad_input_row = grad_input_pointer + row * classes
    valid, in_range, safe_target, target_weight = _row_target(
        target_pointer, weight_pointer, row, classes, ignore_index, has_weight, COMPUTE_DTYPE
    )
    lse = tl.load(log_sum_exp_pointer + row).to(COMPUTE_DTYPE)
    # γ_i v_i
    gamma = tl.load(grad_loss_pointer + row).to(COMPUTE_DTYPE)
    # NaN for a counted target outside the classes (only reachable with check_target=False)
    gamma = tl.where(valid, tl.where(in_range, gamma, float("nan")), 0.0)
    # γ_i v_i (1 - ε) w_t
    hard = gamma * tl.full((), 1.0 - label_smoothing, COMPUTE_DTYPE) * target_weight
    if SMOOTHING:
        # γ_i v_i ε / C
        soft = gamma * (tl.full((), label_smoothing, COMPUTE_DTYPE) / classes)
        weight_total = tl.load(weight_total_pointer).to(COMPUTE_DTYPE)
    for start in range(0, classes, BLOCK):
        column = start + tl.arange(0, BLOCK)
        mask = column < classes
        x = tl.load(input_row + column, mask=mask).to(COMPUTE_DTYPE)
        # p_c = exp(x_c - lse)
        p = tl.exp(x - lse)
        # (1 - ε) w_t (p_c - 1[c = t]) part
        grad = hard * (p - tl.where(column == safe_target, 1.0, 0.0))
        if SMOOTHING:
            if has_weight:
                w = tl.load(weight_pointer + column, mask=mask).to(COMPUTE_DTYPE)
            else:
                w = tl.full((BLOCK,), 1.0, COMPUTE_DTYPE)
            # + (ε / C) (W p_c - w_c) part
            grad += soft * (weight_total * p - w)
        tl.store(grad_input_row + column, grad.to(grad_input_pointer.dtype.element_ty), mask=mask)


@triton.jit
def _cross_entropy_probabilities_forward_kernel(
    input_pointer,
    target_pointer,
    weight_pointer,
    loss_pointer,
    log_sum_exp_pointer,
    mass_pointer,
    classes,
    label_smoothing: tl.float64,
    has_weight: tl.constexpr,
    COMPUTE_DTYPE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """One row, one pass: ``lse_i``, ``Q_i`` (both saved) and ``ℓ_i = Q_i log s + Σ_c q_c (m -
    x_c)``, the second sum carried along as the running maximum ``m`` grows."""
    row = tl.program_id(0).to(tl.int64)
    input_row = input_pointer + row * classes
    target_row = target_pointer + row * classes
    smoothing = tl.full((), label_smoothing, COMPUTE_DTYPE) / classes
    hard_scale = tl.full((), 1.0 - label_smoothing, COMPUTE_DTYPE)
    maximum = tl.full((), float("-inf"), COMPUTE_DTYPE)
    total = tl.full((), 0.0, COMPUTE_DTYPE)
    mass = tl.full((), 0.0, COMPUTE_DTYPE)
    # Σ_c q_c (m - x_c) for the running maximum m
    spread = tl.full((), 0.0, COMPUTE_DTYPE)
    for start in range(0, classes, BLOCK):
        column = start + tl.arange(0, BLOCK)
        mask = column < classes
        x = tl.load(input_row + column, mask=mask, other=float("-inf")).to(COMPUTE_DTYPE)
        t = tl.load(target_row + column, mask=mask, other=0.0).to(COMPUTE_DTYPE)
        # q_c = w_c ((1 - ε) t_c + ε / C)
        q = tl.where(mask, hard_scale * t + smoothing, 0.0)
        if has_weight:
            q *= tl.load(weight_pointer + column, mask=mask, other=0.0).to(COMPUTE_DTYPE)
        new_maximum = tl.maximum(maximum, tl.max(x, axis=0))
        shift = tl.where(new_maximum == float("-inf"), 0.0, new_maximum)
        total = total * tl.exp(maximum - shift) + tl.sum(tl.exp(x - shift), axis=0)
        # moving m to m' adds Q (m' - m) to Σ q (m - x); nothing while m is still -inf (Q = 0)
        spread += mass * (shift - tl.where(maximum == float("-inf"), shift, maximum))
        spread += tl.sum(q * tl.where(mask, shift - x, 0.0), axis=0)
        mass += tl.sum(q, axis=0)
        maximum = new_maximum
    log_total = tl.log(total)
    tl.store(log_sum_exp_pointer + row, maximum + log_total)
    tl.store(mass_pointer + row, mass)
    # ℓ = Q lse - Σ q x = Q log s + Σ q (m - x)
    tl.store(loss_pointer + row, mass * log_total + spread)


@triton.jit
def _cross_entropy_probabilities_backward_kernel(
    grad_loss_pointer,
    input_pointer,
    target_pointer,
    weight_pointer,
    log_sum_exp_pointer,
    mass_pointer,
    grad_input_pointer,
    classes,
    label_smoothing: tl.float64,
    has_weight: tl.constexpr,
    COMPUTE_DTYPE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """One row: ``dL/dx_c = γ (p_c Q - q_c)``, ``p`` recomputed from the saved ``lse``."""
    row = tl.program_id(0).to(tl.int64)
    input_row = input_pointer + row * classes
    target_row = target_pointer + row * classes
    grad_input_row = grad_input_pointer + row * classes
    smoothing = tl.full((), label_smoothing, COMPUTE_DTYPE) / classes
    hard_scale = tl.full((), 1.0 - label_smoothing, COMPUTE_DTYPE)
    gamma = tl.load(grad_loss_pointer + row).to(COMPUTE_DTYPE)
    lse = tl.load(log_sum_exp_pointer + row).to(COMPUTE_DTYPE)
    mass = tl.load(mass_pointer + row).to(COMPUTE_DTYPE)
    for start in range(0, classes, BLOCK):
        column = start + tl.arange(0, BLOCK)
        mask = column < classes
        x = tl.load(input_row + column, mask=mask).to(COMPUTE_DTYPE)
        t = tl.load(target_row + column, mask=mask).to(COMPUTE_DTYPE)
        # q_c = w_c ((1 - ε) t_c + ε / C)
        q = hard_scale * t + smoothing
        if has_weight:
            q *= tl.load(weight_pointer + column, mask=mask).to(COMPUTE_DTYPE)
        # dL/dx_c = γ (p_c Q - q_c), p_c = exp(x_c - lse)
        grad = gamma * (tl.exp(x - lse) * mass - q)
        tl.store(grad_input_row + column, grad.to(grad_input_pointer.dtype.element_ty), mask=mask)


def _check(
    name: str,
    input: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None,
    ignore_index: int,
    label_smoothing: float,
    check_target: bool,
) -> None:
    check_floating(name, "input", input)
    if input.dim() != 2:
        raise RuntimeError(
            f"{name}: expected input of shape [rows, classes], got {list(input.shape)}; move the "
            "class dimension last and flatten the rest"
        )
    check_contiguous(name, input=input, target=target, weight=weight)
    check_numel(name, input)
    if target.dtype != torch.int64:
        raise RuntimeError(f"{name}: expected target of dtype torch.int64, got {target.dtype}")
    if target.device != input.device:
        raise RuntimeError(f"{name}: expected target on {input.device}, got {target.device}")
    check_shape(name, "target", target, (input.shape[0],))
    check_same(name, input, weight=weight)
    if weight is not None:
        check_shape(name, "weight", weight, (input.shape[1],))
    if not 0.0 <= label_smoothing <= 1.0:
        raise RuntimeError(f"label_smoothing must be between 0.0 and 1.0. Got: {label_smoothing}")
    if check_target:
        classes = input.shape[1]
        out_of_range = ((target < 0) | (target >= classes)) & (target != ignore_index)
        if out_of_range.any():
            raise IndexError(f"Target {target[out_of_range][0].item()} is out of bounds.")


def _weight_total(
    input: torch.Tensor, weight: torch.Tensor | None, label_smoothing: float
) -> torch.Tensor:
    """``W = Σ_c w_c`` as a one-element tensor in the compute dtype; the kernels read it only when
    smoothing, so without smoothing it is left unset (no reduction launched)."""
    dtype = statistics_dtype(input.dtype)
    if label_smoothing == 0:
        return torch.empty(1, dtype=dtype, device=input.device)
    if weight is None:
        return torch.full((1,), float(input.shape[1]), dtype=dtype, device=input.device)
    return weight.to(dtype).sum().reshape(1)


def cross_entropy_forward(
    input: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None = None,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    check_target: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ℓ, lse)``, both ``[rows]`` in the compute dtype, for logits ``input`` of shape
    ``[rows, classes]`` (contiguous) and int64 class indices ``target`` of shape ``[rows]``.

    ``check_target`` refuses (IndexError, quoting it) a target outside ``[0, classes)`` that is not
    ``ignore_index``; this costs one device-to-host sync. Without it (no sync, as a compiled
    forward needs), such a target is never read out of bounds: its row's loss, and in the
    backward its gradient row, are NaN.
    """
    name = "cross_entropy_forward"
    _check(name, input, target, weight, ignore_index, label_smoothing, check_target)
    rows, classes = input.shape
    dtype = statistics_dtype(input.dtype)
    # Without classes every row is ignored (any other target is out of range): ℓ = 0, lse = -inf.
    loss = torch.zeros(rows, dtype=dtype, device=input.device)
    lse = torch.full((rows,), float("-inf"), dtype=dtype, device=input.device)
    if rows and classes:
        _cross_entropy_forward_kernel[(rows,)](
            input,
            target,
            input if weight is None else weight,
            _weight_total(input, weight, label_smoothing),
            loss,
            lse,
            classes,
            ignore_index,
            label_smoothing=float(label_smoothing),
            SMOOTHING=label_smoothing > 0,
            has_weight=weight is not None,
            COMPUTE_DTYPE=compute_dtype(input.dtype),
            BLOCK=block_size(classes, input.element_size()),
            num_warps=warps(block_size(classes, input.element_size()), input.dtype),
        )
    return loss, lse


def cross_entropy_backward(
    grad_loss: torch.Tensor,
    input: torch.Tensor,
    target: torch.Tensor,
    log_sum_exp: torch.Tensor,
    weight: torch.Tensor | None = None,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """``dL/dx`` (the input's shape and dtype) from ``γ = grad_loss`` of shape ``[rows]`` (or a
    one-element tensor for every row) and the ``lse`` the forward returned."""
    name = "cross_entropy_backward"
    _check(name, input, target, weight, ignore_index, label_smoothing, check_target=False)
    rows, classes = input.shape
    dtype = statistics_dtype(input.dtype)
    grad_loss = grad_loss.to(dtype).expand(rows).contiguous()
    check_shape(name, "log_sum_exp", log_sum_exp, (rows,))
    grad_input = torch.empty_like(input)
    if rows and classes:
        _cross_entropy_backward_kernel[(rows,)](
            grad_loss,
            input,
            target,
            input if weight is None else weight,
            _weight_total(input, weight, label_smoothing),
            log_sum_exp.to(dtype).contiguous(),
            grad_input,
            classes,
            ignore_index,
            label_smoothing=float(label_smoothing),
            SMOOTHING=label_smoothing > 0,
            has_weight=weight is not None,
            COMPUTE_DTYPE=compute_dtype(input.dtype),
            BLOCK=block_size(classes, input.element_size()),
            num_warps=warps(block_size(classes, input.element_size()), input.dtype),
        )
    return grad_input


def _check_probabilities(
    name: str,
    input: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None,
    label_smoothing: float,
) -> None:
    check_floating(name, "input", input)
    if input.dim() != 2:
        raise RuntimeError(
            f"{name}: expected input of shape [rows, classes], got {list(input.shape)}; move the "
            "class dimension last and flatten the rest"
        )
    check_contiguous(name, input=input, target=target, weight=weight)
    check_numel(name, input)
    check_same(name, input, target=target, weight=weight)
    check_shape(name, "target", target, tuple(input.shape))
    if weight is not None:
        check_shape(name, "weight", weight, (input.shape[1],))
    if not 0.0 <= label_smoothing <= 1.0:
        raise RuntimeError(f"label_smoothing must be between 0.0 and 1.0. Got: {label_smoothing}")


def cross_entropy_probabilities_forward(
    input: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None = None,
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(ℓ, lse, Q)``, each ``[rows]`` in the compute dtype, for logits ``input`` and class
    probabilities ``target``, both contiguous ``[rows, classes]`` of one dtype."""
    name = "cross_entropy_probabilities_forward"
    _check_probabilities(name, input, target, weight, label_smoothing)
    rows, classes = input.shape
    dtype = statistics_dtype(input.dtype)
    loss = torch.zeros(rows, dtype=dtype, device=input.device)
    lse = torch.full((rows,), float("-inf"), dtype=dtype, device=input.device)
    mass = torch.zeros(rows, dtype=dtype, device=input.device)
    if rows and classes:
        block = block_size(classes, input.element_size())
        _cross_entropy_probabilities_forward_kernel[(rows,)](
            input,
            target,
            input if weight is None else weight,
            loss,
            lse,
            mass,
            classes,
            label_smoothing=float(label_smoothing),
            has_weight=weight is not None,
            COMPUTE_DTYPE=compute_dtype(input.dtype),
            BLOCK=block,
            num_warps=warps(block, input.dtype),
        )
    return loss, lse, mass


def cross_entropy_probabilities_backward(
    grad_loss: torch.Tensor,
    input: torch.Tensor,
    target: torch.Tensor,
    log_sum_exp: torch.Tensor,
    mass: torch.Tensor,
    weight: torch.Tensor | None = None,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """``dL/dx`` from ``γ = grad_loss`` (``[rows]``, or one element for every row) and the
    ``lse`` and ``Q`` the forward returned."""
    name = "cross_entropy_probabilities_backward"
    _check_probabilities(name, input, target, weight, label_smoothing)
    rows, classes = input.shape
    dtype = statistics_dtype(input.dtype)
    for argument, tensor in (("log_sum_exp", log_sum_exp), ("mass", mass)):
        check_shape(name, argument, tensor, (rows,))
    grad_input = torch.empty_like(input)
    if rows and classes:
        block = block_size(classes, input.element_size())
        _cross_entropy_probabilities_backward_kernel[(rows,)](
            grad_loss.to(dtype).expand(rows).contiguous(),
            input,
            target,
            input if weight is None else weight,
            log_sum_exp.to(dtype).contiguous(),
            mass.to(dtype).contiguous(),
            grad_input,
            classes,
            label_smoothing=float(label_smoothing),
            has_weight=weight is not None,
            COMPUTE_DTYPE=compute_dtype(input.dtype),
            BLOCK=block,
            num_warps=warps(block, input.dtype),
        )
    return grad_input
