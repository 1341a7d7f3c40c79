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

import inspect
import itertools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from torch import Tensor

from torchopt_lab.optim import adagrad, rmsprop, sgd

TOLERANCES = {
    torch.float64: (1e-12, 1e-12),
    torch.complex128: (1e-12, 1e-12),
    torch.float32: (2e-6, 1e-6),
    torch.complex64: (2e-6, 1e-6),
}
DTYPES = [torch.float32, torch.float64, torch.complex64, torch.complex128]
STEPS = 6
SHAPES = [(4, 3), (5,), ()]


@dataclass(frozen=True)
class Binding:
    """One built-in optimizer's per-tensor declaration and the paths it is held to."""

    torch_class: type[torch.optim.Optimizer]
    update: Callable[..., tuple[Any, ...]]
    scalars: Callable[..., dict[str, Any]]
    # The update's state arguments, in order, and whether each exists for a group.
    state: tuple[tuple[str, Callable[[dict[str, Any]], bool]], ...]
    # The initial value of a state tensor, or None when the update creates it.
    init: Callable[[str, Tensor, dict[str, Any]], Tensor | None]
    # The foreach reference over one group's lists: (group, params, grads, state, steps).
    reference: Callable[..., None]
    complex_as_real: bool
    has_step: bool


def _sgd_init(name: str, param: Tensor, group: dict[str, Any]) -> Tensor | None:
    return None  # the first step's buffer is a clone of the direction


def _sgd_reference(
    group: dict[str, Any], params: list[Tensor], grads: list[Tensor], state: dict, steps: list
) -> None:
    sgd.sgd(params, grads, state["momentum_buffer"], **_keywords(sgd.sgd, group))


def _adagrad_init(name: str, param: Tensor, group: dict[str, Any]) -> Tensor:
    value = group["initial_accumulator_value"]
    return torch.full_like(param, complex(value, value) if param.is_complex() else value)


def _adagrad_reference(
    group: dict[str, Any], params: list[Tensor], grads: list[Tensor], state: dict, steps: list
) -> None:
    adagrad.adagrad(params, grads, state["sum"], steps, **_keywords(adagrad.adagrad, group))


def _zeros_init(name: str, param: Tensor, group: dict[str, Any]) -> Tensor:
    return torch.zeros_like(param)


def _rmsprop_reference(
    group: dict[str, Any], params: list[Tensor], grads: list[Tensor], state: dict, steps: list
) -> None:
    rmsprop.rmsprop(
        params,
        grads,
        state["square_avg"],
        state["grad_avg"],
        state["momentum_buffer"],
        steps,
        **_keywords(rmsprop.rmsprop, group),
    )


def _keywords(function: Callable[..., Any], group: dict[str, Any]) -> dict[str, Any]:
    parameters = inspect.signature(function).parameters.values()
    return {p.name: group[p.name] for p in parameters if p.kind is p.KEYWORD_ONLY}


BINDINGS = {
    "SGD": Binding(
        torch.optim.SGD,
        sgd._update,
        sgd._scalars,
        (("momentum_buffer", lambda g: g["momentum"] != 0),),
        _sgd_init,
        _sgd_reference,
        complex_as_real=False,
        has_step=False,
    ),
    "Adagrad": Binding(
        torch.optim.Adagrad,
        adagrad._update,
        adagrad._scalars,
        (("sum", lambda g: True),),
        _adagrad_init,
        _adagrad_reference,
        complex_as_real=True,
        has_step=True,
    ),
    "RMSprop": Binding(
        torch.optim.RMSprop,
        rmsprop._update,
        rmsprop._scalars,
        (
            ("square_avg", lambda g: True),
            ("momentum_buffer", lambda g: g["momentum"] > 0),
            ("grad_avg", lambda g: g["centered"]),
        ),
        _zeros_init,
        _rmsprop_reference,
        complex_as_real=True,
        has_step=True,
    ),
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
    binding: Binding, group: dict[str, Any], params: list[Tensor], steps: int
) -> list[dict[str, Any]]:
    """The per-tensor update as the rule engine drives it; returns each parameter's state."""
    states: list[dict[str, Any]] = []
    for p in params:
        state: dict[str, Any] = {"step": torch.tensor(0.0)} if binding.has_step else {}
        for name, exists in binding.state:
            if exists(group):
                state[name] = binding.init(name, p, group)
        states.append(state)
    for step in range(steps):
        for p, grad, state in zip(params, _grads(params, step), states, strict=True):
            t = None
            if binding.has_step:
                state["step"] += 1
                t = state["step"].item()
            scalars = binding.scalars(group, t, {})
            if group["maximize"]:
                grad = -grad
            as_real = binding.complex_as_real and p.is_complex()
            view = _real if as_real else (lambda tensor: tensor)
            inputs = [view(state.get(name)) for name, _ in binding.state]
            results = binding.update(view(p), view(grad), *inputs, **scalars)
            assert len(results) == 1 + len(binding.state)
            view(p).copy_(results[0])
            for (name, exists), before, after in zip(
                binding.state, inputs, results[1:], strict=True
            ):
                # Absent state is None in and out; state the update creates comes back new.
                assert (after is None) == (not exists(group)), name
                if before is not None:
                    before.copy_(after)
                elif after is not None:
                    state[name] = torch.view_as_complex(after) if as_real else after
    return states


