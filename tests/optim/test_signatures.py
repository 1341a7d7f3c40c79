"""Constructors take torch.optim's arguments with the same names, positions, kinds and defaults,
then ours (keyword-only)."""

from __future__ import annotations

import inspect

import pytest
import torch

import torchopt_lab.optim as ours

# backend and max_grad_norm (issue 2), then the fused kernels' options (issue 3).
EXTRA = ["backend", "max_grad_norm", "skip_nonfinite", "float32_state", "record_norms"]
# torch.optim.RMSprop has no fused: ours takes it first among its extras (keyword-only, default
# None, before backend), as the rule optimizers whose torch counterparts lack it (issue 10).
ADDS_FUSED = {torch.optim.RMSprop}


def parameters(cls) -> list[inspect.Parameter]:
    return list(inspect.signature(cls.__init__).parameters.values())


@pytest.mark.parametrize(
    ("mine", "theirs"),
    [
        (ours.SGD, torch.optim.SGD),
        (ours.Adam, torch.optim.Adam),
        (ours.AdamW, torch.optim.AdamW),
        (ours.Adagrad, torch.optim.Adagrad),
        (ours.RMSprop, torch.optim.RMSprop),
    ],
    ids=lambda cls: cls.__module__.split(".")[0] + "." + cls.__name__,
)
def test_constructor_signature_matches_torch_then_adds_ours(mine, theirs) -> None:
    our_parameters, their_parameters = parameters(mine), parameters(theirs)
    shared = our_parameters[: len(their_parameters)]
    assert [(p.name, p.kind, p.default) for p in shared] == [
        (p.name, p.kind, p.default) for p in their_parameters
    ]
    extra = our_parameters[len(their_parameters) :]
    fused = ["fused"] if theirs in ADDS_FUSED else []
    assert [p.name for p in extra] == [*fused, *EXTRA]
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in extra)
    assert [p.default for p in extra] == [*(None for _ in fused), "auto", None, False, False, False]


def test_momentum_is_sgd_with_momentum_defaults() -> None:
    mine = {p.name: p for p in parameters(ours.Momentum)}
    theirs = {p.name: p for p in parameters(torch.optim.SGD)}
    assert list(mine) == [*theirs, *EXTRA]
    assert (mine["lr"].default, mine["momentum"].default) == (0.01, 0.9)
    for name in ("dampening", "weight_decay", "nesterov", "maximize"):
        assert (mine[name].kind, mine[name].default) == (theirs[name].kind, theirs[name].default)
