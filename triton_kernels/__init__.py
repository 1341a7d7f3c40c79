"""Triton kernels of torchopt-lab: the kernels and their launchers only, no torch.optim or nn code.

The import name ``triton_kernels`` is shared with an unrelated package; ``torchopt_lab.backend``
checks :data:`TORCHOPT_LAB_KERNELS` to be sure it imported this one.
"""

TORCHOPT_LAB_KERNELS = True

__all__ = ["TORCHOPT_LAB_KERNELS"]
