"""The built-in optimizers' per-tensor ``update`` and ``scalars`` (what ``fused=True`` on the CPU
compiles, and what a rule's declaration states) bound to their foreach reference functions and
to torch.optim, for every combination of their options, on float32, float64 and complex
parameters, over several steps.

The per-tensor update runs here as the rule engine runs it: the step count moves first,
``scalars(group, step, state)`` gives the per-step values, the gradient is negated under
``maximize``, complex tensors are real views where the rule says so, absent state is None in and
out, and state the update creates (SGD's first momentum buffer) is kept.

Stated tolerances: float64 (and complex128) within 1e-12 relative and absolute, float32 (and
complex64) within 2e-6 relative and 1e-6 absolute. The update is written out of place with
Python operators, so it may round differently from torch's fused ``add(alpha=)``,
``addcmul`` and ``addcdiv`` (which may use a fused multiply-add), never by more.
"""

from __future__ import annotations

import copy
import inspect
import itertools
from typing import Any

import pytest
import torch
from torch import Tensor

from torchopt_lab.optim.rules import REGISTRY, Rule, State

TOLERANCES = {
    torch.float64: (1e-12, 1e-12),
    torch.complex128: (1e-12, 1e-12),
    torch.float32: (2e-6, 1e-6),
    torch.complex64: (2e-6, 1e-6),
}
DTYPES = [torch.float32, torch.float64, torch.complex64, torch.complex128]
STEPS = 6
SHAPES = [(4, 3), (5,), ()]


# The registered optimizers declared as rules on the built-in engine that this file covers, and
# the torch.optim class each is held to.
TORCH_CLASSES = {
    "SGD": torch.optim.SGD,
    "Momentum": torch.optim.SGD,
    "Adagrad": torch.optim.Adagrad,
    "RMSprop": torch.optim.RMSprop,
}


def _rule(name: str) -> Rule:
    rule = REGISTRY[name].rule
    assert rule.reference is not None  # a built-in: its reference is bound here too
    return rule


def _initial(entry: State, param: Tensor, group: dict[str, Any], rule: Rule) -> Tensor | None:
    """A state tensor as the engine creates it (None: the update creates it)."""
    init = entry.initial(group)
    if init is None:
        return None
    if rule.complex_as_real and param.is_complex():
        init = complex(init, init)
    return torch.full_like(param, init)


def _reference_keywords(rule: Rule, group: dict[str, Any]) -> dict[str, Any]:
    readers = rule.kernel.readers if rule.kernel is not None else {}
    parameters = inspect.signature(rule.reference).parameters.values()
    return {
        p.name: readers[p.name](group) if p.name in readers else group[p.name]
        for p in parameters
        if p.kind is p.KEYWORD_ONLY
    }


def _grid(**options: list[Any]) -> list[dict[str, Any]]:
    return [
        dict(zip(options, values, strict=True)) for values in itertools.product(*options.values())
    ]


def _cases() -> list[tuple[str, dict[str, Any]]]:
    cases = []
    for kwargs in _grid(
        lr=[0.05],
        momentum=[0.0, 0.9],
        dampening=[0.0, 0.3],
        weight_decay=[0.0, 0.1],
        nesterov=[False, True],
        maximize=[False, True],
    ):
        if not kwargs["nesterov"] or (kwargs["momentum"] > 0 and kwargs["dampening"] == 0):
            cases.append(("SGD", kwargs))
            if kwargs["momentum"] > 0:
                cases.append(("Momentum", kwargs))
    cases += [
        ("Adagrad", kwargs)
        for kwargs in _grid(
            lr=[0.05],
            lr_decay=[0.0, 0.1],
            initial_accumulator_value=[0.0, 0.5],
            eps=[1e-10, 1e-3],
            weight_decay=[0.0, 0.1],
            maximize=[False, True],
        )
    ]
    cases += [
        ("RMSprop", kwargs)
        for kwargs in _grid(
            lr=[0.01],
            alpha=[0.99, 0.5],
            eps=[1e-8, 1e-3],
            weight_decay=[0.0, 0.1],
            momentum=[0.0, 0.9],
            centered=[False, True],
            maximize=[False, True],
        )
    ]
    return cases


CASES = _cases()


