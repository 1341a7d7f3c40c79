"""LR schedulers drive ours exactly as they drive torch.optim, including OneCycleLR cycling
Adam's betas and SGD/RMSprop momentum."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from optim_cases import assert_params_close, clone_params, loss_of, make_params
from torch.optim import lr_scheduler

import torchopt_lab.optim as ours

STEPS = 24

SCHEDULERS: dict[str, Callable[[torch.optim.Optimizer], object]] = {
    "StepLR": lambda opt: lr_scheduler.StepLR(opt, step_size=5, gamma=0.5),
    "LambdaLR": lambda opt: lr_scheduler.LambdaLR(opt, lambda epoch: 1.0 / (1 + epoch)),
    # Cycles betas[0] / momentum too, for the optimizers that have one (not Adagrad).
    "OneCycleLR": lambda opt: lr_scheduler.OneCycleLR(
        opt,
        max_lr=0.05,
        total_steps=STEPS,
        cycle_momentum="momentum" in opt.defaults or "betas" in opt.defaults,
    ),
}

OPTIMIZERS = [
    (ours.Adam, torch.optim.Adam, {"lr": 0.01}),
    (ours.AdamW, torch.optim.AdamW, {"lr": 0.01}),
    (ours.SGD, torch.optim.SGD, {"lr": 0.01, "momentum": 0.9}),
    (ours.Momentum, torch.optim.SGD, {"lr": 0.01, "momentum": 0.9}),
    (ours.RMSprop, torch.optim.RMSprop, {"lr": 0.01, "momentum": 0.9}),
    (ours.Adagrad, torch.optim.Adagrad, {"lr": 0.01}),
]


def run(optimizer: torch.optim.Optimizer, params, make_scheduler) -> list[tuple]:
    scheduler = make_scheduler(optimizer)
    trace = []
    for _ in range(STEPS):
        optimizer.zero_grad()
        loss_of(params).backward()
        optimizer.step()
        scheduler.step()
        trace.append(
            tuple(
                (group["lr"], group.get("betas"), group.get("momentum"))
                for group in optimizer.param_groups
            )
        )
    return trace


@pytest.mark.parametrize("scheduler", SCHEDULERS, ids=str)
@pytest.mark.parametrize(
    ("mine", "theirs", "options"), OPTIMIZERS, ids=[cls.__name__ for cls, _, _ in OPTIMIZERS]
)
def test_lr_scheduler_drives_ours_like_torch(mine, theirs, options, scheduler: str) -> None:
    make = SCHEDULERS[scheduler]
    params = make_params(torch.float64)
    reference = clone_params(params)
    our_trace = run(mine(params, **options), params, make)
    their_trace = run(theirs(reference, **options), reference, make)
    assert our_trace == their_trace
    assert_params_close(params, reference, torch.float64)
