"""Faults of the torch (reference) path held to torch.optim (issue 9): ``float32_state`` honoured
and kept across a checkpoint, state stored as soon as a group ran (an interrupted step keeps it),
a parameter listed twice in a group updated per occurrence, and an int64 ``step`` accepted."""

from __future__ import annotations

import copy
import functools
import importlib
from typing import Any

import pytest
import torch
from optim_cases import CASES, Case, clone_params

import torchopt_lab.optim as ours

ONE_CASE_PER_CLASS = list({case.ours: case for case in CASES}.values())
# Cases with state beyond the step and every state-creating option on.
STATEFUL_CASES = [
    Case(ours.SGD, torch.optim.SGD, {"lr": 0.05, "momentum": 0.9, "weight_decay": 0.1}),
    Case(ours.SGD, torch.optim.SGD, {"lr": 0.05, "momentum": 0.9, "dampening": 0.3}),
    Case(ours.Adam, torch.optim.Adam, {"lr": 0.01, "amsgrad": True, "weight_decay": 0.1}),
    Case(ours.AdamW, torch.optim.AdamW, {"lr": 0.01, "weight_decay": 0.3}),
    Case(ours.Adagrad, torch.optim.Adagrad, {"lr": 0.1, "lr_decay": 0.05, "weight_decay": 0.1}),
    Case(ours.RMSprop, torch.optim.RMSprop, {"lr": 0.01, "momentum": 0.5, "centered": True}),
    Case(ours.RMSprop, torch.optim.RMSprop, {"lr": 0.01, "weight_decay": 0.1}),
]
# The module whose functional update torch.optim's ``step`` calls, and that function's name.
TORCH_FUNCTIONAL = {
    torch.optim.SGD: ("torch.optim.sgd", "sgd"),
    torch.optim.Adam: ("torch.optim.adam", "adam"),
    torch.optim.AdamW: ("torch.optim.adam", "adam"),
    torch.optim.Adagrad: ("torch.optim.adagrad", "adagrad"),
    torch.optim.RMSprop: ("torch.optim.rmsprop", "rmsprop"),
}


def set_grads(params: list[torch.Tensor]) -> None:
    """A deterministic gradient that depends on the parameter (so every update differs)."""
    for index, p in enumerate(params):
        p.grad = torch.sin(3 * p.detach()) + 0.1 * index


# float32_state on the torch path ------------------------------------------------------------------


def low_precision_params(dtype: torch.dtype) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    shapes = [(4, 3), (5,), ()]
    return [torch.randn(s, generator=generator).to(dtype).requires_grad_() for s in shapes]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", STATEFUL_CASES, ids=lambda case: case.id)