def _params(dtype: torch.dtype) -> list[Tensor]:
    generator = torch.Generator().manual_seed(0)
    return [torch.randn(shape, generator=generator, dtype=dtype) for shape in SHAPES]


def _grads(params: list[Tensor], step: int) -> list[Tensor]:
    generator = torch.Generator().manual_seed(1000 + step)
    return [torch.randn(p.shape, generator=generator, dtype=p.dtype) for p in params]


def _real(tensor: Tensor | None) -> Tensor | None:
    return torch.view_as_real(tensor) if tensor is not None and tensor.is_complex() else tensor


def _run_update(
    rule: Rule, group: dict[str, Any], params: list[Tensor], steps: int
) -> list[dict[str, Any]]:
    """The per-tensor update as the rule engine drives it; returns each parameter's state."""
    states: list[dict[str, Any]] = []
    for p in params:
        state: dict[str, Any] = {"step": torch.tensor(0.0)} if rule.step_state else {}
        for entry in rule.state:
            if entry.exists(group):
                state[entry.name] = _initial(entry, p, group, rule)
        states.append(state)
    for step in range(steps):
        for p, grad, state in zip(params, _grads(params, step), states, strict=True):
            t = None
            if rule.step_state:
                state["step"] += 1
                t = state["step"].item()
            scalars = rule.scalars(group, t, {})
            if group["maximize"]:
                grad = -grad
            as_real = rule.complex_as_real and p.is_complex()
            view = _real if as_real else (lambda tensor: tensor)
            inputs = [view(state.get(entry.name)) for entry in rule.state]
            results = rule.update(view(p), view(grad), *inputs, **scalars)
            assert len(results) == 1 + len(rule.state)
            view(p).copy_(results[0])
            for entry, before, after in zip(rule.state, inputs, results[1:], strict=True):
                # Absent state is None in and out; state the update creates comes back new.
                assert (after is None) == (not entry.exists(group)), entry.name
                if before is not None:
                    before.copy_(after)
                elif after is not None:
                    state[entry.name] = torch.view_as_complex(after) if as_real else after
    return states


def _run_reference(
    rule: Rule, group: dict[str, Any], params: list[Tensor], steps: int
) -> list[dict[str, Any]]:
    """The foreach reference function, over the group's lists as the engine hands them over:
    params, grads, one list per state (empty where the group keeps none), then the steps."""
    lists = [
        [_initial(entry, p, group, rule) for p in params] if entry.exists(group) else []
        for entry in rule.state
    ]
    step_list = [torch.tensor(0.0) for _ in params] if rule.step_state else []
    as_real = rule.complex_as_real and params[0].is_complex()
    view = _real if as_real else (lambda tensor: tensor)
    keywords = _reference_keywords(rule, group)
    for step in range(steps):
        viewed = [[view(t) for t in values] for values in lists]
        grads = [view(g) for g in _grads(params, step)]
        rule.reference(
            [view(p) for p in params],
            grads,
            *viewed,
            *([step_list] if rule.step_state else []),
            **keywords,
        )
        # State the reference created (SGD's first buffers) lands in the viewed lists.
        lists = [
            [torch.view_as_complex(t) if as_real and t is not None else t for t in values]
            for values in viewed
        ]
    states = []
    for index in range(len(params)):
        state: dict[str, Any] = {"step": step_list[index]} if rule.step_state else {}
        for entry, values in zip(rule.state, lists, strict=True):
            if entry.exists(group):
                state[entry.name] = values[index]
        states.append(state)
    return states


def _run_torch(
    name: str, kwargs: dict[str, Any], params: list[Tensor], steps: int
) -> list[dict[str, Any]]:
    """torch.optim's class, single-tensor update (its default on the CPU)."""
    for p in params:
        p.requires_grad_(True)
    optimizer = TORCH_CLASSES[name](params, **kwargs, foreach=False)
    for step in range(steps):
        for p, grad in zip(params, _grads(params, step), strict=True):
            p.grad = grad
        optimizer.step()
    for p in params:
        p.requires_grad_(False)
    return [optimizer.state[p] for p in params]


