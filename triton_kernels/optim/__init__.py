"""Fused multi-tensor optimizer steps: one kernel launch per (device, dtype) group per step."""

from triton_kernels.optim.kernels import DIAGNOSTIC_FIELDS, UPDATES, KernelUpdate
from triton_kernels.optim.launchers import (
    ADAGRAD_FIELDS,
    ADAM_FIELDS,
    RMSPROP_FIELDS,
    SGD_FIELDS,
    StepControls,
    adagrad_step,
    adam_step,
    grad_square_norm,
    rmsprop_step,
    sgd_step,
    step,
)
from triton_kernels.optim.tables import (
    DEFAULT_BLOCK_SIZE,
    SUPPORTED_DTYPES,
    MultiTensorTable,
    same_layout,
    updatable_in_place,
)

__all__ = [
    "ADAGRAD_FIELDS",
    "ADAM_FIELDS",
    "DEFAULT_BLOCK_SIZE",
    "DIAGNOSTIC_FIELDS",
    "RMSPROP_FIELDS",
    "SGD_FIELDS",
    "SUPPORTED_DTYPES",
    "UPDATES",
    "KernelUpdate",
    "MultiTensorTable",
    "StepControls",
    "adagrad_step",
    "adam_step",
    "grad_square_norm",
    "rmsprop_step",
    "same_layout",
    "sgd_step",
    "step",
    "updatable_in_place",
]
