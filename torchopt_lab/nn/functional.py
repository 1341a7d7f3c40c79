"""Drop-in replacements for the ``torch.nn.functional`` functions of the same names.

Same signatures, defaults, results and error types as torch for everything they cover; each runs a
``torch.autograd.Function`` whose backward is written by hand (see the Function's docstring for
the formulas) and is itself differentiable on the torch path, so double backward and
Hessian-vector products work. Every call goes through :mod:`torchopt_lab.nn._dispatch`, which
picks the torch path or Triton kernels (``TORCHOPT_LAB_BACKEND`` and
:func:`torchopt_lab.backend_info` apply).
"""

from __future__ import annotations

import math
import warnings

import torch
from torch.nn import _reduction

from torchopt_lab.nn import _conv, _linear
from torchopt_lab.nn._activation import (
    GELUFunction,
    LeakyReLUFunction,
    ReLUFunction,
    SigmoidFunction,
    TanhFunction,
)
from torchopt_lab.nn._autocast import autocast_inputs
from torchopt_lab.nn._dispatch import triton_function, use_triton
from torchopt_lab.nn._dropout import DropoutFunction
from torchopt_lab.nn._embedding import embedding
from torchopt_lab.nn._function import apply
from torchopt_lab.nn._loss import (
    CrossEntropyFunction,
    CrossEntropyProbabilitiesFunction,
    MSELossFunction,
)
from torchopt_lab.nn._norm import BatchNormFunction, LayerNormFunction, check_normalized_shape
from torchopt_lab.nn._rms_norm import rms_norm
from torchopt_lab.nn._silu import silu
from torchopt_lab.nn._softmax import LogSoftmaxFunction, SoftmaxFunction

__all__ = [
    "batch_norm",
    "conv2d",
    "cross_entropy",
    "dropout",
    "embedding",
    "gelu",
    "layer_norm",
    "leaky_relu",
    "linear",
    "log_softmax",
    "mse_loss",
    "relu",
    "rms_norm",
    "sigmoid",
    "silu",
    "softmax",
    "tanh",
]

_REDUCTIONS = ("none", "mean", "sum")


def _check_reduction(size_average: bool | None, reduce: bool | None, reduction: str) -> str:
    if size_average is not None or reduce is not None:
        reduction = _reduction.legacy_get_string(size_average, reduce)
    if reduction not in _REDUCTIONS:
        raise ValueError(f"{reduction} is not a valid value for reduction")
    return reduction


def _check_floating(name: str, *tensors: torch.Tensor | None) -> None:
    for tensor in tensors:
        if tensor is not None and not tensor.is_floating_point():
            raise NotImplementedError(
                f"{name} is not implemented for {tensor.dtype} tensors; it needs a floating-point "
                "dtype"
            )


def _check_dtype(name: str, input: torch.Tensor, **tensors: torch.Tensor | None) -> None:
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


