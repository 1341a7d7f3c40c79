"""The optimizers declared with the authoring API (``torchopt_lab.optim.rules``) behave as
torch.optim's, driven from torch's own table of optimizers (``optim_db``): every CPU optim input
step for step, every error input, state dicts both ways, tensor lr, complex parameters,
differentiable steps. Lion, which torch lacks, is held to a transcription of the paper.

Stated tolerances: float64 to 1e-12 relative, float32 to 1e-6 (the rule's update is written out
of place, so it may round differently from torch's in-place ops, never by more).
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import pickle
import re
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch.testing._internal.common_optimizers import OptimizerErrorEnum, optim_db

import torchopt_lab.optim as ours
from torchopt_lab.optim._base import ENGINE_OPTIONS
from torchopt_lab.optim.rules import REGISTRY, Check, Hyperparameter, Rule, RuleOptimizer, State

TOLERANCES = {
    torch.float64: (1e-12, 1e-12),
    torch.float32: (1e-6, 1e-6),
    torch.complex128: (1e-12, 1e-12),
    torch.complex64: (1e-6, 1e-6),
}
STEPS = 7
SHAPES = [(4, 3), (5,), ()]

INFOS = {info.optim_cls.__name__: info for info in optim_db}
# The registered optimizers torch.optim also has: torch is their oracle.
WITH_TORCH = sorted(name for name in REGISTRY if name in INFOS)


def _inputs() -> list[tuple[str, str, dict[str, Any]]]:
    cases = []
    for name in WITH_TORCH:
        for optim_input in INFOS[name].optim_inputs_func(device="cpu"):
            cases.append((name, optim_input.desc, dict(optim_input.kwargs)))
    return cases


INPUTS = _inputs()


def _error_inputs() -> list[tuple[str, Any]]:
    return [
        (name, error_input)
        for name in WITH_TORCH
        for error_input in INFOS[name].optim_error_inputs_func(device="cpu", dtype=torch.float32)
    ]


ERROR_INPUTS = _error_inputs()


def _params(dtype: torch.dtype, seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=generator, dtype=dtype) for shape in SHAPES]


def _groups(params: list[torch.Tensor]) -> list[dict[str, Any]]:
    # Two param groups, so that state and hyperparameters are kept per group.
    return [{"params": params[:2]}, {"params": params[2:]}]


def _set_grads(params: list[torch.Tensor], step: int) -> None:
    generator = torch.Generator().manual_seed(1000 + step)
    for p in params:
        p.grad = torch.randn(p.shape, generator=generator, dtype=p.dtype)


def _run(optimizer: torch.optim.Optimizer, params: list[torch.Tensor], steps: range) -> None:
    for step in steps:
        _set_grads(params, step)
        optimizer.step()


def _assert_close(actual: Any, expected: Any) -> None:
    if torch.is_tensor(expected):
        rtol, atol = TOLERANCES.get(expected.dtype, (1e-6, 1e-6))
        torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol)
    else:
        assert actual == expected


def _assert_same_state(ours_: torch.optim.Optimizer, theirs: torch.optim.Optimizer) -> None:
    mine, reference = ours_.state_dict(), theirs.state_dict()
    assert mine["param_groups"] == reference["param_groups"]
    assert mine["state"].keys() == reference["state"].keys()
    for index, their_state in reference["state"].items():
        assert list(mine["state"][index]) == list(their_state)
        for key, value in their_state.items():
            assert mine["state"][index][key].dtype == value.dtype, key
            _assert_close(mine["state"][index][key], value)


def _both(name: str, kwargs: dict[str, Any], dtype: torch.dtype) -> tuple[Any, ...]:
    params, reference = _params(dtype), _params(dtype)
    mine = REGISTRY[name](_groups(params), **kwargs)
    theirs = getattr(torch.optim, name)(_groups(reference), **kwargs)
    return mine, params, theirs, reference


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize(("name", "desc", "kwargs"), INPUTS, ids=lambda v: str(v))
def test_rule_optimizer_matches_torch_optim_on_every_optim_input(
    name: str, desc: str, kwargs: dict[str, Any], dtype: torch.dtype
) -> None:
    mine, params, theirs, reference = _both(name, kwargs, dtype)
    _run(mine, params, range(STEPS))
    _run(theirs, reference, range(STEPS))
    for a, b in zip(params, reference, strict=True):
        _assert_close(a, b)
    _assert_same_state(mine, theirs)


@pytest.mark.parametrize(("name", "desc", "kwargs"), INPUTS, ids=lambda v: str(v))
def test_rule_optimizer_matches_torch_optim_with_tensor_lr(
    name: str, desc: str, kwargs: dict[str, Any]
) -> None:
    lr = kwargs.get("lr", inspect.signature(REGISTRY[name]).parameters["lr"].default)
    kwargs = {**kwargs, "lr": torch.tensor(lr, dtype=torch.float64)}
    mine, params, theirs, reference = _both(name, kwargs, torch.float64)
    _run(mine, params, range(STEPS))
    _run(theirs, reference, range(STEPS))
    for a, b in zip(params, reference, strict=True):
        _assert_close(a, b)


@pytest.mark.parametrize("dtype", [torch.complex128, torch.complex64], ids=str)
@pytest.mark.parametrize("name", WITH_TORCH)
def test_rule_optimizer_matches_torch_optim_on_complex_params(
    name: str, dtype: torch.dtype
) -> None:
    assert INFOS[name].supports_complex
    kwargs = {"weight_decay": 0.1, "maximize": True}
    mine, params, theirs, reference = _both(name, kwargs, dtype)
    _run(mine, params, range(STEPS))
    _run(theirs, reference, range(STEPS))
    for a, b in zip(params, reference, strict=True):
        _assert_close(a, b)
    _assert_same_state(mine, theirs)


def _error_params(error_input: Any) -> Any:
    params = error_input.optimizer_error_input.params
    return [torch.randn(2, 2, requires_grad=True)] if params is None else params


@pytest.mark.parametrize(
    ("name", "error_input"),
    ERROR_INPUTS,
    ids=[f"{name}-{e.optimizer_error_input.desc}" for name, e in ERROR_INPUTS],
)
def test_rule_optimizer_raises_what_torch_optim_raises(name: str, error_input: Any) -> None:
    kwargs = error_input.optimizer_error_input.kwargs
    classes = (REGISTRY[name], getattr(torch.optim, name))
    messages = []
    for cls in classes:
        params = copy.deepcopy(_error_params(error_input))
        if issubclass(error_input.error_type, Warning):
            with pytest.warns(error_input.error_type, match=error_input.error_regex) as record:
                cls(params, **kwargs)
            messages.append([str(w.message) for w in record])
            continue
        with pytest.raises(error_input.error_type, match=error_input.error_regex) as raised:
            optimizer = cls(params, **kwargs)
            if error_input.error_on == OptimizerErrorEnum.STEP_ERROR:
                optimizer.step()
        messages.append(str(raised.value))
    assert messages[0] == messages[1]


@pytest.mark.parametrize(
    ("name", "kwargs", "message"),
    [
        ("NAdam", {"lr": -0.5}, "Invalid learning rate: -0.5"),
        ("NAdam", {"eps": -1e-3}, "Invalid epsilon value: -0.001"),
        ("NAdam", {"betas": (0.5, 1.5)}, "Invalid beta parameter at index 1: 1.5"),
        ("RAdam", {"betas": (-0.1, 0.5)}, "Invalid beta parameter at index 0: -0.1"),
        ("Adamax", {"weight_decay": -2}, "Invalid weight_decay value: -2"),
        ("Adadelta", {"rho": -0.1}, "Invalid rho value: -0.1"),
        ("Adadelta", {"eps": -1.0, "weight_decay": -1.0}, "Invalid epsilon value: -1.0"),
    ],
)
def test_rule_optimizer_validation_quotes_the_bad_value_as_torch_does(
    name: str, kwargs: dict[str, Any], message: str
) -> None:
    for cls in (REGISTRY[name], getattr(torch.optim, name)):
        with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
            cls([torch.zeros(2)], **kwargs)


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_rule_optimizer_step_without_grads_is_noop(name: str) -> None:
    params = _params(torch.float32)
    before = [p.clone() for p in params]
    optimizer = REGISTRY[name](params)
    # State exists before the first step only where the rule creates it in the constructor
    # (Adagrad, as torch's); the step leaves it as it was.
    state = copy.deepcopy(optimizer.state_dict()["state"])
    assert bool(state) == REGISTRY[name].rule.eager_state
    optimizer.step()
    torch.testing.assert_close(optimizer.state_dict()["state"], state, rtol=0, atol=0)
    for a, b in zip(params, before, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("name", WITH_TORCH)
def test_rule_optimizer_signature_is_torch_optims_plus_fused_backend_and_engine_options(
    name: str,
) -> None:
    mine = list(inspect.signature(REGISTRY[name]).parameters.values())
    theirs = inspect.signature(getattr(torch.optim, name)).parameters.values()
    # torch's NAdam, RAdam, Adamax and Adadelta have no `fused`; ours take it as Adam's does
    # (a built-in whose torch signature has it keeps it there), then backend, max_grad_norm,
    # skip_nonfinite, float32_state and record_norms.
    torch_has_fused = "fused" in [p.name for p in theirs]
    # A built-in (rule.reference) keeps torch's signature as it is: RMSprop takes no fused.
    adds_fused = not torch_has_fused and REGISTRY[name].rule.reference is None
    ours_only = 6 if adds_fused else 5
    assert [(p.name, p.kind, p.default) for p in mine[:-ours_only]] == [
        (p.name, p.kind, p.default) for p in theirs
    ]
    fused = [("fused", inspect.Parameter.KEYWORD_ONLY, None)] if adds_fused else []
    assert [(p.name, p.kind, p.default) for p in mine[-ours_only:]] == [
        *fused,
        ("backend", inspect.Parameter.KEYWORD_ONLY, "auto"),
        ("max_grad_norm", inspect.Parameter.KEYWORD_ONLY, None),
        ("skip_nonfinite", inspect.Parameter.KEYWORD_ONLY, False),
        ("float32_state", inspect.Parameter.KEYWORD_ONLY, False),
        ("record_norms", inspect.Parameter.KEYWORD_ONLY, False),
    ]


@pytest.mark.parametrize("direction", ["torch_to_ours", "ours_to_torch"])
@pytest.mark.parametrize("name", WITH_TORCH)
def test_rule_optimizer_state_dict_interchanges_with_torch_optim(name: str, direction: str) -> None:
    kwargs = {"lr": 0.01, "weight_decay": 0.1}
    first, second = REGISTRY[name], getattr(torch.optim, name)
    if direction == "torch_to_ours":
        first, second = second, first
    # One run switches class after 3 steps; the oracle makes the same switch within torch.optim
    # (loading casts state other than ``step`` to the parameter's dtype: NAdam's mu_product).
    runs = {}
    for switch in [(first, second), (getattr(torch.optim, name),) * 2]:
        params = _params(torch.float64)
        before = switch[0](_groups(params), **kwargs)
        _run(before, params, range(3))
        after = switch[1](_groups(params), **kwargs)
        after.load_state_dict(before.state_dict())
        _run(after, params, range(3, STEPS))
        runs[len(runs)] = (after, params)
    (after, params), (oracle, reference) = runs[0], runs[1]
    for a, b in zip(params, reference, strict=True):
        _assert_close(a, b)
    _assert_same_state(after, oracle)


@pytest.mark.parametrize("name", WITH_TORCH)
def test_rule_optimizer_loads_old_state_dicts_as_torch_optim_does(name: str) -> None:
    optimizer = REGISTRY[name](_params(torch.float32))
    _run(optimizer, optimizer.param_groups[0]["params"], range(2))
    state = copy.deepcopy(optimizer.state_dict())
    # What older torch versions saved: no flag keys, Python-number steps (and mu_product).
    flags = ("foreach", "maximize", "capturable", "differentiable", "decoupled_weight_decay")
    for group in state["param_groups"]:
        for flag in flags:
            group.pop(flag, None)
    for p_state in state["state"].values():
        for key in ("step", "mu_product"):
            if key in p_state:
                p_state[key] = p_state[key].item()
    loaded = {}
    for cls in (REGISTRY[name], getattr(torch.optim, name)):
        target = cls(_params(torch.float32))
        target.load_state_dict(copy.deepcopy(state))
        loaded[cls] = target
    mine, theirs = loaded.values()
    _assert_same_state(mine, theirs)


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_rule_optimizer_survives_pickling(name: str) -> None:
    params = _params(torch.float64)
    optimizer = REGISTRY[name](params, lr=0.01)
    _run(optimizer, params, range(2))
    restored = pickle.loads(pickle.dumps(optimizer))
    assert restored.state_dict()["param_groups"] == optimizer.state_dict()["param_groups"]


@pytest.mark.parametrize("name", WITH_TORCH)
def test_rule_optimizer_closure_returns_the_loss(name: str) -> None:
    params = _params(torch.float64)
    for p in params:
        p.requires_grad_(True)
    optimizer = REGISTRY[name](params)

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = sum((p**2).sum() for p in params)
        loss.backward()
        return loss

    before = [p.detach().clone() for p in params]
    assert torch.is_tensor(optimizer.step(closure))
    assert not any(torch.equal(p, b) for p, b in zip(params, before, strict=True))
    # SGD without momentum keeps no state, as torch's; the others have some for every parameter.
    keeps_state = REGISTRY[name].rule.step_state
    assert all((len(optimizer.state[p]) > 0) == keeps_state for p in params)


def _differentiable_steps(
    cls: type, lr: float | torch.Tensor, leaf: torch.Tensor, kwargs: dict[str, Any]
) -> torch.Tensor:
    """The parameter after two differentiable steps from ``leaf`` (fixed gradients)."""
    param = leaf.clone()
    optimizer = cls([param], lr=lr, differentiable=True, **kwargs)
    for step in range(2):
        generator = torch.Generator().manual_seed(50 + step)
        param.grad = torch.randn(param.shape, generator=generator, dtype=param.dtype)
        optimizer.step()
    return param


def _leaf() -> torch.Tensor:
    leaf = torch.randn(5, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    return leaf.requires_grad_(True)


# Where torch.optim's own differentiable path runs (it rejects a tensor lr requiring grad in
# Adamax and Adadelta, and NAdam's and Adamax's in-place state updates break its backward).
TORCH_DIFFERENTIABLE = [("NAdam", False), ("RAdam", False), ("RAdam", True), ("Adadelta", False)]


@pytest.mark.parametrize(("name", "tensor_lr"), TORCH_DIFFERENTIABLE)
def test_rule_optimizer_differentiable_step_matches_torch_optim_gradients(
    name: str, tensor_lr: bool
) -> None:
    grads = []
    for cls in (REGISTRY[name], getattr(torch.optim, name)):
        leaf = _leaf()
        lr = torch.tensor(0.01, dtype=torch.float64, requires_grad=True) if tensor_lr else 0.01
        param = _differentiable_steps(cls, lr, leaf, {"weight_decay": 0.1})
        grads.append(torch.autograd.grad(param.sum(), (lr, leaf) if tensor_lr else (leaf,)))
    # torch's differentiable NAdam rounds mu_product * mu_next to float32 (its non-differentiable
    # path, which ours matches to 1e-12 above, does not): a relative 6e-12 here.
    tolerance = 1e-10 if name == "NAdam" else 1e-12
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_rule_optimizer_differentiable_step_passes_gradcheck(name: str) -> None:
    # The oracle is finite differences: d(params after two steps)/d(lr, params before).
    lr = torch.tensor(0.01, dtype=torch.float64, requires_grad=True)

    def two_steps(lr: torch.Tensor, leaf: torch.Tensor, cls: type = REGISTRY[name]) -> Any:
        return _differentiable_steps(cls, lr, leaf, {"weight_decay": 0.1})

    if REGISTRY[name].rule.reference is not None:
        # A built-in hands differentiable=True to torch.optim's own update, as
        # tests/optim/test_torch_flags.py holds it to; where that raises (a tensor lr into
        # addcdiv_'s value in Adagrad and RMSprop, Momentum's buffer updated in place after
        # autograd saved it), ours raises alike.
        theirs = getattr(torch.optim, "SGD" if name == "Momentum" else name)
        extra = {"momentum": 0.9} if name == "Momentum" else {}
        try:
            _differentiable_steps(
                theirs, lr, _leaf(), {"weight_decay": 0.1, **extra}
            ).sum().backward()
        except (RuntimeError, TypeError) as error:
            with pytest.raises(type(error)):
                two_steps(lr, _leaf()).sum().backward()
            return
    assert torch.autograd.gradcheck(two_steps, (lr, _leaf()))


def lion_paper(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    momenta: list[torch.Tensor],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    weight_decay: float,
) -> None:
    """Chen et al. (2023), Algorithm 2 (Lion), line by line."""
    for theta, g, m in zip(params, grads, momenta, strict=True):
        c = beta1 * m + (1 - beta1) * g  # update the model parameters:
        theta.sub_(lr * (torch.sign(c) + weight_decay * theta))
        m.copy_(beta2 * m + (1 - beta2) * g)  # update EMA of g_t


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"lr": 3e-3, "betas": (0.95, 0.98), "weight_decay": 1.0},
        {"lr": 1e-2, "weight_decay": 0.1, "maximize": True},
        {"lr": torch.tensor(1e-2, dtype=torch.float64), "foreach": True},
    ],
    ids=["defaults", "betas,weight_decay", "maximize", "tensor_lr"],
)
def test_lion_matches_the_paper(kwargs: dict[str, Any], dtype: torch.dtype) -> None:
    params, reference = _params(dtype), _params(dtype)
    optimizer = ours.Lion(_groups(params), **kwargs)
    defaults = dict(inspect.signature(ours.Lion).parameters.items())
    lr = float(kwargs.get("lr", defaults["lr"].default))
    beta1, beta2 = kwargs.get("betas", defaults["betas"].default)
    weight_decay = kwargs.get("weight_decay", defaults["weight_decay"].default)
    momenta = [torch.zeros_like(p) for p in reference]
    for step in range(STEPS):
        _set_grads(params, step)
        optimizer.step()
        _set_grads(reference, step)
        grads = [-p.grad if kwargs.get("maximize") else p.grad for p in reference]
        lion_paper(
            reference, grads, momenta, lr=lr, beta1=beta1, beta2=beta2, weight_decay=weight_decay
        )
    for p, m, a, b in zip(params, momenta, params, reference, strict=True):
        _assert_close(a, b)
        _assert_close(optimizer.state[p]["exp_avg"], m)
    assert list(optimizer.state[params[0]]) == ["step", "exp_avg"]


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"lr": -1.0}, ValueError, "Invalid learning rate: -1.0"),
        ({"lr": torch.tensor([1e-3, 1e-3])}, ValueError, "Tensor lr must be 1-element"),
        ({"betas": (1.0, 0.9)}, ValueError, "Invalid beta parameter at index 0: 1.0"),
        ({"betas": (0.9, -0.1)}, ValueError, "Invalid beta parameter at index 1: -0.1"),
        ({"weight_decay": -1e-2}, ValueError, "Invalid weight_decay value: -0.01"),
        ({"momentum": 0.9}, TypeError, "unexpected keyword argument 'momentum'"),
    ],
)
def test_lion_refuses_bad_hyperparameters(
    kwargs: dict[str, Any], error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=re.escape(message)):
        ours.Lion([torch.zeros(2)], **kwargs)


def test_every_rule_optimizer_is_registered_and_exported() -> None:
    # Every exported class derived from a rule (a RuleOptimizer or a built-in) is registered.
    declared = {
        name
        for name, value in vars(ours).items()
        if isinstance(value, type) and isinstance(vars(value).get("rule"), Rule)
    }
    assert declared == set(REGISTRY)
    assert set(REGISTRY) >= {"NAdam", "RAdam", "Adamax", "Adadelta", "Lion", "Adam", "AdamW"}
    assert all(name in ours.__all__ for name in REGISTRY)


def _rule(**overrides: Any) -> Rule:
    fields: dict[str, Callable[..., Any] | tuple[Any, ...]] = {
        "hyperparameters": (Hyperparameter("lr", 0.1),),
        "checks": (),
        "state": (),
        "scalars": lambda group, step, state: {"lr": group["lr"]},
        "update": lambda param, grad, *, lr: (param - lr * grad,),
    }
    fields.update(overrides)
    return Rule(**fields)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"checks": (Check("beta", lambda b: True, ""),)}, "checks of undeclared names"),
        ({"state": (State("step"),)}, "not 'step'"),
        ({"state": (State("m"), State("m"))}, "must be unique"),
        ({"hyperparameters": (Hyperparameter("lr", 0.1),) * 2}, "must be unique"),
        ({"hyperparameters": (Hyperparameter("backend", "x"),)}, "constructor's own"),
        ({"hyperparameters": (Hyperparameter("max_grad_norm", 1.0),)}, "constructor's own"),
    ],
)
def test_rule_declaration_mistakes_are_refused_at_class_creation(
    overrides: dict[str, Any], message: str
) -> None:
    with pytest.raises(TypeError, match=message):

        class Broken(RuleOptimizer):
            rule = _rule(**overrides)


def test_rule_update_returning_the_wrong_number_of_tensors_is_refused() -> None:
    class Wrong(RuleOptimizer):
        rule = _rule(update=lambda param, grad, *, lr: (param, grad))

    param = torch.zeros(3)
    param.grad = torch.ones(3)
    with pytest.raises(RuntimeError, match="returned 2 tensors"):
        Wrong([param]).step()


# SGD, Momentum and Adagrad take sparse gradients, as torch's SGD and Adagrad do
# (tests/optim/test_edge_cases.py holds them to torch's results).
@pytest.mark.parametrize(
    "name", [name for name in sorted(REGISTRY) if REGISTRY[name].rule.sparse_message is not None]
)
def test_rule_optimizer_refuses_sparse_gradients_as_torch_optim_does(name: str) -> None:
    param = torch.zeros(3)
    param.grad = torch.zeros(3).to_sparse()
    message = f"{name} does not support sparse gradients"
    if name in WITH_TORCH:  # torch's own message (AdamW's is Adam's)
        with pytest.raises(RuntimeError) as theirs:
            getattr(torch.optim, name)([param]).step()
        message = str(theirs.value)
    with pytest.raises(RuntimeError, match=f"^{re.escape(message)}$"):
        REGISTRY[name]([param]).step()


# SGD, Momentum and Adagrad take no capturable argument, as torch's SGD and Adagrad.
@pytest.mark.parametrize(
    "name",
    [
        name
        for name in sorted(REGISTRY)
        if any(h.name == "capturable" for h in REGISTRY[name].rule.hyperparameters)
    ],
)
def test_rule_optimizer_capturable_on_cpu_raises_as_torch_optim_does(name: str) -> None:
    param = torch.zeros(3)
    param.grad = torch.ones(3)
    optimizer = REGISTRY[name]([param], capturable=True)
    with pytest.raises(AssertionError, match="If capturable=True, params and state_steps"):
        optimizer.step()
    if name in WITH_TORCH:
        theirs = getattr(torch.optim, name)([param], capturable=True)
        with pytest.raises(AssertionError, match="If capturable=True, params"):
            theirs.step()


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_rule_optimizer_step_under_torch_compile_matches_eager(name: str) -> None:
    # Dynamo traces the step as one graph (backend="eager": no Inductor code generation, which
    # takes minutes on the CPU); the step count and scalar state stay float64 tensors in the
    # graph, and the results must not change, not by a rounding.
    torch._dynamo.reset()
    params, reference = _params(torch.float64), _params(torch.float64)
    compiled = REGISTRY[name](params, lr=0.01)
    eager = REGISTRY[name](reference, lr=0.01)

    @torch.compile(backend="eager", fullgraph=True)
    def step() -> None:
        compiled.step()

    for index in range(3):
        _set_grads(params, index)
        _set_grads(reference, index)
        step()
        eager.step()
    for a, b in zip(params, reference, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch._dynamo.reset()


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_rule_optimizer_runs_step_and_state_dict_hooks(name: str) -> None:
    params = _params(torch.float32)
    optimizer = REGISTRY[name](params)
    calls: list[str] = []
    optimizer.register_step_pre_hook(lambda opt, args, kwargs: calls.append("pre"))
    optimizer.register_step_post_hook(lambda opt, args, kwargs: calls.append("post"))
    optimizer.register_state_dict_pre_hook(lambda opt: calls.append("save_pre"))

    def stamp(opt: torch.optim.Optimizer, state_dict: dict[str, Any]) -> dict[str, Any]:
        state_dict["stamp"] = name
        return state_dict

    optimizer.register_state_dict_post_hook(stamp)
    optimizer.register_load_state_dict_pre_hook(lambda opt, sd: calls.append("load_pre"))
    optimizer.register_load_state_dict_post_hook(lambda opt: calls.append("load_post"))
    _run(optimizer, params, range(1))
    saved = optimizer.state_dict()
    optimizer.load_state_dict(saved)
    assert saved["stamp"] == name
    assert calls == ["pre", "post", "save_pre", "load_pre", "load_post"]


@pytest.mark.parametrize("name", WITH_TORCH)
def test_rule_optimizer_new_param_group_takes_the_defaults_as_torch_optim(name: str) -> None:
    groups = {}
    for cls in (REGISTRY[name], getattr(torch.optim, name)):
        optimizer = cls([torch.zeros(2)], lr=0.5)
        optimizer.add_param_group({"params": [torch.zeros(3)], "weight_decay": 0.2})
        groups[cls] = [
            {k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups
        ]
    mine, theirs = groups.values()
    assert mine == theirs


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("name", ["NAdam", "RAdam", "Adamax"])
def test_first_moment_is_torch_lerp_so_an_infinite_gradient_gives_torchs_nan(name, backend):
    # 1 - beta1 >= 0.5 is torch.lerp's second formula, g - (g - m)(1 - w): inf - inf = NaN for an
    # infinite gradient, where m + (1 - beta1)(g - m) gives inf.
    results = []
    for cls, extra in (
        (getattr(torch.optim, name), {}),
        (getattr(ours, name), {"backend": backend}),
    ):
        param = torch.tensor([1.0, -2.0, 3.0], requires_grad=True)
        optimizer = cls([param], lr=0.1, betas=(0.3, 0.999), **extra)
        param.grad = torch.tensor([float("inf"), 1.0, -float("inf")])
        optimizer.step()
        results.append((param.detach().clone(), optimizer.state[param]["exp_avg"].clone()))
    for mine, theirs in zip(results[1], results[0], strict=True):
        torch.testing.assert_close(mine, theirs, equal_nan=True, rtol=1e-6, atol=1e-6)


# The declaration fields of stage C (State.when, State.init=None or a function of the group,
# Rule.step_state, Rule.eager_state, tuple Check names, Hyperparameter.convert, Rule.fixed,
# Rule.group_order, Rule.sparse_message, Rule.reference on the built-in engine), each exercised by
# a tiny rule of a user's, held to torch.optim where torch has the same algorithm.


def _momentum_update(param, grad, buf, *, lr, momentum):
    """torch's SGD momentum: the buffer is created from the first gradient (init=None) and
    exists only where momentum != 0 (when)."""
    if momentum == 0:
        assert buf is None
        return param - lr * grad, None
    buf = grad.clone() if buf is None else buf * momentum + grad
    return param - lr * buf, buf


class _Heavyball(RuleOptimizer):
    rule = Rule(
        hyperparameters=(Hyperparameter("lr", 0.1), Hyperparameter("momentum", 0.0)),
        checks=(),
        state=(State("momentum_buffer", init=None, when=lambda group: group["momentum"] != 0),),
        scalars=lambda group, step, state: {"lr": group["lr"], "momentum": group["momentum"]},
        update=_momentum_update,
        step_state=False,
    )


def test_state_created_by_the_update_only_where_when_holds_matches_torch_sgd() -> None:
    params = _params(torch.float64)
    theirs_params = [p.clone() for p in params]
    groups = [{"params": params[:2], "momentum": 0.9}, {"params": params[2:]}]
    theirs_groups = [{"params": theirs_params[:2], "momentum": 0.9}, {"params": theirs_params[2:]}]
    mine, theirs = _Heavyball(groups), torch.optim.SGD(theirs_groups, lr=0.1)
    _run(mine, params, range(STEPS))
    _run(theirs, theirs_params, range(STEPS))
    for ours_p, their_p in zip(params, theirs_params, strict=True):
        torch.testing.assert_close(ours_p, their_p, rtol=1e-12, atol=1e-12)
    # No step (step_state=False), a buffer only where momentum != 0: torch's SGD state keys.
    for p in params[:2]:
        assert set(mine.state[p]) == {"momentum_buffer"} == set(theirs.state[theirs_params[0]])
        assert mine.state[p]["momentum_buffer"] is not p.grad
    assert "momentum_buffer" not in mine.state.get(params[2], {})
    assert mine.state_dict()["state"][0].keys() == theirs.state_dict()["state"][0].keys()


def test_state_created_by_the_update_for_complex_params_is_complex() -> None:
    param = torch.randn(3, dtype=torch.complex128)
    theirs_param = param.clone()
    mine = _Heavyball([param], momentum=0.9)
    theirs = torch.optim.SGD([theirs_param], lr=0.1, momentum=0.9)
    _run(mine, [param], range(3))
    _run(theirs, [theirs_param], range(3))
    torch.testing.assert_close(param, theirs_param, rtol=1e-12, atol=1e-12)
    assert mine.state[param]["momentum_buffer"].dtype == torch.complex128


def _adagrad_update(param, grad, state_sum, *, lr, eps):
    state_sum = state_sum + grad * grad
    return param - lr * grad / (state_sum.sqrt() + eps), state_sum


class _EagerAdagrad(RuleOptimizer):
    rule = Rule(
        hyperparameters=(
            Hyperparameter("lr", 1e-2),
            Hyperparameter("initial_accumulator_value", 0.0),
            Hyperparameter("eps", 1e-10),
        ),
        checks=(),
        state=(State("sum", init=lambda group: group["initial_accumulator_value"]),),
        scalars=lambda group, step, state: {"lr": group["lr"], "eps": group["eps"]},
        update=_adagrad_update,
        eager_state=True,
    )


def test_eager_state_with_an_initial_value_from_the_group_is_torch_adagrads() -> None:
    params = _params(torch.float64)
    theirs_params = [p.clone() for p in params]
    mine = _EagerAdagrad(params, lr=0.1, initial_accumulator_value=0.25)
    theirs = torch.optim.Adagrad(theirs_params, lr=0.1, initial_accumulator_value=0.25)
    # Created in the constructor, before any step, as torch's Adagrad does.
    mine_state, their_state = mine.state_dict()["state"], theirs.state_dict()["state"]
    assert mine_state.keys() == their_state.keys() == set(range(len(params)))
    for index in their_state:
        assert mine_state[index].keys() == their_state[index].keys()
        torch.testing.assert_close(mine_state[index]["sum"], their_state[index]["sum"])
    _run(mine, params, range(STEPS))
    _run(theirs, theirs_params, range(STEPS))
    for ours_p, their_p in zip(params, theirs_params, strict=True):
        torch.testing.assert_close(ours_p, their_p, rtol=1e-12, atol=1e-12)


def _checked_rule(**overrides: Any) -> Rule:
    seen: list[Any] = []
    fields: dict[str, Any] = {
        "hyperparameters": (
            Hyperparameter("lr", 0.1),
            Hyperparameter("betas", (0.5, 0.5), convert=tuple),
            Hyperparameter("foreach", None, keyword_only=True),
        ),
        "checks": (
            Check(
                ("lr", "foreach"),
                lambda value: seen.append(value) or not (value[0] > 1 and value[1]),
                "lr {value[0]} is too large for foreach={value[1]}",
            ),
            Check("betas", lambda betas: seen.append(betas) or True, ""),
        ),
        "state": (),
        "scalars": lambda group, step, state: {"lr": group["lr"]},
        "update": lambda param, grad, *, lr: (param - lr * grad,),
        "fixed": {"decoupled": True},
        "group_order": ("betas", "decoupled", "foreach", "lr"),
    }
    fields.update(overrides)
    rule = Rule(**fields)
    rule.__dict__["seen"] = seen  # frozen dataclass: the test reads what the checks saw
    return rule


def test_a_check_of_several_names_gets_their_values_and_quotes_them() -> None:
    class Checked(RuleOptimizer):
        rule = _checked_rule()

    Checked([torch.zeros(1)], lr=2.0)
    assert Checked.rule.seen[0] == (2.0, None)
    with pytest.raises(ValueError, match=r"^lr 2.0 is too large for foreach=True$"):
        Checked([torch.zeros(1)], lr=2.0, foreach=True)


def test_convert_runs_after_the_checks_and_its_result_is_stored() -> None:
    class Checked(RuleOptimizer):
        rule = _checked_rule()

    optimizer = Checked([torch.zeros(1)], betas=[0.25, 0.75])
    assert Checked.rule.seen[-1] == [0.25, 0.75]  # the check saw the value given
    assert optimizer.param_groups[0]["betas"] == (0.25, 0.75)  # the group holds the converted


def test_fixed_keys_are_in_every_group_not_in_the_signature_and_forced_on_load() -> None:
    class Checked(RuleOptimizer):
        rule = _checked_rule()

    assert "decoupled" not in inspect.signature(Checked).parameters
    with pytest.raises(TypeError, match="decoupled"):
        Checked([torch.zeros(1)], decoupled=False)
    param = torch.zeros(1)
    optimizer = Checked([param])
    optimizer.add_param_group({"params": [torch.zeros(1)]})
    assert [group["decoupled"] for group in optimizer.param_groups] == [True, True]
    state = optimizer.state_dict()
    state["param_groups"][0]["decoupled"] = False
    del state["param_groups"][1]["decoupled"]
    optimizer.load_state_dict(state)
    assert [group["decoupled"] for group in optimizer.param_groups] == [True, True]


def test_group_order_orders_the_param_group_keys() -> None:
    class Checked(RuleOptimizer):
        rule = _checked_rule()

    optimizer = Checked([torch.zeros(1)])
    assert list(optimizer.param_groups[0]) == ["params", "betas", "decoupled", "foreach", "lr"]
    assert list(inspect.signature(Checked).parameters)[:4] == ["params", "lr", "betas", "foreach"]


def test_setstate_defaults_names_the_keys_filled_in_on_load() -> None:
    class Checked(RuleOptimizer):
        rule = _checked_rule(setstate_defaults={"foreach": None})

    optimizer = Checked([torch.zeros(1)])
    state = optimizer.state_dict()
    del state["param_groups"][0]["foreach"]
    del state["param_groups"][0]["lr"]
    optimizer.load_state_dict(state)
    assert optimizer.param_groups[0]["foreach"] is None
    assert "lr" not in optimizer.param_groups[0]  # as torch: only the keys it names


def test_sparse_message_is_the_rules() -> None:
    class Checked(RuleOptimizer):
        rule = _checked_rule(sparse_message="{name} wants dense gradients")

    param = torch.zeros(3)
    param.grad = torch.zeros(3).to_sparse()
    with pytest.raises(RuntimeError, match=r"^Checked wants dense gradients$"):
        Checked([param]).step()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"fixed": {"lr": 1.0}, "group_order": ()}, "are hyperparameters too"),
        ({"group_order": ("lr", "betas")}, "group_order must list every"),
        (
            {"checks": (Check(("lr", "gamma"), lambda v: True, ""),), "group_order": ()},
            "checks of undeclared names",
        ),
    ],
)
def test_new_declaration_mistakes_are_refused_at_class_creation(
    overrides: dict[str, Any], message: str
) -> None:
    with pytest.raises(TypeError, match=message):

        class Broken(RuleOptimizer):
            rule = _checked_rule(**overrides)


def _heavyball_reference(params, grads, momentum_buffer_list, *, lr, momentum):
    """The same rule as a group-level reference in torch.optim's functional shape."""
    for index, (param, grad) in enumerate(zip(params, grads, strict=True)):
        if momentum != 0:
            buf = momentum_buffer_list[index]
            if buf is None:
                buf = momentum_buffer_list[index] = grad.detach().clone()
            else:
                buf.mul_(momentum).add_(grad)
            grad = buf
        param.add_(grad, alpha=-lr)


