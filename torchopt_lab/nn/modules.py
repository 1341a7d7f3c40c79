"""Where the layer modules were defined before each moved into its op's module: kept so that a
model pickled whole (``torch.save(model)``) by an earlier version still loads. Import the layers
from :mod:`torchopt_lab.nn`."""

from torchopt_lab.nn import *  # noqa: F403
