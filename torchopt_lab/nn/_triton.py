"""The Triton path of ``torchopt_lab.nn.functional``: autograd Functions whose forward and backward
call the launchers of ``triton_kernels.nn`` (the kernels' docstrings hold the formulas).

:mod:`torchopt_lab.nn._dispatch` looks up :data:`FUNCTIONS` when the backend resolves to Triton
and calls the entry with the functional's own (already validated) arguments.

Differentiable once: the kernels keep the log-sum-exp, ``μ`` and ``r``, or a dropout seed, not a
graph, so a second derivative through them is refused, never silently wrong. Each backward is
``@once_differentiable`` (differentiating its result raises) and, first, :func:`_first_order_only`
raises in a backward run with ``create_graph=True``: ``once_differentiable`` alone returns a
constant when the incoming gradient needs no grad (``loss.backward(create_graph=True)``), and the
layers before this one would then compute a Hessian-vector product without this op's curvature.
Use the torch path (``TORCHOPT_LAB_BACKEND=torch``) for double backward.

What runs on Triton, and what does not (recorded with :func:`torchopt_lab.backend.resolve` under a
sub-component, so :func:`torchopt_lab.backend_info` shows it):

- ``relu``, ``leaky_relu``, ``sigmoid``, ``tanh``, ``gelu``, ``silu``: the bias + activation
  kernels (no bias); :func:`torchopt_lab.nn.fused.linear_activation` uses them as the GEMM's
  epilogue (the product on torch's GEMM, recorded as ``nn.linear_activation.gemm``: torch).
- ``softmax``, ``log_softmax``, ``cross_entropy`` (class indices and class probabilities),
  ``layer_norm``, ``dropout``, ``batch_norm``: their kernels; the per-row or per-channel vectors
  in between (a reduction's normalisation, running statistics, affine coefficients) are torch ops
  on ``[rows]`` or ``[C]``.
- ``linear`` and ``conv2d``: torch's GEMM / convolution with the hand-written backward of the
  torch path (``nn.linear.gemm`` / ``nn.conv2d.convolution``: torch); a Triton kernel would not
  beat cuBLAS/cuDNN there.
- ``mse_loss``: no kernel; the torch path runs (``nn.mse_loss.loss``: torch).
"""

from __future__ import annotations

import functools
import importlib
import math
from collections.abc import Callable
from typing import Any

import torch
from torch.autograd.function import once_differentiable

from torchopt_lab import backend
from torchopt_lab.nn import _conv, _linear, _triton_ops
from torchopt_lab.nn._activation import ReLUFunction, SigmoidFunction, TanhFunction
from torchopt_lab.nn._loss import MSELossFunction

# backend.kernels() raises clearly when triton_kernels is missing or another package shadows it.
kernels = importlib.import_module(f"{backend.kernels().__name__}.nn")


def _first_order_only(backward: Callable[..., Any]) -> Callable[..., Any]:
    """Make ``backward`` raise RuntimeError when run with ``create_graph=True`` (grad mode on)."""

    @functools.wraps(backward)
    def checked(ctx: Any, *grad_outputs: torch.Tensor) -> Any:
        if torch.is_grad_enabled():
            raise RuntimeError(
                f"{type(ctx).__name__.removesuffix('Backward')}: the Triton path is differentiable "
                "once, so backward with create_graph=True (double backward, Hessian-vector "
                f"products) would give a wrong second derivative; set {backend.ENV_VAR}=torch "
                "for the twice-differentiable torch path"
            )
        return backward(ctx, *grad_outputs)

    return checked


def _record_torch(component: str, device: torch.device) -> None:
    """Record that ``component`` (a part of a Triton-path op) ran on torch (not while
    ``torch.compile`` traces: recording takes a lock Dynamo cannot trace)."""
    if not torch.compiler.is_compiling():
        backend.resolve(component, "torch", device)


