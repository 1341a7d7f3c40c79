"""Drive the optimizer kernels and torch.optim's functional API (the oracle) side by side.

``Run`` holds one optimizer's tensors twice: ``kernel_*`` updated by our launchers, ``reference_*``
by ``torch.optim.{sgd,adagrad,rmsprop,adam}`` with ``foreach=False`` on the same device.
Low-precision parameters are stepped by the reference in float32 and rounded back after each step,
which is the arithmetic the kernels promise (load, compute in float32, store).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch.optim.adagrad import adagrad
from torch.optim.adam import adam
from torch.optim.rmsprop import rmsprop
from torch.optim.sgd import sgd

from triton_kernels.optim import (
    ADAGRAD_FIELDS,
    ADAM_FIELDS,
    RMSPROP_FIELDS,
    SGD_FIELDS,
    MultiTensorTable,
    StepControls,
    adagrad_step,
    adam_step,
    rmsprop_step,
    sgd_step,
)

DEFAULTS = {
    "sgd": {"lr": 0.1, "momentum": 0.0, "dampening": 0.0, "weight_decay": 0.0, "nesterov": False},
    "adagrad": {"lr": 0.1, "lr_decay": 0.0, "weight_decay": 0.0, "eps": 1e-10},
    "rmsprop": {
        "lr": 0.01,
        "alpha": 0.99,
        "eps": 1e-8,
        "weight_decay": 0.0,
        "momentum": 0.0,
        "centered": False,
    },
    "adam": {
        "lr": 0.01,
        "beta1": 0.9,
        "beta2": 0.999,
        "eps": 1e-8,
        "weight_decay": 0.0,
        "amsgrad": False,
        "decoupled_weight_decay": False,
    },
}
FIELDS = {
    "sgd": SGD_FIELDS,
    "adagrad": ADAGRAD_FIELDS,
    "rmsprop": RMSPROP_FIELDS,
    "adam": ADAM_FIELDS,
}


def options_of(algorithm: str, overrides: dict) -> dict:
    return {**DEFAULTS[algorithm], "maximize": False, **overrides}


def state_rows(algorithm: str, options: dict) -> int:
    if algorithm == "sgd":
        return 1
    if algorithm == "adagrad":
        return 1
    return 3


def _new_state(algorithm: str, options: dict, params, dtype) -> list[list[torch.Tensor | None]]:
    def zeros():
        return [torch.zeros_like(p, dtype=dtype) for p in params]

    nones = [None] * len(params)
    if algorithm == "sgd":
        return [zeros() if options["momentum"] != 0 else nones]
    if algorithm == "adagrad":
        return [
            [
                torch.full_like(p, options.get("initial_accumulator_value", 0.0), dtype=dtype)
                for p in params
            ]
        ]
    if algorithm == "rmsprop":
        return [
            zeros(),
            zeros() if options["centered"] else nones,
            zeros() if options["momentum"] > 0 else nones,
        ]
    return [zeros(), zeros(), zeros() if options["amsgrad"] else nones]


@dataclass
class Run:
    """One optimizer's tensors, stepped by the kernels and by the oracle."""

    algorithm: str
    options: dict
    params: list[torch.Tensor]
    groups: list[int]
    group_lrs: list[float]
    state_dtype: torch.dtype | None = None
    block_size: int = 32
    table: MultiTensorTable = field(init=False)

    def __post_init__(self) -> None:
        dtype = self.params[0].dtype
        self.state_dtype = self.state_dtype or dtype
        self.kernel_params = [p.clone() for p in self.params]
        self.kernel_states = _new_state(self.algorithm, self.options, self.params, self.state_dtype)
        self.kernel_steps = (
            None
            if self.algorithm == "sgd"
            else [torch.zeros((), dtype=torch.float32) for _ in self.params]
        )
        self.reference_params = [p.clone() for p in self.params]
        self.reference_states = _new_state(
            self.algorithm, self.options, self.params, self.state_dtype
        )
        if self.algorithm == "sgd":
            self.reference_states = [[None] * len(self.params)]
        self.reference_steps = [torch.zeros((), dtype=torch.float32) for _ in self.params]
        self.table = MultiTensorTable(block_size=self.block_size)
        self.stepped = False

    def hyperparameters(self) -> torch.Tensor:
        rows = []
        for lr in self.group_lrs:
            values = {**self.options, "lr": lr}
            rows.append([float(values[name]) for name in FIELDS[self.algorithm]])
        return torch.tensor(rows, dtype=torch.float64)

    def kernel_step(self, grads: list[torch.Tensor], controls: StepControls | None = None) -> None:
        o = self.options
        # SGD's flag: this step starts the momentum buffer (torch's first step).
        flags = [0 if self.stepped else 1] * len(self.params) if self.algorithm == "sgd" else None
        self.table.update(
            self.kernel_params, grads, self.kernel_states, self.kernel_steps, self.groups, flags
        )
        hyper = self.hyperparameters()
        if self.algorithm == "sgd":
            sgd_step(
                self.table,
                hyper,
                momentum=o["momentum"] != 0,
                nesterov=o["nesterov"],
                maximize=o["maximize"],
                controls=controls,
            )
        elif self.algorithm == "adagrad":
            adagrad_step(self.table, hyper, maximize=o["maximize"], controls=controls)
        elif self.algorithm == "rmsprop":
            rmsprop_step(
                self.table,
                hyper,
                centered=o["centered"],
                momentum=o["momentum"] > 0,
                maximize=o["maximize"],
                controls=controls,
            )
        else:
            adam_step(
                self.table,
                hyper,
                amsgrad=o["amsgrad"],
                maximize=o["maximize"],
                decoupled_weight_decay=o["decoupled_weight_decay"],
                controls=controls,
            )
        self.stepped = True

    def reference_step(self, grads: list[torch.Tensor]) -> None:
        """One torch.optim step, group by group, in float32 for low-precision parameters."""
        dtype = self.params[0].dtype
        compute = torch.float64 if dtype == torch.float64 else torch.float32
        for group, lr in enumerate(self.group_lrs):
            index = [i for i, g in enumerate(self.groups) if g == group]
            params = [self.reference_params[i].to(compute) for i in index]
            group_grads = [grads[i].to(compute) for i in index]
            states = [
                [None if row[i] is None else row[i].to(compute) for i in index]
                for row in self.reference_states
            ]
            steps = [self.reference_steps[i] for i in index]
            _functional(
                self.algorithm, {**self.options, "lr": lr}, params, group_grads, states, steps
            )
            for position, i in enumerate(index):
                self.reference_params[i].copy_(params[position])
                for row, values in zip(self.reference_states, states, strict=True):
                    if values[position] is None:
                        continue
                    if row[i] is None:
                        row[i] = values[position].to(self.state_dtype)
                    else:
                        row[i].copy_(values[position])


