"""Layers with hand-written backward passes, mirroring ``torch.nn``: :mod:`.functional` holds the
functions, this package the modules. Their derivatives: docs/layers.md; their Triton kernels:
docs/kernels.md."""

from torchopt_lab.nn import functional, fused
from torchopt_lab.nn.modules import (
    GELU,
    BatchNorm1d,
    BatchNorm2d,
    Conv2d,
    CrossEntropyLoss,
    Dropout,
    LayerNorm,
    LeakyReLU,
    Linear,
    LogSoftmax,
    MSELoss,
    ReLU,
    Sequential,
    Sigmoid,
    Softmax,
    Tanh,
)

__all__ = [
    "GELU",
    "BatchNorm1d",
    "BatchNorm2d",
    "Conv2d",
    "CrossEntropyLoss",
    "Dropout",
    "LayerNorm",
    "LeakyReLU",
    "Linear",
    "LogSoftmax",
    "MSELoss",
    "ReLU",
    "Sequential",
    "Sigmoid",
    "Softmax",
    "Tanh",
    "functional",
    "fused",
]