class ActivationFunction(torch.autograd.Function):
    """``y = f(x)`` on the bias + activation kernels (no bias). Keeps ``y`` where ``f'`` is a
    function of ``y`` (and in place, where ``x`` survives only as ``y``), else ``x``."""

    @staticmethod
    def forward(
        ctx: Any, input: torch.Tensor, activation: str, negative_slope: float, inplace: bool
    ) -> torch.Tensor:
        contiguous = input.contiguous()
        if inplace:
            kernels.bias_activation_forward(
                contiguous, None, activation, negative_slope, out=contiguous
            )
            if contiguous.data_ptr() != input.data_ptr():
                input.copy_(contiguous)
            output = input
            ctx.mark_dirty(output)
        else:
            output = _triton_ops.bias_activation_forward(
                contiguous, None, activation, negative_slope
            )
        # In place, leaky_relu's f' is read from y: 1[y > 0] = 1[x > 0] for a slope >= 0 (the
        # functional refuses a negative slope in place when differentiated).
        from_output = activation in kernels.OUTPUT_DERIVATIVE or inplace
        ctx.options = (activation, negative_slope)
        ctx.save_for_backward(output if from_output else contiguous)
        return output

    @staticmethod
    @_first_order_only
    @once_differentiable
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        (saved,) = ctx.saved_tensors
        activation, negative_slope = ctx.options
        # dL/dx = g f'(x)
        grad_input, _ = _triton_ops.bias_activation_backward(
            grad_output.contiguous(), saved.contiguous(), None, activation, negative_slope, False
        )
        return grad_input, None, None, None


