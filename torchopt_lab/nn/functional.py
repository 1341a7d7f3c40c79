"""Drop-in replacements for the ``torch.nn.functional`` functions of the same names.

Same signatures, defaults, results and error types as torch for everything they cover; each runs a
``torch.autograd.Function`` whose backward is written by hand (see the Function's docstring for
the formulas) and is itself differentiable on the torch path, so double backward and
Hessian-vector products work. Each function lives in its op's module (``_activation.py``,
``_norm.py``, ...) next to its torch-path and Triton-path Functions, and chooses between them
through :mod:`torchopt_lab.nn._dispatch` (``TORCHOPT_LAB_BACKEND`` and
:func:`torchopt_lab.backend_info` apply); this module re-exports them.
"""

from torchopt_lab.nn._activation import gelu, leaky_relu, relu, sigmoid, silu, tanh
from torchopt_lab.nn._conv import conv2d
from torchopt_lab.nn._cross_entropy import cross_entropy
from torchopt_lab.nn._dropout import dropout
from torchopt_lab.nn._embedding import embedding
from torchopt_lab.nn._linear import linear
from torchopt_lab.nn._mse_loss import mse_loss
from torchopt_lab.nn._norm import batch_norm, layer_norm
from torchopt_lab.nn._rms_norm import rms_norm
from torchopt_lab.nn._softmax import log_softmax, softmax

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