def _group(name: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    """The param group our constructor makes of ``kwargs`` (torch's, tested elsewhere)."""
    probe = REGISTRY[name]([torch.zeros(1, requires_grad=True)], **kwargs)
    return {key: value for key, value in probe.param_groups[0].items() if key != "params"}


def _assert_same(
    params: list[Tensor],
    states: list[dict[str, Any]],
    expected_params: list[Tensor],
    expected_states: list[dict[str, Any]],
) -> None:
    rtol, atol = TOLERANCES[params[0].dtype]
    for p, q in zip(params, expected_params, strict=True):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=rtol, atol=atol)
    for state, expected in zip(states, expected_states, strict=True):
        assert list(state) == list(expected)
        for key, value in expected.items():
            torch.testing.assert_close(state[key], value, rtol=rtol, atol=atol)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("name", "kwargs"), CASES, ids=lambda v: str(v))
def test_builtin_update_matches_its_reference_and_torch_optim(
    name: str, kwargs: dict[str, Any], dtype: torch.dtype
) -> None:
    rule, group = _rule(name), _group(name, kwargs)
    params = _params(dtype)
    states = _run_update(rule, group, params, STEPS)
    reference_params = _params(dtype)
    reference_states = _run_reference(rule, group, reference_params, STEPS)
    torch_params = _params(dtype)
    torch_states = _run_torch(name, kwargs, torch_params, STEPS)
    _assert_same(params, states, reference_params, reference_states)
    _assert_same(params, states, torch_params, torch_states)
    assert not torch.equal(params[0], _params(dtype)[0])  # the steps moved the parameters


@pytest.mark.parametrize("name", sorted(TORCH_CLASSES))
def test_builtin_update_matches_torch_optim_with_tensor_lr(name: str) -> None:
    kwargs: dict[str, Any] = {"lr": torch.tensor(0.05, dtype=torch.float64), "weight_decay": 0.1}
    if "momentum" in inspect.signature(TORCH_CLASSES[name]).parameters:
        kwargs["momentum"] = 0.9  # Momentum's default, which torch's SGD lacks
    rule, group = _rule(name), _group(name, kwargs)
    params, torch_params = _params(torch.float64), _params(torch.float64)
    states = _run_update(rule, group, params, STEPS)
    _assert_same(params, states, torch_params, _run_torch(name, kwargs, torch_params, STEPS))


@pytest.mark.parametrize(
    ("name", "kwargs"), [c for c in CASES if _rule(c[0]).step_state][::7], ids=str
)
def test_builtin_scalars_take_a_tensor_step_as_under_torch_compile(
    name: str, kwargs: dict[str, Any]
) -> None:
    # Under torch.compile the step count reaches scalars() as a 0-dim float64 tensor: the values
    # must be the same, computed with tensor arithmetic (no host read, no math functions).
    rule, group = _rule(name), _group(name, kwargs)
    for step in (1.0, 2.0, 7.0):
        expected = rule.scalars(group, step, {})
        traced = rule.scalars(group, torch.tensor(step, dtype=torch.float64), {})
        assert list(traced) == list(expected)
        for key, value in expected.items():
            torch.testing.assert_close(
                torch.as_tensor(traced[key], dtype=torch.float64),
                torch.as_tensor(value, dtype=torch.float64),
                rtol=0,
                atol=0,
            )


@pytest.mark.parametrize("dtype", [torch.float64, torch.complex128], ids=str)
def test_adagrad_sum_starts_at_the_constructors_initial_accumulator_value_as_torch(
    dtype: torch.dtype,
) -> None:
    # torch fills every sum in the constructor with its own initial_accumulator_value (a complex
    # parameter's with complex(v, v)), whatever a param group says.
    results = []
    for cls in (REGISTRY["Adagrad"], torch.optim.Adagrad):
        params = [p.requires_grad_(True) for p in _params(dtype)]
        groups = [{"params": params[:1], "initial_accumulator_value": 0.5}, {"params": params[1:]}]
        optimizer = cls(groups, lr=0.05, initial_accumulator_value=0.25)
        initial = copy.deepcopy(optimizer.state_dict()["state"])
        for p, grad in zip(params, _grads(params, 0), strict=True):
            p.grad = grad
        optimizer.step()
        results.append((initial, optimizer.state_dict()["state"], [p.detach() for p in params]))
    torch.testing.assert_close(results[0], results[1], rtol=1e-12, atol=1e-12)
