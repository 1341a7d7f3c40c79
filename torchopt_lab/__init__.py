"""torchopt-lab: drop-in optimizers, layers with hand-written backward passes, and experiments
you can watch."""

from torchopt_lab import optim
from torchopt_lab.backend import backend_info

__version__ = "0.1.0"

__all__ = ["__version__", "backend_info", "optim"]
