"""State dicts interchange with torch.optim in both directions, and a checkpoint resumes bit for
bit."""

from __future__ import annotations

import copy

import pytest
import torch
from optim_cases import (
    CASES,
    Case,
    assert_params_close,
    clone_params,
    make_params,
    train,
    two_groups,
)

import torchopt_lab.optim as ours

ONE_CASE_PER_CLASS = list({case.ours: case for case in CASES}.values())
RICH_CASES = [
    Case(ours.SGD, torch.optim.SGD, {"lr": 0.05, "momentum": 0.9, "nesterov": True}),
    Case(ours.Adam, torch.optim.Adam, {"lr": 0.01, "amsgrad": True, "weight_decay": 0.1}),
    Case(ours.AdamW, torch.optim.AdamW, {"lr": 0.01, "amsgrad": True}),
    Case(ours.Adagrad, torch.optim.Adagrad, {"lr": 0.1, "lr_decay": 0.01}),
    Case(ours.RMSprop, torch.optim.RMSprop, {"lr": 0.01, "momentum": 0.5, "centered": True}),
    Case(ours.Momentum, torch.optim.SGD, {"lr": 0.01, "momentum": 0.9}),
]


def continue_training(optimizer: torch.optim.Optimizer, params: list[torch.Tensor]) -> None:
    train(lambda _: optimizer, params, steps=10)


@pytest.mark.parametrize("direction", ["torch_to_ours", "ours_to_torch"])
@pytest.mark.parametrize("case", RICH_CASES, ids=lambda case: case.id)
def test_state_dict_loads_across_and_training_continues_identically(
    case: Case, direction: str
) -> None:
    source_cls, target_cls = (
        (case.theirs, case.ours) if direction == "torch_to_ours" else (case.ours, case.theirs)
    )
    params = make_params(torch.float64)
    source = train(lambda ps: source_cls(two_groups(ps, case.options), **case.options), params)
    # Both continue from the same point: the source itself and a fresh target loaded from it.
    moved = clone_params(params)
    target = target_cls(two_groups(moved, case.options), **case.options)
    target.load_state_dict(copy.deepcopy(source.state_dict()))
    assert target.state_dict()["param_groups"] == source.state_dict()["param_groups"]
    continue_training(source, params)
    continue_training(target, moved)
    assert_params_close(moved, params, torch.float64)


@pytest.mark.parametrize("case", ONE_CASE_PER_CLASS, ids=lambda case: case.id)
def test_checkpoint_mid_run_resumes_bit_for_bit(case: Case, tmp_path) -> None:
    params = make_params(torch.float32)
    optimizer = train(lambda ps: case.ours(two_groups(ps, case.options), **case.options), params)
    path = tmp_path / "checkpoint.pt"
    torch.save({"params": [p.detach() for p in params], "optimizer": optimizer.state_dict()}, path)
    continue_training(optimizer, params)

    checkpoint = torch.load(path, weights_only=True)
    resumed_params = [p.clone().requires_grad_() for p in checkpoint["params"]]
    resumed = case.ours(two_groups(resumed_params, case.options), **case.options)
    resumed.load_state_dict(checkpoint["optimizer"])
    continue_training(resumed, resumed_params)
    for a, b in zip(resumed_params, params, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("case", ONE_CASE_PER_CLASS, ids=lambda case: case.id)
def test_state_keys_and_step_type_match_torch(case: Case) -> None:
    params = make_params(torch.float32)
    mine = train(lambda ps: case.ours(ps, **case.options), params, steps=2)
    theirs = train(lambda ps: case.theirs(ps, **case.options), clone_params(params), steps=2)
    for our_state, their_state in zip(
        mine.state_dict()["state"].values(), theirs.state_dict()["state"].values(), strict=True
    ):
        assert our_state.keys() == their_state.keys()
        if "step" in their_state:
            assert our_state["step"].dtype == their_state["step"].dtype
            assert our_state["step"].device == their_state["step"].device
            assert our_state["step"].shape == ()


@pytest.mark.parametrize(
    ("cls", "key", "default"),
    [
        (ours.Adam, "amsgrad", False),
        (ours.Adam, "decoupled_weight_decay", False),
        (ours.SGD, "nesterov", False),
        (ours.RMSprop, "centered", False),
        (ours.Adagrad, "maximize", False),
    ],
)
def test_loading_an_old_state_dict_fills_in_defaults_like_torch(cls, key, default) -> None:
    params = make_params(torch.float64)
    optimizer = train(lambda ps: cls(ps, lr=0.01), params, steps=2)
    state = copy.deepcopy(optimizer.state_dict())
    del state["param_groups"][0][key]
    for entry in state["state"].values():
        if "step" in entry:
            entry["step"] = float(entry["step"])  # old checkpoints stored a Python number
    fresh = cls(clone_params(params), lr=0.01)
    fresh.load_state_dict(state)
    assert fresh.param_groups[0][key] == default
    for entry in fresh.state.values():
        if "step" in entry:
            assert torch.is_tensor(entry["step"]) and entry["step"].item() == 2


@pytest.mark.parametrize("name", ["SGD", "Momentum", "Adagrad", "RMSprop", "Adam", "AdamW"])
def test_every_group_default_filled_in_on_load_is_the_one_torch_fills_in(name) -> None:
    cls = getattr(ours, name)
    theirs_cls = torch.optim.SGD if name == "Momentum" else getattr(torch.optim, name)
    params = make_params(torch.float64)
    optimizer = train(lambda ps: cls(ps, lr=0.01), params, steps=1)
    state = copy.deepcopy(optimizer.state_dict())
    for key in cls._group_defaults:
        del state["param_groups"][0][key]
    mine, theirs = cls(clone_params(params), lr=0.01), theirs_cls(clone_params(params), lr=0.01)
    mine.load_state_dict(copy.deepcopy(state))
    theirs.load_state_dict(state)
    assert cls._group_defaults  # the table is not empty
    for key in cls._group_defaults:
        assert mine.param_groups[0][key] == theirs.param_groups[0][key], key


def test_adamw_forces_decoupled_weight_decay_on_load_like_torch() -> None:
    params = make_params(torch.float64)
    adam = train(lambda ps: ours.Adam(ps, lr=0.01), params, steps=2)
    adamw = ours.AdamW(clone_params(params))
    adamw.load_state_dict(adam.state_dict())
    assert adamw.param_groups[0]["decoupled_weight_decay"] is True


def test_backend_and_max_grad_norm_survive_deepcopy_and_stay_out_of_param_groups() -> None:
    optimizer = ours.Adam(make_params(torch.float32), backend="torch", max_grad_norm=1.0)
    clone = copy.deepcopy(optimizer)
    assert (clone.backend, clone.max_grad_norm) == ("torch", 1.0)
    assert "backend" not in optimizer.param_groups[0]
    assert "max_grad_norm" not in optimizer.param_groups[0]