def test_float32_state_on_the_torch_path_keeps_float32_state_and_matches_torch_in_float32(
    case: Case, dtype: torch.dtype
) -> None:
    """Oracle: torch.optim run in float32 on float32 copies with float32 state, the parameter
    rounded to its dtype after every step (what the kernels do). The oracle's parameter is reset
    to ours before each step, so one step's rounding is checked without compounding: the parameter
    within one unit in the last place of its dtype (rtol 2**-7 bfloat16, 2**-10 float16), the
    state to float32 rounding (rtol 1e-5, atol 1e-6)."""
    params = low_precision_params(dtype)
    oracle = [p.detach().float().requires_grad_() for p in params]
    optimizer = case.ours(params, backend="torch", float32_state=True, **case.options)
    reference = case.theirs(oracle, **case.options)
    ulp = {torch.bfloat16: 2**-7, torch.float16: 2**-10}[dtype]
    for _ in range(6):
        set_grads(params)
        for p, q in zip(params, oracle, strict=True):
            q.data.copy_(p.detach())
            q.grad = p.grad.float()
        optimizer.step()
        reference.step()
        for p, q in zip(params, oracle, strict=True):
            assert p.dtype == dtype
            torch.testing.assert_close(p.detach().float(), q.detach().to(dtype).float(),
                                       rtol=ulp, atol=0.0)  # fmt: skip
            theirs = reference.state[q]
            for key, value in optimizer.state[p].items():
                if key == "step":
                    assert value.item() == theirs[key].item()
                    continue
                assert value.dtype == torch.float32, key
                torch.testing.assert_close(value, theirs[key], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("case", STATEFUL_CASES, ids=lambda case: case.id)
def test_float32_state_survives_a_checkpoint_bit_for_bit(case: Case, backend: str) -> None:
    """20 + 20 steps through state_dict/load_state_dict equal 40 uninterrupted steps: loading
    must not round the float32 state to the parameters' bfloat16."""
    make = functools.partial(case.ours, backend=backend, float32_state=True, **case.options)
    params = low_precision_params(torch.bfloat16)
    resumed = clone_params(params)
    straight = make(params)
    first = make(resumed)
    for _ in range(20):
        set_grads(params)
        straight.step()
        set_grads(resumed)
        first.step()
    checkpoint = copy.deepcopy(first.state_dict())
    second = make(resumed)
    second.load_state_dict(checkpoint)
    for key, value in second.state[resumed[0]].items():
        if key != "step":
            assert value.dtype == torch.float32, key
    for _ in range(20):
        set_grads(params)
        straight.step()
        set_grads(resumed)
        second.step()
    for a, b in zip(resumed, params, strict=True):
        assert torch.equal(a, b)


def test_float32_state_load_keeps_a_bfloat16_checkpoint_exactly_as_float32() -> None:
    """A checkpoint saved without float32_state (bfloat16 state) loads as exact float32 copies."""
    params = low_precision_params(torch.bfloat16)
    saved = ours.Adam(params, lr=0.01)
    set_grads(params)
    saved.step()
    loaded = ours.Adam(params, lr=0.01, float32_state=True)
    loaded.load_state_dict(saved.state_dict())
    for p in params:
        for key in ("exp_avg", "exp_avg_sq"):
            assert loaded.state[p][key].dtype == torch.float32
            assert torch.equal(loaded.state[p][key], saved.state[p][key].float())
            assert loaded.state[p][key] is not saved.state[p][key]


# An interrupted step ------------------------------------------------------------------------------


def interrupt_second_call(function: Any) -> Any:
    calls = []

    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return function(*args, **kwargs)

    return wrapper


@pytest.mark.parametrize("case", STATEFUL_CASES, ids=lambda case: case.id)
def test_interrupted_step_keeps_the_state_of_the_groups_already_updated(
    case: Case, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A KeyboardInterrupt in group 1's update of the first step: group 0 keeps its update and its
    state (torch stores a group's momentum buffers right after the group's update), and training
    resumed from there matches torch's."""
    params = low_precision_params(torch.float64)
    reference = clone_params(params)
    groups = lambda ps: [{"params": ps[:1]}, {"params": ps[1:]}]  # noqa: E731
    optimizer = case.ours(groups(params), backend="torch", **case.options)
    theirs = case.theirs(groups(reference), **case.options)
    for ps in (params, reference):
        set_grads(ps)
    module, name = TORCH_FUNCTIONAL[case.theirs]
    with monkeypatch.context() as patch:
        patch.setattr(type(optimizer), "_reference", staticmethod(interrupt_second_call(
            type(optimizer)._reference)))  # fmt: skip
        patch.setattr(importlib.import_module(module), name, interrupt_second_call(
            getattr(importlib.import_module(module), name)))  # fmt: skip
        for opt in (optimizer, theirs):
            with pytest.raises(KeyboardInterrupt):
                opt.step()
    first, their_first = params[0], reference[0]
    torch.testing.assert_close(first, their_first, rtol=1e-12, atol=1e-12)
    assert optimizer.state[first].keys() == theirs.state[their_first].keys()
    for key, value in theirs.state[their_first].items():
        torch.testing.assert_close(optimizer.state[first][key], value, rtol=1e-12, atol=1e-12)
    for _ in range(3):
        for ps, opt in ((params, optimizer), (reference, theirs)):
            set_grads(ps)
            opt.step()
    for a, b in zip(params, reference, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_interrupted_first_sgd_step_keeps_the_first_groups_momentum_buffer(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The issue's case: interrupted on the very first step, after group 0 was updated."""
    params = low_precision_params(torch.float64)
    optimizer = ours.SGD([{"params": params[:1]}, {"params": params[1:]}], lr=0.1, momentum=0.9)
    set_grads(params)
    patched = staticmethod(interrupt_second_call(ours.SGD._reference))
    monkeypatch.setattr(ours.SGD, "_reference", patched)
    with pytest.raises(KeyboardInterrupt):
        optimizer.step()
    assert torch.equal(optimizer.state[params[0]]["momentum_buffer"], params[0].grad)
    assert "momentum_buffer" not in optimizer.state[params[1]]


# Duplicate parameters -----------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:optimizer contains a parameter group with duplicate")
@pytest.mark.parametrize("case", [*ONE_CASE_PER_CLASS, *STATEFUL_CASES], ids=lambda case: case.id)
def test_a_parameter_listed_twice_in_a_group_is_updated_per_occurrence_like_torch(
    case: Case,
) -> None:
    """torch.optim warns and updates the parameter once per occurrence, in turn (its CPU default,
    foreach=False); float64 to 1e-12."""
    params = low_precision_params(torch.float64)
    reference = clone_params(params)
    listed = lambda ps: [ps[0], ps[1], ps[0], ps[2], ps[1], ps[0]]  # noqa: E731
    with pytest.warns(UserWarning, match="duplicate parameters"):
        optimizer = case.ours(listed(params), backend="torch", **case.options)
    theirs = case.theirs(listed(reference), **{**case.options, "foreach": False})
    for _ in range(5):
        for ps, opt in ((params, optimizer), (reference, theirs)):
            set_grads(ps)
            opt.step()
    for a, b in zip(params, reference, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    for a, b in zip(params, reference, strict=True):
        for key, value in theirs.state[b].items():
            torch.testing.assert_close(optimizer.state[a][key].double(), value.double(),
                                       rtol=1e-12, atol=1e-12)  # fmt: skip


# An int64 step ----------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("case", ONE_CASE_PER_CLASS, ids=lambda case: case.id)
def test_an_int64_step_in_a_loaded_state_dict_steps_like_torch(case: Case, backend: str) -> None:
    """torch on the CPU steps an int64 ``step`` (as some checkpoints hold it); so do ours, on
    both backends, whether it came through load_state_dict or was set by hand."""
    reference = low_precision_params(torch.float32)
    # torch's foreach=True refuses an int64 step; its CPU default (foreach=False) steps it.
    theirs = case.theirs(reference, **{**case.options, "foreach": False})
    set_grads(reference)
    theirs.step()
    state_dict = copy.deepcopy(theirs.state_dict())
    for saved in state_dict["state"].values():
        if "step" in saved:
            saved["step"] = torch.tensor(int(saved["step"]), dtype=torch.int64)
    # Each loads its own copy: load_state_dict keeps tensors already of the right dtype as they are.
    theirs.load_state_dict(copy.deepcopy(state_dict))
    loaded = case.ours(clone_params(reference), backend=backend, **case.options)
    loaded.load_state_dict(copy.deepcopy(state_dict))
    by_hand = case.ours(clone_params(reference), backend=backend, **case.options)
    by_hand.load_state_dict(copy.deepcopy(state_dict))
    for p in by_hand.param_groups[0]["params"]:
        if "step" in by_hand.state[p]:
            by_hand.state[p]["step"] = torch.tensor(1, dtype=torch.int64)
    for _ in range(3):
        for opt in (loaded, by_hand, theirs):
            set_grads(opt.param_groups[0]["params"])
            opt.step()
    for opt in (loaded, by_hand):
        for a, b in zip(opt.param_groups[0]["params"], reference, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
            if "step" in theirs.state[b]:
                assert opt.state[a]["step"].item() == theirs.state[b]["step"].item() == 4
