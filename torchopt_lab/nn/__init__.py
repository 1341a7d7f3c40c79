"""Layers with hand-written backward passes, mirroring ``torch.nn``: :mod:`.functional` holds the
functions, this package the modules, each defined in its op's module next to its function. Each
module subclasses its ``torch.nn`` namesake and overrides only the forward, so constructor
arguments, parameter initialisation (same seed, same values), ``state_dict`` keys, ``repr`` and
``extra_repr`` are torch's: a ``torch.nn`` model's ``state_dict`` loads into the same model built
from these classes, and the two train identically. Their derivatives: docs/layers.md; their
Triton kernels: docs/kernels.md."""

from torch.nn import Sequential

from torchopt_lab.nn import functional, fused
from torchopt_lab.nn._activation import GELU, LeakyReLU, ReLU, Sigmoid, SiLU, Tanh
from torchopt_lab.nn._conv import Conv2d
from torchopt_lab.nn._cross_entropy import CrossEntropyLoss
from torchopt_lab.nn._dropout import Dropout
from torchopt_lab.nn._embedding import Embedding
from torchopt_lab.nn._linear import Linear
from torchopt_lab.nn._mse_loss import MSELoss
from torchopt_lab.nn._norm import BatchNorm1d, BatchNorm2d, LayerNorm
from torchopt_lab.nn._rms_norm import RMSNorm
from torchopt_lab.nn._softmax import LogSoftmax, Softmax

__all__ = [
    "GELU",
    "BatchNorm1d",
    "BatchNorm2d",
    "Conv2d",
    "CrossEntropyLoss",
    "Dropout",
    "Embedding",
    "LayerNorm",
    "LeakyReLU",
    "Linear",
    "LogSoftmax",
    "MSELoss",
    "RMSNorm",
    "ReLU",
    "Sequential",
    "SiLU",
    "Sigmoid",
    "Softmax",
    "Tanh",
    "functional",
    "fused",
]

# A pickle names a class by its module: the public one (``torchopt_lab.nn.Linear``), not the op
# module it is defined in, so that a model saved whole (``torch.save(model)``) survives moving a
# class between private modules. (``torchopt_lab.nn.modules`` keeps older pickles loading.)
for _name in __all__:
    _value = globals()[_name]
    if isinstance(_value, type) and _value.__module__.startswith(f"{__name__}._"):
        _value.__module__ = __name__
del _name, _value