def test_a_rule_with_a_reference_runs_on_the_built_in_engine_with_a_derived_class() -> None:
    from torchopt_lab.optim._base import TorchoptOptimizer

    class BuiltinHeavyball(TorchoptOptimizer):
        rule = dataclasses.replace(
            _Heavyball.rule,
            hyperparameters=(
                *_Heavyball.rule.hyperparameters,
                Hyperparameter("differentiable", False, keyword_only=True),
            ),
            reference=_heavyball_reference,
        )

    # The derived signature: the rule's hyperparameters, then backend and the engine's options
    # (no fused: the built-in engine adds none where the rule declares none).
    names = list(inspect.signature(BuiltinHeavyball).parameters)
    assert names == ["params", "lr", "momentum", "differentiable", "backend", *ENGINE_OPTIONS]
    params = _params(torch.float64)
    theirs_params = [p.clone() for p in params]
    groups = [{"params": params[:2], "momentum": 0.9}, {"params": params[2:]}]
    theirs_groups = [{"params": theirs_params[:2], "momentum": 0.9}, {"params": theirs_params[2:]}]
    mine = BuiltinHeavyball(groups, backend="torch")
    theirs = torch.optim.SGD(theirs_groups, lr=0.1)
    tensors = mine._group_tensors(mine.param_groups[1])
    assert list(tensors) == ["params", "grads", "momentum_buffer_list"]
    _run(mine, params, range(STEPS))
    _run(theirs, theirs_params, range(STEPS))
    for ours_p, their_p in zip(params, theirs_params, strict=True):
        torch.testing.assert_close(ours_p, their_p, rtol=1e-12, atol=1e-12)
    assert set(mine.state[params[0]]) == {"momentum_buffer"}
    assert "momentum_buffer" not in mine.state.get(params[2], {})
    assert mine._hyperparameters(mine.param_groups[0]) == {"lr": 0.1, "momentum": 0.9}


def test_a_built_in_rule_whose_reference_lists_do_not_match_its_state_is_refused() -> None:
    from torchopt_lab.optim._base import TorchoptOptimizer

    def reference(params, grads, *, lr, momentum):
        pass

    with pytest.raises(TypeError, match="reference takes lists"):

        class Broken(TorchoptOptimizer):
            rule = dataclasses.replace(
                _Heavyball.rule,
                hyperparameters=(
                    *_Heavyball.rule.hyperparameters,
                    Hyperparameter("differentiable", False, keyword_only=True),
                ),
                reference=reference,
            )


@pytest.mark.parametrize("name", WITH_TORCH)
def test_param_group_keys_and_repr_are_in_torchs_order(name: str) -> None:
    # torch's repr and state_dict list a group's keys in the order its constructor stores them,
    # which is not always its signature's (NAdam stores maximize before foreach).
    mine = REGISTRY[name]([torch.zeros(2)])
    theirs = getattr(torch.optim, name)([torch.zeros(2)])
    assert list(mine.param_groups[0]) == list(theirs.param_groups[0])
    assert repr(mine).splitlines()[1:-8] == repr(theirs).splitlines()[1:-1]