def _run_reference(
    binding: Binding, group: dict[str, Any], params: list[Tensor], steps: int
) -> list[dict[str, Any]]:
    """The foreach reference function, over the group's lists as the engine hands them over."""
    lists: dict[str, list[Any]] = {name: [] for name, _ in binding.state}
    for name, exists in binding.state:
        if exists(group):
            lists[name] = [binding.init(name, p, group) for p in params]
    step_list = [torch.tensor(0.0) for _ in params] if binding.has_step else []
    as_real = binding.complex_as_real and params[0].is_complex()
    view = _real if as_real else (lambda tensor: tensor)
    for step in range(steps):
        viewed = {name: [view(t) for t in values] for name, values in lists.items()}
        binding.reference(
            group,
            [view(p) for p in params],
            [view(g) for g in _grads(params, step)],
            viewed,
            step_list,
        )
        for name, values in viewed.items():
            # State the reference created (SGD's first buffers) lands in the viewed lists.
            lists[name] = [
                torch.view_as_complex(t) if as_real and t is not None else t for t in values
            ]
    states = []
    for index in range(len(params)):
        state: dict[str, Any] = {"step": step_list[index]} if binding.has_step else {}
        for name, exists in binding.state:
            if exists(group):
                state[name] = lists[name][index]
        states.append(state)
    return states


def _run_torch(
    binding: Binding, kwargs: dict[str, Any], params: list[Tensor], steps: int
) -> list[dict[str, Any]]:
    """torch.optim's class, single-tensor update (its default on the CPU)."""
    for p in params:
        p.requires_grad_(True)
    optimizer = binding.torch_class(params, **kwargs, foreach=False)
    for step in range(steps):
        for p, grad in zip(params, _grads(params, step), strict=True):
            p.grad = grad
        optimizer.step()
    for p in params:
        p.requires_grad_(False)
    return [optimizer.state[p] for p in params]


def _group(binding: Binding, kwargs: dict[str, Any]) -> dict[str, Any]:
    """The param group torch.optim's constructor makes of ``kwargs``."""
    probe = binding.torch_class([torch.zeros(1, requires_grad=True)], **kwargs)
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
    binding = BINDINGS[name]
    group = _group(binding, kwargs)
    params = _params(dtype)
    states = _run_update(binding, group, params, STEPS)
    reference_params = _params(dtype)
    reference_states = _run_reference(binding, group, reference_params, STEPS)
    torch_params = _params(dtype)
    torch_states = _run_torch(binding, kwargs, torch_params, STEPS)
    _assert_same(params, states, reference_params, reference_states)
    _assert_same(params, states, torch_params, torch_states)
    assert not torch.equal(params[0], _params(dtype)[0])  # the steps moved the parameters


@pytest.mark.parametrize("name", sorted(BINDINGS))
def test_builtin_update_matches_torch_optim_with_tensor_lr(name: str) -> None:
    kwargs = {"lr": torch.tensor(0.05, dtype=torch.float64), "weight_decay": 0.1}
    binding = BINDINGS[name]
    group = _group(binding, kwargs)
    params, torch_params = _params(torch.float64), _params(torch.float64)
    states = _run_update(binding, group, params, STEPS)
    _assert_same(params, states, torch_params, _run_torch(binding, kwargs, torch_params, STEPS))


@pytest.mark.parametrize(("name", "kwargs"), [c for c in CASES if c[0] != "SGD"][::7], ids=str)
def test_builtin_scalars_take_a_tensor_step_as_under_torch_compile(
    name: str, kwargs: dict[str, Any]
) -> None:
    # Under torch.compile the step count reaches scalars() as a 0-dim float64 tensor: the values
    # must be the same, computed with tensor arithmetic (no host read, no math functions).
    binding = BINDINGS[name]
    group = _group(binding, kwargs)
    for step in (1.0, 2.0, 7.0):
        expected = binding.scalars(group, step, {})
        traced = binding.scalars(group, torch.tensor(step, dtype=torch.float64), {})
        assert list(traced) == list(expected)
        for key, value in expected.items():
            torch.testing.assert_close(
                torch.as_tensor(traced[key], dtype=torch.float64),
                torch.as_tensor(value, dtype=torch.float64),
                rtol=0,
                atol=0,
            )