def linear(
    input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """``input @ weight.T + bias``; see :class:`~torchopt_lab.nn._linear.LinearFunction`."""
    input, weight, bias = autocast_inputs("linear", input, weight, bias)
    if use_triton("linear", input, weight, bias):
        return triton_function("linear")(input, weight, bias)
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
    """2-D convolution, ``padding`` a number, a pair or ``"valid"``/``"same"``; see
    :class:`~torchopt_lab.nn._conv.Conv2dFunction`."""
    input, weight, bias = autocast_inputs("conv2d", input, weight, bias)
    if use_triton("conv2d", input, weight, bias):
        return triton_function("conv2d")(input, weight, bias, stride, padding, dilation, groups)
    return _conv.conv2d(input, weight, bias, stride, padding, dilation, groups)


def relu(input: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    """``max(input, 0)``, in place when ``inplace``; see
    :class:`~torchopt_lab.nn._activation.ReLUFunction`."""
    if input.dtype == torch.bool:
        raise RuntimeError("Boolean inputs not supported for relu")
    if use_triton("relu", input):
        return triton_function("relu")(input, inplace)
    return apply(ReLUFunction, input, inplace)


def leaky_relu(
    input: torch.Tensor, negative_slope: float = 0.01, inplace: bool = False
) -> torch.Tensor:
    """``input`` where positive, ``negative_slope * input`` elsewhere; see
    :class:`~torchopt_lab.nn._activation.LeakyReLUFunction`."""
    if inplace and negative_slope < 0 and input.requires_grad and torch.is_grad_enabled():
        raise RuntimeError(
            f"leaky_relu(inplace=True) with negative_slope={negative_slope} cannot be "
            "differentiated: the sign of the input cannot be read back from the output. Use "
            "inplace=False or a non-negative slope."
        )
    _check_floating("leaky_relu", input)
    if use_triton("leaky_relu", input):
        return triton_function("leaky_relu")(input, negative_slope, inplace)
    return apply(LeakyReLUFunction, input, negative_slope, inplace)


def sigmoid(input: torch.Tensor) -> torch.Tensor:
    """``1 / (1 + exp(-input))``; see :class:`~torchopt_lab.nn._activation.SigmoidFunction`."""
    if use_triton("sigmoid", input):
        return triton_function("sigmoid")(input)
    return apply(SigmoidFunction, input)


def tanh(input: torch.Tensor) -> torch.Tensor:
    """``tanh(input)``; see :class:`~torchopt_lab.nn._activation.TanhFunction`."""
    if use_triton("tanh", input):
        return triton_function("tanh")(input)
    return apply(TanhFunction, input)


def gelu(input: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    """GELU, exact (``approximate="none"``) or with the tanh approximation; see
    :class:`~torchopt_lab.nn._activation.GELUFunction`."""
    if approximate not in ("none", "tanh"):
        raise RuntimeError(
            f"approximate argument must be either none or tanh, got approximate={approximate!r}"
        )
    if use_triton("gelu", input):
        return triton_function("gelu")(input, approximate)
    return apply(GELUFunction, input, approximate)


def _softmax_dim(name: str, input: torch.Tensor, dim: int | None, stacklevel: int) -> int:
    if dim is not None:
        return dim
    warnings.warn(
        f"Implicit dimension choice for {name} has been deprecated. "
        "Change the call to include dim=X as an argument.",
        stacklevel=stacklevel,
    )
    return 0 if input.dim() in (0, 1, 3) else 1


def softmax(
    input: torch.Tensor,
    dim: int | None = None,
    _stacklevel: int = 3,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Softmax along ``dim`` (computed in ``dtype`` when given); see
    :class:`~torchopt_lab.nn._softmax.SoftmaxFunction`."""
    if dtype is None:
        (input,) = autocast_inputs("softmax", input)
    dim = _softmax_dim("softmax", input, dim, _stacklevel)
    if use_triton("softmax", input):
        return triton_function("softmax")(input, dim, dtype=dtype)
    return apply(SoftmaxFunction, input, dim, dtype)


def log_softmax(
    input: torch.Tensor,
    dim: int | None = None,
    _stacklevel: int = 3,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Log-softmax along ``dim`` (computed in ``dtype`` when given); see
    :class:`~torchopt_lab.nn._softmax.LogSoftmaxFunction`."""
    if dtype is None:
        (input,) = autocast_inputs("log_softmax", input)
    dim = _softmax_dim("log_softmax", input, dim, _stacklevel)
    if use_triton("log_softmax", input):
        return triton_function("log_softmax")(input, dim, dtype=dtype)
    return apply(LogSoftmaxFunction, input, dim, dtype)


def mse_loss(
    input: torch.Tensor,
    target: torch.Tensor,
    size_average: bool | None = None,
    reduce: bool | None = None,
    reduction: str = "mean",
    weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean squared error, optionally weighted per element; see
    :class:`~torchopt_lab.nn._loss.MSELossFunction`."""
    input, target, weight = autocast_inputs("mse_loss", input, target, weight)
    if target.size() != input.size():
        warnings.warn(
            f"Using a target size ({target.size()}) that is different to the input size "
            f"({input.size()}). This will likely lead to incorrect results due to broadcasting. "
            "Please ensure they have the same size.",
            stacklevel=2,
        )
    reduction = _check_reduction(size_average, reduce, reduction)
    torch.broadcast_shapes(input.shape, target.shape)
    if weight is not None and weight.size() != input.size():
        raise ValueError(
            f"Weights and input must have the same size, got weight of size {list(weight.shape)} "
            f"and input of size {list(input.shape)}."
        )
    # An integer input or target is computed in the floating dtype of the other (as torch);
    # only both integer is refused.
    promoted = torch.promote_types(input.dtype, target.dtype)
    if not promoted.is_floating_point:
        raise NotImplementedError(
            f"mse_loss is not implemented for {promoted} tensors; it needs a floating-point dtype"
        )
    _check_floating("mse_loss", weight)
    if use_triton("mse_loss", input, target, weight):
        return triton_function("mse_loss")(input, target, reduction=reduction, weight=weight)
    return apply(MSELossFunction, input, target, weight, reduction)


def cross_entropy(
    input: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None = None,
    size_average: bool | None = None,
    ignore_index: int = -100,
    reduce: bool | None = None,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """Cross-entropy between logits ``input`` (classes along dimension 1, or 0 for a 1-D input)
    and class indices or class probabilities ``target``; see
    :class:`~torchopt_lab.nn._loss.CrossEntropyFunction` and
    :class:`~torchopt_lab.nn._loss.CrossEntropyProbabilitiesFunction`."""
    input, target, weight = autocast_inputs("cross_entropy", input, target, weight)
    reduction = _check_reduction(size_average, reduce, reduction)
    # torch's rule: only a value above 1 is refused; one that is not above 0 (negative, NaN)
    # means no smoothing
    if label_smoothing > 1.0:
        raise RuntimeError(f"label_smoothing must be between 0.0 and 1.0. Got: {label_smoothing}")
    label_smoothing = float(label_smoothing) if label_smoothing > 0.0 else 0.0
    if input.dim() == 0:
        raise IndexError(
            "cross_entropy expects an input of at least 1 dimension (classes), got a 0-D input"
        )
    _check_floating("cross_entropy", input)
    class_dim = 1 if input.dim() >= 2 else 0
    classes = input.shape[class_dim]
    if weight is not None and (weight.dim() != 1 or weight.numel() != classes):
        raise RuntimeError(
            f"weight tensor should be defined either for all {classes} classes or no classes but "
            f"got weight tensor of shape: {list(weight.shape)}"
        )
    _check_dtype("cross_entropy", input, weight=weight)
    probabilities = target.shape == input.shape
    if probabilities:
        if not target.is_floating_point():
            raise RuntimeError(
                "Expected floating point type for target with class probabilities, got "
                f"{target.dtype}"
            )
        if ignore_index >= 0:
            raise RuntimeError(
                f"ignore_index is not supported for floating point target, got "
                f"ignore_index={ignore_index}"
            )
    else:
        if weight is not None and weight.requires_grad and torch.is_grad_enabled():
            raise RuntimeError(
                "cross_entropy with class-index targets is not differentiable with respect to "
                "weight (as in torch): weight cannot have requires_grad=True"
            )
        _check_class_target(input, target, class_dim, classes, ignore_index)
        target = target.long()
    if use_triton("cross_entropy", input, target, weight):
        return triton_function("cross_entropy")(
            input,
            target,
            weight,
            ignore_index=ignore_index,
            reduction=reduction,
            label_smoothing=label_smoothing,
        )
    if probabilities:
        return apply(
            CrossEntropyProbabilitiesFunction,
            input,
            target,
            weight,
            class_dim,
            reduction,
            label_smoothing,
        )[0]
    return apply(
        CrossEntropyFunction,
        input,
        target,
        weight,
        class_dim,
        ignore_index,
        reduction,
        label_smoothing,
    )[0]


def _check_class_target(
    input: torch.Tensor, target: torch.Tensor, class_dim: int, classes: int, ignore_index: int
) -> None:
    if target.dtype not in (torch.long, torch.uint8):
        raise RuntimeError(f"expected target dtype to be Long or Byte, but got {target.dtype}")
    expected = input.shape[:class_dim] + input.shape[class_dim + 1 :]
    if target.shape != expected:
        if input.dim() >= 2 and target.dim() >= 1 and target.shape[0] != input.shape[0]:
            raise ValueError(
                f"Expected input batch_size ({input.shape[0]}) to match target batch_size "
                f"({target.shape[0]})."
            )
        raise RuntimeError(
            f"size mismatch (got input: {list(input.shape)}, target: {list(target.shape)})"
        )
    if not torch.compiler.is_compiling() and torch._C._functorch.is_functorch_wrapped_tensor(
        target
    ):
        # Under torch.func transforms a check cannot branch on the (maybe batched) values: the
        # Function's gather refuses an out-of-range class index itself (RuntimeError).
        return
    out_of_range = ((target < 0) | (target >= classes)) & (target != ignore_index)
    if target.device.type != "cpu" or torch.compiler.is_compiling():
        # No host synchronisation (and no graph break under torch.compile): the device checks and
        # raises RuntimeError when it gets there, as torch's CUDA kernel asserts on the device.
        torch._assert_async(
            ~out_of_range.any(), f"cross_entropy: a target is out of bounds [0, {classes})"
        )
    elif out_of_range.any():
        raise IndexError(f"Target {target[out_of_range][0].item()} is out of bounds.")


def layer_norm(
    input: torch.Tensor,
    normalized_shape: list[int] | tuple[int, ...] | torch.Size,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
) -> torch.Tensor:
    """Layer normalisation over the trailing ``normalized_shape`` dimensions; see
    :class:`~torchopt_lab.nn._norm.LayerNormFunction`."""
    input, weight, bias = autocast_inputs("layer_norm", input, weight, bias)
    normalized_shape = check_normalized_shape("layer_norm", input, normalized_shape, ", ")
    count = len(normalized_shape)
    for name, tensor in (("weight", weight), ("bias", bias)):
        if tensor is not None and list(tensor.shape) != normalized_shape:
            raise RuntimeError(
                f"Expected {name} to be of same shape as normalized_shape, but got {name} of "
                f"shape {list(tensor.shape)} and normalized_shape = {normalized_shape}"
            )
    _check_floating("layer_norm", input)
    _check_dtype("layer_norm", input, weight=weight, bias=bias)
    if use_triton("layer_norm", input, weight, bias):
        return triton_function("layer_norm")(input, normalized_shape, weight, bias, eps)
    return apply(LayerNormFunction, input, count, weight, bias, eps)[0]


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
    """Batch normalisation over dimension 1 of ``[N, C, *]``; in training it updates
    ``running_mean``/``running_var`` in place (when given) as torch does; see
    :class:`~torchopt_lab.nn._norm.BatchNormFunction`."""
    if training:
        if input.dim() == 0:
            raise IndexError("batch_norm expects an input of shape [N, C, *], got a 0-D input")
        # torch's rule: N times the spatial size, not counting C (1 for [1, 0] too)
        if input.shape[0] * math.prod(input.shape[2:]) == 1:
            raise ValueError(
                "Expected more than 1 value per channel when training, got input size "
                f"{input.size()}"
            )
    if training and eps <= 0.0:
        raise ValueError(f"batch_norm eps must be positive during training, but got {eps}")
    if eps < 0.0:
        raise ValueError(f"batch_norm eps must be non-negative, but got {eps}")
    if input.dim() == 1 and input.numel() == 0:
        # torch returns an empty result for an empty 1-D input, whatever the other arguments
        return input.clone()
    if input.dim() < 2:
        # torch's errors: a 1-D input has no channel dimension (0 channels for the per-channel
        # tensors, an IndexError for the rest); a 0-D one fails a size check
        for name, tensor in (
            ("running_mean", running_mean),
            ("running_var", running_var),
            ("weight", weight),
            ("bias", bias),
        ):
            if input.dim() == 1 and tensor is not None and tensor.numel():
                raise RuntimeError(f"{name} should contain 0 elements not {tensor.numel()}")
        error = IndexError if input.dim() == 1 else RuntimeError
        raise error(
            f"batch_norm expects an input of shape [N, C, *], got input of size {list(input.shape)}"
        )
    channels = input.shape[1]
    for name, tensor in (
        ("weight", weight),
        ("bias", bias),
        ("running_mean", running_mean),
        ("running_var", running_var),
    ):
        if tensor is not None and tensor.numel() != channels:
            raise RuntimeError(f"{name} should contain {channels} elements not {tensor.numel()}")
    if not training and (running_mean is None or running_var is None):
        missing = "running_mean" if running_mean is None else "running_var"
        raise RuntimeError(f"{missing} must be defined in evaluation mode")
    _check_floating("batch_norm", input)
    _check_dtype(
        "batch_norm",
        input,
        weight=weight,
        bias=bias,
        running_mean=running_mean,
        running_var=running_var,
    )
    if use_triton("batch_norm", input, weight, bias):
        return triton_function("batch_norm")(
            input, running_mean, running_var, weight, bias, training, momentum, eps
        )
    return apply(
        BatchNormFunction, input, running_mean, running_var, weight, bias, training, momentum, eps
    )[0]


def dropout(
    input: torch.Tensor, p: float = 0.5, training: bool = True, inplace: bool = False
) -> torch.Tensor:
    """Zero each element with probability ``p`` and scale the rest by ``1 / (1 - p)`` (when
    ``training``); see :class:`~torchopt_lab.nn._dropout.DropoutFunction`."""
    if p < 0.0 or p > 1.0:
        raise ValueError(f"dropout probability has to be between 0 and 1, but got {p}")
    if not training or p == 0 or input.numel() == 0:
        return input
    if not input.is_floating_point() and not input.is_complex():
        # torch's error for an integer or bool input (its float mask cannot be cast back)
        raise RuntimeError(
            f"result type Float can't be cast to the desired output type {input.dtype}"
        )
    if use_triton("dropout", input):
        return triton_function("dropout")(input, p, training, inplace)
    return apply(DropoutFunction, input, p, inplace)[0]
