"""Drop-in replacements for ``torch.optim`` optimizers and ``torch.nn.utils`` gradient clipping.

Same arguments, defaults, errors, param groups and state dicts as torch; each step runs on the
backend :func:`torchopt_lab.backend.resolve` picks for its tensors. Each rule's math, paper and
differences from torch: docs/optimizers.md; adding a rule: docs/authoring.md.
"""

from torchopt_lab.optim.adadelta import Adadelta
from torchopt_lab.optim.adagrad import Adagrad
from torchopt_lab.optim.adam import Adam, AdamW
from torchopt_lab.optim.adamax import Adamax
from torchopt_lab.optim.clip import clip_grad_norm_, clip_grad_value_
from torchopt_lab.optim.lion import Lion
from torchopt_lab.optim.nadam import NAdam
from torchopt_lab.optim.radam import RAdam
from torchopt_lab.optim.rmsprop import RMSprop
from torchopt_lab.optim.rules import REGISTRY, RuleOptimizer
from torchopt_lab.optim.sgd import SGD, Momentum

__all__ = [
    "REGISTRY",
    "SGD",
    "Adadelta",
    "Adagrad",
    "Adam",
    "AdamW",
    "Adamax",
    "Lion",
    "Momentum",
    "NAdam",
    "RAdam",
    "RMSprop",
    "RuleOptimizer",
    "clip_grad_norm_",
    "clip_grad_value_",
]