class LinearActivationFunction(torch.autograd.Function):
    """``y = f(x Wᵀ + b)``: the product on torch's GEMM, the bias and activation fused in one
    Triton pass; backward ``dL/dz = g f'`` and ``dL/db = Σ dL/dz`` in one Triton pass, then
    ``dL/dx = dL/dz W`` and ``dL/dW = dL/dzᵀ x`` on the GEMM."""

    @staticmethod
    def forward(
        ctx: Any,
        input: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        activation: str,
        negative_slope: float,
    ) -> torch.Tensor:
        _record_torch("nn.linear_activation.gemm", input.device)
        product = input.matmul(weight.t()).contiguous()
        output = _triton_ops.bias_activation_forward(product, bias, activation, negative_slope)
        from_output = activation in kernels.OUTPUT_DERIVATIVE
        ctx.options = (activation, negative_slope)
        ctx.save_for_backward(input, weight, bias, output if from_output else product)
        return output

    @staticmethod
    @_first_order_only
    @once_differentiable
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        input, weight, bias, saved = ctx.saved_tensors
        activation, negative_slope = ctx.options
        with_bias = bias is not None and ctx.needs_input_grad[2]
        # dL/dz = g f'(x Wᵀ + b), and dL/db = Σ_rows dL/dz from the same pass
        grad_product, grad_bias = _triton_ops.bias_activation_backward(
            grad_output.contiguous(), saved, bias, activation, negative_slope, with_bias
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


class SoftmaxFunction(torch.autograd.Function):
    """Softmax (or, with ``log``, log-softmax) along ``dim`` on the row kernels, ``dim`` moved
    last; keeps the output."""

    @staticmethod
    def forward(
        ctx: Any, input: torch.Tensor, dim: int, dtype: torch.dtype | None, log: bool
    ) -> torch.Tensor:
        ctx.options = (dim, log, input.dtype)
        output = _triton_ops.softmax_forward(input if dtype is None else input.to(dtype), dim, log)
        ctx.save_for_backward(output)
        return output

    @staticmethod
    @_first_order_only
    @once_differentiable
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        (output,) = ctx.saved_tensors
        dim, log, input_dtype = ctx.options
        # dL/dx = y (g - Σ g y), or g - exp(y) Σ g for log-softmax
        grad_input = _triton_ops.softmax_backward(grad_output, output, dim, log).to(input_dtype)
        return grad_input, None, None, None


def _rows(tensor: torch.Tensor, classes: int) -> torch.Tensor:
    """``[N, C, *]`` (or ``[C]``) as contiguous ``[rows, C]``, the class dimension moved last."""
    moved = tensor.movedim(1, -1) if tensor.dim() > 2 else tensor
    return moved.reshape(-1, classes).contiguous()


def _unrows(rows: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """The inverse of :func:`_rows`."""
    if len(shape) > 2:
        rows = rows.reshape(shape[0], *shape[2:], shape[1]).movedim(-1, 1)
    return rows.reshape(shape)


class CrossEntropyFunction(torch.autograd.Function):
    """Cross-entropy against class indices on the LSE-only kernels: the forward keeps the logits
    (which the caller's graph holds anyway) and one log-sum-exp per row; the backward recomputes
    the softmax from them. ``"mean"`` divides by ``D = Σ_i v_i w_{t_i}``."""

    @staticmethod
    def forward(
        ctx: Any,
        input: torch.Tensor,
        target: torch.Tensor,
        weight: torch.Tensor | None,
        ignore_index: int,
        reduction: str,
        label_smoothing: float,
    ) -> torch.Tensor:
        classes = input.shape[1] if input.dim() >= 2 else input.shape[0]
        logits = _rows(input, classes)
        rows_target = target.reshape(-1).contiguous()
        if weight is not None:
            # float32 weights of a float16/bfloat16 input are read in the input's dtype
            weight = weight.to(input.dtype).contiguous()
        loss, lse = _triton_ops.cross_entropy_forward(
            logits, rows_target, weight, ignore_index, label_smoothing
        )
        valid = rows_target != ignore_index
        # D = Σ_i v_i w_{t_i}
        if weight is None:
            denominator = valid.sum().to(loss.dtype)
        else:
            denominator = (weight[rows_target.clamp(0, classes - 1)].to(loss.dtype) * valid).sum()
        ctx.options = (input.shape, ignore_index, reduction, label_smoothing)
        ctx.save_for_backward(logits, rows_target, weight, lse, denominator)
        if reduction == "none":
            return loss.reshape(target.shape).to(input.dtype)
        if reduction == "sum":
            return loss.sum().to(input.dtype)
        return (loss.sum() / denominator).to(input.dtype)

    @staticmethod
    @_first_order_only
    @once_differentiable
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        logits, target, weight, lse, denominator = ctx.saved_tensors
        shape, ignore_index, reduction, label_smoothing = ctx.options
        # γ_i = dL/dℓ_i: g_i, g, or g / D
        gamma = grad_output.reshape(-1) if reduction == "none" else grad_output.reshape(1)
        if reduction == "mean":
            gamma = gamma / denominator
        # dL/dx = γ_i [p s_i - q_i], p recomputed from the saved lse
        grad = _triton_ops.cross_entropy_backward(
            gamma, logits, target, lse, weight, ignore_index, label_smoothing
        )
        return _unrows(grad, shape), None, None, None, None, None


class CrossEntropyProbabilitiesFunction(torch.autograd.Function):
    """Cross-entropy against class probabilities on the kernels, keeping per row only ``lse_i``
    and the target mass ``Q_i``. ``"mean"`` divides by the number of rows (samples), as torch.
    With ``log p = x - lse`` rebuilt only when asked for:
    ``dL/dt_{i,c} = -γ_i (1 - ε) w_c log p_{i,c}``, ``dL/dw_c = -Σ_i γ_i t'_{i,c} log p_{i,c}``."""

    @staticmethod
    def forward(
        ctx: Any,
        input: torch.Tensor,
        target: torch.Tensor,
        weight: torch.Tensor | None,
        reduction: str,
        label_smoothing: float,
    ) -> torch.Tensor:
        classes = input.shape[1] if input.dim() >= 2 else input.shape[0]
        logits = _rows(input, classes)
        target_rows = _rows(target.to(input.dtype), classes)
        kernel_weight = None if weight is None else weight.to(input.dtype).contiguous()
        loss, lse, mass = kernels.cross_entropy_probabilities_forward(
            logits, target_rows, kernel_weight, label_smoothing
        )
        ctx.options = (input.shape, target.dtype, reduction, label_smoothing)
        ctx.save_for_backward(logits, target_rows, weight, kernel_weight, lse, mass)
        if reduction == "none":
            sample_shape = input.shape[:1] + input.shape[2:] if input.dim() >= 2 else ()
            return loss.reshape(sample_shape).to(input.dtype)
        total = loss.sum()
        if reduction == "mean":
            total = total / logits.shape[0] if logits.shape[0] else total.new_tensor(float("nan"))
        return total.to(input.dtype)

    @staticmethod
    @_first_order_only
    @once_differentiable
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        logits, target, weight, kernel_weight, lse, mass = ctx.saved_tensors
        shape, target_dtype, reduction, label_smoothing = ctx.options
        # γ_i = dL/dℓ_i: g_i, g, or g / rows
        gamma = grad_output.reshape(-1) if reduction == "none" else grad_output.reshape(1)
        if reduction == "mean":
            gamma = gamma / logits.shape[0]
        grad_input = grad_target = grad_weight = None
        if ctx.needs_input_grad[0]:
            # dL/dx = γ_i (p Q_i - q), p recomputed from the saved lse
            grad_input = _unrows(
                kernels.cross_entropy_probabilities_backward(
                    gamma, logits, target, lse, mass, kernel_weight, label_smoothing
                ),
                shape,
            )
        if ctx.needs_input_grad[1] or (weight is not None and ctx.needs_input_grad[2]):
            # log p = x - lse, rebuilt only for these rarely needed gradients
            log_probs = logits - lse.to(logits.dtype)[:, None]
            gamma_rows = gamma.to(logits.dtype).expand(logits.shape[0])[:, None]
            class_weight = 1.0 if weight is None else weight.to(logits.dtype)
            if ctx.needs_input_grad[1]:
                # dL/dt = -γ (1 - ε) w log p
                grad = -gamma_rows * (1 - label_smoothing) * class_weight * log_probs
                grad_target = _unrows(grad, shape).to(target_dtype)
            if weight is not None and ctx.needs_input_grad[2]:
                # t' = (1 - ε) t + ε / C
                smoothed = target * (1 - label_smoothing) + label_smoothing / logits.shape[1]
                # dL/dw = -Σ_i γ_i t' log p
                grad_weight = (-(gamma_rows * smoothed * log_probs).sum(0)).to(weight.dtype)
        return grad_input, grad_target, grad_weight, None, None


class LayerNormFunction(torch.autograd.Function):
    """Layer normalisation over the trailing ``normalized_dims`` dimensions (flattened into one
    row) on the layer-norm kernels; keeps ``x``, ``w``, ``μ`` and ``r``."""

    @staticmethod
    def forward(
        ctx: Any,
        input: torch.Tensor,
        normalized_dims: int,
        weight: torch.Tensor | None,
        bias: torch.Tensor | None,
        eps: float,
    ) -> torch.Tensor:
        width = math.prod(input.shape[input.dim() - normalized_dims :])
        # rows counted from the leading dimensions: reshape(-1, 0) is ambiguous for an empty row
        rows = input.contiguous().reshape(
            math.prod(input.shape[: input.dim() - normalized_dims]), width
        )
        # float32 parameters of a float16/bfloat16 input are read in the input's dtype
        flat_weight = None if weight is None else weight.to(input.dtype).contiguous().reshape(width)
        flat_bias = None if bias is None else bias.to(input.dtype).contiguous().reshape(width)
        output, mean, rstd = _triton_ops.layer_norm_forward(rows, flat_weight, flat_bias, eps)
        ctx.shapes = (input.shape, input.shape[input.dim() - normalized_dims :])
        ctx.save_for_backward(rows, flat_weight, mean, rstd)
        return output.reshape(input.shape)

    @staticmethod
    @_first_order_only
    @once_differentiable
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        rows, weight, mean, rstd = ctx.saved_tensors
        input_shape, normalized_shape = ctx.shapes
        parameters = ctx.needs_input_grad[2] or ctx.needs_input_grad[3]
        # dL/dx = r (w g - x̂ c_1 - c_2); dL/dw = Σ g x̂, dL/db = Σ g (partial sums, added)
        grad_input, grad_weight, grad_bias = _triton_ops.layer_norm_backward(
            grad_output.contiguous().reshape(rows.shape), rows, weight, mean, rstd, parameters
        )
        grad_weight = grad_weight.reshape(normalized_shape) if ctx.needs_input_grad[2] else None
        grad_bias = grad_bias.reshape(normalized_shape) if ctx.needs_input_grad[3] else None
        return grad_input.reshape(input_shape), None, grad_weight, grad_bias, None


class BatchNormFunction(torch.autograd.Function):
    """Batch normalisation of ``[N, C, *]`` on the batch-norm kernels: statistics (training), the
    per-channel affine map ``y = (w r) x + (b - μ w r)``, and in backward the per-channel sums
    ``Σ g``, ``Σ g (x - μ)`` and the affine map ``dL/dx = (w r) g - (r² c_1) x + r (r c_1 μ -
    c_2)``. The running statistics are updated in torch ops on the ``[C]`` vectors, as torch
    does: ``(1 - m) running + m · batch`` with the unbiased batch variance."""

    @staticmethod
    def forward(
        ctx: Any,
        input: torch.Tensor,
        running_mean: torch.Tensor | None,
        running_var: torch.Tensor | None,
        weight: torch.Tensor | None,
        bias: torch.Tensor | None,
        training: bool,
        momentum: float,
        eps: float,
    ) -> torch.Tensor:
        x = input.contiguous()
        ctx.empty = x.numel() == 0
        if ctx.empty:
            # Nothing to normalise, no statistics to update (as in torch).
            return x.clone()
        channels = x.shape[1]
        count = x.numel() // channels if channels else 0
        statistics_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        if training:
            mean, variance = _triton_ops.batch_norm_statistics(x)
            with torch.no_grad():
                if running_mean is not None:
                    running_mean.mul_(1 - momentum).add_(
                        mean.to(running_mean.dtype), alpha=momentum
                    )
                if running_var is not None:
                    unbiased = variance * (count / max(count - 1, 1))
                    running_var.mul_(1 - momentum).add_(
                        unbiased.to(running_var.dtype), alpha=momentum
                    )
        else:
            mean = running_mean.to(statistics_dtype).clone()
            variance = running_var.to(statistics_dtype)
        # r = 1 / √(σ² + eps)
        rstd = torch.rsqrt(variance + eps)
        affine = torch.ones_like(rstd) if weight is None else weight.to(statistics_dtype)
        shift = -mean * affine * rstd
        if bias is not None:
            shift = shift + bias.to(statistics_dtype)
        # y = (w r) x + (b - μ w r)
        output = _triton_ops.channel_affine(x, (affine * rstd).contiguous(), shift.contiguous())
        ctx.options = (training, count)
        ctx.save_for_backward(x, weight, mean, rstd)
        return output

    @staticmethod
    @_first_order_only
    @once_differentiable
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        if ctx.empty:
            # dL/dx: empty like x; dL/dw = dL/db = 0, sums over no elements
            zeros = grad_output.new_zeros(grad_output.shape[1])
            grad_weight = zeros if ctx.needs_input_grad[3] else None
            grad_bias = zeros.clone() if ctx.needs_input_grad[4] else None
            grad_input = torch.zeros_like(grad_output)
            return grad_input, None, None, grad_weight, grad_bias, None, None, None
        x, weight, mean, rstd = ctx.saved_tensors
        training, count = ctx.options
        g = grad_output.contiguous()
        affine = torch.ones_like(rstd) if weight is None else weight.to(rstd.dtype)
        # S_g = Σ g = dL/db, and Σ g (x - μ)
        grad_bias, centered_dot = _triton_ops.batch_norm_gradient_sums(g, x, mean)
        # dL/dw = Σ g x̂ = r Σ g (x - μ)
        grad_weight = rstd * centered_dot
        grad_input = None
        if ctx.needs_input_grad[0]:
            if training:
                # c_1 = w dL/dw / n, c_2 = w dL/db / n
                c1 = affine * grad_weight / count
                c2 = affine * grad_bias / count
                # dL/dx = (w r) g - (r² c_1) x + r (r c_1 μ - c_2)
                grad_input = _triton_ops.channel_affine(
                    x,
                    (-rstd * rstd * c1).contiguous(),
                    (rstd * (rstd * c1 * mean - c2)).contiguous(),
                    g,
                    (affine * rstd).contiguous(),
                )
            else:
                # dL/dx = (w r) g (μ and r are the running statistics, constants)
                grad_input = _triton_ops.channel_affine(
                    g, (affine * rstd).contiguous(), torch.zeros_like(rstd)
                )
        parameter_dtype = x.dtype if weight is None else weight.dtype
        grad_weight = grad_weight.to(parameter_dtype) if ctx.needs_input_grad[3] else None
        grad_bias = grad_bias.to(parameter_dtype) if ctx.needs_input_grad[4] else None
        return grad_input, None, None, grad_weight, grad_bias, None, None, None


class DropoutFunction(torch.autograd.Function):
    """Dropout on the seeded kernel: keeps one integer seed, and the backward regenerates the
    forward's mask from it."""

    @staticmethod
    def forward(ctx: Any, input: torch.Tensor, p: float, inplace: bool) -> torch.Tensor:
        ctx.p, ctx.seed = p, kernels.new_seed()
        contiguous = input.contiguous()
        if p == 1:
            # Everything dropped: zeros, no mask to draw (as torch).
            output = input.zero_() if inplace else torch.zeros_like(input)
        elif inplace:
            kernels.dropout_forward(contiguous, p, ctx.seed, out=contiguous)
            if contiguous.data_ptr() != input.data_ptr():
                input.copy_(contiguous)
            output = input
        else:
            output = kernels.dropout_forward(contiguous, p, ctx.seed)
        if inplace:
            ctx.mark_dirty(output)
        return output

    @staticmethod
    @_first_order_only
    @once_differentiable
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        if ctx.p == 1:
            # dL/dx = 0: every element was dropped
            return torch.zeros_like(grad_output), None, None
        # dL/dx = g m / (1 - p), m regenerated from the seed
        return kernels.dropout_backward(grad_output.contiguous(), ctx.p, ctx.seed), None, None


def _on_torch_unless_real_float(
    name: str, input: torch.Tensor, function: type[torch.autograd.Function], *args: Any
) -> torch.Tensor | None:
    """Run ``nn.<name>`` for an input the float kernels cannot take on the torch path's
    ``function`` (recorded as ``nn.<name>.dtype``: torch): an integer input of relu (which torch
    keeps integer), a complex one of sigmoid and tanh (torch computes them; relu refuses it as
    torch does). None for a real floating-point input, which the kernels take."""
    if input.is_floating_point():
        return None
    _record_torch(f"nn.{name}.dtype", input.device)
    return function.apply(input, *args)


def _promoted(input: torch.Tensor) -> torch.Tensor:
    """An integer or bool input in torch's default float dtype, as torch's sigmoid and tanh
    compute it."""
    if input.is_floating_point() or input.is_complex():
        return input
    return input.to(torch.get_default_dtype())


def relu(input: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    """:func:`torchopt_lab.nn.functional.relu` on the activation kernel."""
    on_torch = _on_torch_unless_real_float("relu", input, ReLUFunction, inplace)
    if on_torch is not None:
        return on_torch
    return ActivationFunction.apply(input, "relu", 0.0, inplace)


def leaky_relu(
    input: torch.Tensor, negative_slope: float = 0.01, inplace: bool = False
) -> torch.Tensor:
    """:func:`torchopt_lab.nn.functional.leaky_relu` on the activation kernel."""
    return ActivationFunction.apply(input, "leaky_relu", negative_slope, inplace)


def sigmoid(input: torch.Tensor) -> torch.Tensor:
    """:func:`torchopt_lab.nn.functional.sigmoid` on the activation kernel."""
    input = _promoted(input)
    on_torch = _on_torch_unless_real_float("sigmoid", input, SigmoidFunction)
    if on_torch is not None:
        return on_torch
    return ActivationFunction.apply(input, "sigmoid", 0.0, False)


def tanh(input: torch.Tensor) -> torch.Tensor:
    """:func:`torchopt_lab.nn.functional.tanh` on the activation kernel."""
    input = _promoted(input)
    on_torch = _on_torch_unless_real_float("tanh", input, TanhFunction)
    if on_torch is not None:
        return on_torch
    return ActivationFunction.apply(input, "tanh", 0.0, False)


def gelu(input: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    """:func:`torchopt_lab.nn.functional.gelu` on the activation kernel."""
    activation = "gelu_tanh" if approximate == "tanh" else "gelu"
    return ActivationFunction.apply(input, activation, 0.0, False)


def silu(input: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    """:func:`torchopt_lab.nn.functional.silu` on the activation kernel (its derivative needs the
    input, so in place it runs on a copy, as the torch path does)."""
    if inplace:
        return input.copy_(ActivationFunction.apply(input.clone(), "silu", 0.0, False))
    return ActivationFunction.apply(input, "silu", 0.0, False)


def softmax(input: torch.Tensor, dim: int, dtype: torch.dtype | None = None) -> torch.Tensor:
    """:func:`torchopt_lab.nn.functional.softmax` on the row kernels."""
    return SoftmaxFunction.apply(input, dim, dtype, False)


def log_softmax(input: torch.Tensor, dim: int, dtype: torch.dtype | None = None) -> torch.Tensor:
    """:func:`torchopt_lab.nn.functional.log_softmax` on the row kernels."""
    return SoftmaxFunction.apply(input, dim, dtype, True)


def cross_entropy(
    input: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """:func:`torchopt_lab.nn.functional.cross_entropy` on the LSE-only kernels, class indices or
    class probabilities (``target`` of the input's shape)."""
    if target.shape == input.shape and target.is_floating_point():
        return CrossEntropyProbabilitiesFunction.apply(
            input, target, weight, reduction, label_smoothing
        )
    return CrossEntropyFunction.apply(
        input, target, weight, ignore_index, reduction, label_smoothing
    )


def layer_norm(
    input: torch.Tensor,
    normalized_shape: list[int],
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
) -> torch.Tensor:
    """:func:`torchopt_lab.nn.functional.layer_norm` on the layer-norm kernels."""
    return LayerNormFunction.apply(input, len(normalized_shape), weight, bias, eps)


def batch_norm(
    input: torch.Tensor,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> torch.Tensor:
    """:func:`torchopt_lab.nn.functional.batch_norm` on the batch-norm kernels."""
    return BatchNormFunction.apply(
        input, running_mean, running_var, weight, bias, training, momentum, eps
    )


def dropout(
    input: torch.Tensor, p: float = 0.5, training: bool = True, inplace: bool = False
) -> torch.Tensor:
    """:func:`torchopt_lab.nn.functional.dropout` on the seeded kernel (called only when
    training with ``0 < p``)."""
    return DropoutFunction.apply(input, p, inplace)


def linear_activation(
    input: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    activation: str,
    negative_slope: float,
) -> torch.Tensor:
    """:func:`torchopt_lab.nn.fused.linear_activation`: the GEMM, then the fused kernel."""
    return LinearActivationFunction.apply(input, weight, bias, activation, negative_slope)


def linear(
    input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """:func:`torchopt_lab.nn.functional.linear`: torch's GEMM with the torch path's backward
    (recorded as ``nn.linear.gemm``)."""
    _record_torch("nn.linear.gemm", input.device)
    return _linear.linear(input, weight, bias)


def conv2d(
    input: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    stride: int | tuple[int, int] = 1,
    padding: str | int | tuple[int, int] = 0,
    dilation: int | tuple[int, int] = 1,
    groups: int = 1,
) -> torch.Tensor:
    """:func:`torchopt_lab.nn.functional.conv2d`: torch's convolution with the torch path's
    backward (recorded as ``nn.conv2d.convolution``)."""
    _record_torch("nn.conv2d.convolution", input.device)
    return _conv.conv2d(input, weight, bias, stride, padding, dilation, groups)


def mse_loss(
    input: torch.Tensor,
    target: torch.Tensor,
    reduction: str = "mean",
    weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """:func:`torchopt_lab.nn.functional.mse_loss`: no kernel, the torch path (recorded as
    ``nn.mse_loss.loss``)."""
    _record_torch("nn.mse_loss.loss", input.device)
    return MSELossFunction.apply(input, target, weight, reduction)


FUNCTIONS: dict[str, Callable[..., torch.Tensor]] = {
    "batch_norm": batch_norm,
    "conv2d": conv2d,
    "cross_entropy": cross_entropy,
    "dropout": dropout,
    "gelu": gelu,
    "layer_norm": layer_norm,
    "leaky_relu": leaky_relu,
    "linear": linear,
    "linear_activation": linear_activation,
    "log_softmax": log_softmax,
    "mse_loss": mse_loss,
    "relu": relu,
    "sigmoid": sigmoid,
    "silu": silu,
    "softmax": softmax,
    "tanh": tanh,
}