def _functional(algorithm, o, params, grads, states, steps) -> None:
    if algorithm == "sgd":
        sgd(
            params,
            grads,
            states[0],
            foreach=False,
            weight_decay=o["weight_decay"],
            momentum=o["momentum"],
            lr=o["lr"],
            dampening=o["dampening"],
            nesterov=o["nesterov"],
            maximize=o["maximize"],
        )
    elif algorithm == "adagrad":
        adagrad(
            params,
            grads,
            states[0],
            steps,
            foreach=False,
            lr=o["lr"],
            weight_decay=o["weight_decay"],
            lr_decay=o["lr_decay"],
            eps=o["eps"],
            maximize=o["maximize"],
        )
    elif algorithm == "rmsprop":
        rmsprop(
            params,
            grads,
            states[0],
            states[1],
            states[2],
            steps,
            foreach=False,
            maximize=o["maximize"],
            lr=o["lr"],
            alpha=o["alpha"],
            eps=o["eps"],
            weight_decay=o["weight_decay"],
            momentum=o["momentum"],
            centered=o["centered"],
        )
    else:
        adam(
            params,
            grads,
            states[0],
            states[1],
            states[2],
            steps,
            foreach=False,
            decoupled_weight_decay=o["decoupled_weight_decay"],
            amsgrad=o["amsgrad"],
            beta1=o["beta1"],
            beta2=o["beta2"],
            lr=o["lr"],
            weight_decay=o["weight_decay"],
            eps=o["eps"],
            maximize=o["maximize"],
        )
