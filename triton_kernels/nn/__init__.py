"""Triton kernels of the layers (``torchopt_lab.nn``), grouped by what they compute; each kernel
is private behind a public launcher that checks its inputs."""

from triton_kernels.nn.activation import (
    ACTIVATIONS,
    OUTPUT_DERIVATIVE,
    bias_activation_backward,
    bias_activation_forward,
)
from triton_kernels.nn.batch_norm import (
    batch_norm_gradient_sums,
    batch_norm_statistics,
    channel_affine,
)
from triton_kernels.nn.cross_entropy import (
    cross_entropy_backward,
    cross_entropy_forward,
    cross_entropy_probabilities_backward,
    cross_entropy_probabilities_forward,
)
from triton_kernels.nn.dropout import dropout_backward, dropout_forward, new_seed
from triton_kernels.nn.layer_norm import layer_norm_backward, layer_norm_forward
from triton_kernels.nn.rms_norm import rms_norm_backward, rms_norm_forward
from triton_kernels.nn.softmax import softmax_backward, softmax_forward

__all__ = [
    "ACTIVATIONS",
    "OUTPUT_DERIVATIVE",
    "batch_norm_gradient_sums",
    "batch_norm_statistics",
    "bias_activation_backward",
    "bias_activation_forward",
    "channel_affine",
    "cross_entropy_backward",
    "cross_entropy_forward",
    "cross_entropy_probabilities_backward",
    "cross_entropy_probabilities_forward",
    "dropout_backward",
    "dropout_forward",
    "layer_norm_backward",
    "layer_norm_forward",
    "new_seed",
    "rms_norm_backward",
    "rms_norm_forward",
    "softmax_backward",
    "softmax_forward",
]
