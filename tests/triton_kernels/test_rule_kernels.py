"""The fused rule kernel (triton_kernels/optim/rule_kernels.py) runs each registered rule's
``triton_update`` and matches torch.optim (Lion: the rule's torch update, itself held to the paper
in tests/optim/test_rules.py) step for step, for every CPU optim input of torch's optim_db.

Tolerances as the other fused-kernel tests: float32 1e-6 relative, 1e-5 absolute (scalars are read
in float32 and a fused multiply-add moves an intermediate by an ulp); float64 1e-12.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch.testing._internal.common_optimizers import optim_db

import torchopt_lab.optim as ours
from torchopt_lab import backend
from torchopt_lab.optim.rules import REGISTRY, Hyperparameter, Rule, RuleOptimizer, State
from triton_kernels.optim.rule_kernels import rule_step

TOLERANCES = {torch.float64: (1e-12, 1e-12), torch.float32: (1e-6, 1e-5)}
STEPS = 3
SHAPES = [(37, 3), (5,), (), (1100,)]  # a tail, a tiny tensor, a scalar, several blocks

INFOS = {info.optim_cls.__name__: info for info in optim_db}
WITH_TORCH = sorted(name for name in REGISTRY if name in INFOS)
INPUTS = [
    (name, dict(optim_input.kwargs))
    for name in WITH_TORCH
    for optim_input in INFOS[name].optim_inputs_func(device="cpu")
]
LION_INPUTS = [{}, {"lr": 1e-2, "betas": (0.8, 0.95), "weight_decay": 0.5}, {"maximize": True}]


def _params(dtype: torch.dtype, seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    device = torch.get_default_device()
    return [torch.randn(s, generator=generator, dtype=dtype).to(device) for s in SHAPES]


def _run(optimizer: torch.optim.Optimizer, params: list[torch.Tensor], steps: range) -> None:
    for step in steps:
        generator = torch.Generator().manual_seed(100 + step)
        for p in params:
            p.grad = torch.randn(p.shape, generator=generator, dtype=p.dtype).to(p.device)
        optimizer.step()


def _assert_same(
    mine: torch.optim.Optimizer,
    params: list[torch.Tensor],
    theirs: torch.optim.Optimizer,
    reference: list[torch.Tensor],
) -> None:
    dtype = params[0].dtype.to_real() if params[0].is_complex() else params[0].dtype
    rtol, atol = TOLERANCES[dtype]
    for a, b in zip(params, reference, strict=True):
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol)
    for a, b in zip(params, reference, strict=True):
        assert list(mine.state[a]) == list(theirs.state[b])
        for key, value in theirs.state[b].items():
            torch.testing.assert_close(mine.state[a][key], value, rtol=rtol, atol=atol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize(("name", "kwargs"), INPUTS, ids=lambda v: str(v))
def test_rule_kernel_matches_torch_optim_on_every_optim_input(
    name: str, kwargs: dict[str, Any], dtype: torch.dtype
) -> None:
    params, reference = _params(dtype), _params(dtype)
    mine = REGISTRY[name](params, backend="triton", **kwargs)
    theirs = getattr(torch.optim, name)(reference, **kwargs)
    _run(mine, params, range(STEPS))
    _run(theirs, reference, range(STEPS))
    _assert_same(mine, params, theirs, reference)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("kwargs", LION_INPUTS, ids=str)
def test_lion_kernel_matches_lions_torch_update(kwargs: dict[str, Any], dtype: torch.dtype) -> None:
    params, reference = _params(dtype), _params(dtype)
    mine = ours.Lion(params, backend="triton", **kwargs)
    theirs = ours.Lion(reference, backend="torch", **kwargs)
    _run(mine, params, range(STEPS))
    _run(theirs, reference, range(STEPS))
    _assert_same(mine, params, theirs, reference)


# The built-ins (rule.reference set) are excluded: their fused kernels update real tensors only;
# backend="triton" refuses complex parameters, which backend="auto" sends to the torch path
# (tests/triton_kernels/test_fused_optimizer_faults.py and tests/optim/test_optim_db.py hold both).
RULE_KERNELS = [name for name in WITH_TORCH if REGISTRY[name].rule.reference is None]


@pytest.mark.parametrize("name", RULE_KERNELS)
def test_rule_kernel_matches_torch_optim_on_complex_params(name: str) -> None:
    params, reference = _params(torch.complex64), _params(torch.complex64)
    kwargs = {"lr": 0.01, "weight_decay": 0.1, "maximize": True}
    mine = REGISTRY[name](params, backend="triton", **kwargs)
    theirs = getattr(torch.optim, name)(reference, **kwargs)
    _run(mine, params, range(STEPS))
    _run(theirs, reference, range(STEPS))
    _assert_same(mine, params, theirs, reference)


@pytest.mark.parametrize("name", WITH_TORCH)
def test_rule_kernel_gives_each_parameter_the_scalars_of_its_own_step(name: str) -> None:
    # The first parameter joins late, so one launch holds two step counts (two scalar rows).
    params, reference = _params(torch.float64), _params(torch.float64)
    mine = REGISTRY[name]([{"params": params[1:]}], backend="triton")
    theirs = getattr(torch.optim, name)([{"params": reference[1:]}])
    _run(mine, params[1:], range(2))
    _run(theirs, reference[1:], range(2))
    mine.param_groups[0]["params"].insert(0, params[0])
    theirs.param_groups[0]["params"].insert(0, reference[0])
    _run(mine, params, range(2, 4))
    _run(theirs, reference, range(2, 4))
    if REGISTRY[name].rule.step_state:  # SGD keeps no step count (as torch): results only
        assert mine.state[params[0]]["step"].item() == 2
        assert mine.state[params[1]]["step"].item() == 4
    _assert_same(mine, params, theirs, reference)


class _NoKernel(RuleOptimizer):
    rule = Rule(
        hyperparameters=(Hyperparameter("lr", 0.1),),
        checks=(),
        state=(State("momentum_buffer"),),
        scalars=lambda group, step, state: {"lr": group["lr"]},
        update=lambda p, g, buf, *, lr: (p - lr * g, buf + g),
    )


def _one_param(contiguous: bool = True) -> torch.Tensor:
    param = torch.zeros(4, 6)
    if not contiguous:
        param = param.t()
    param.grad = torch.ones_like(param)
    return param


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: _NoKernel([_one_param()], backend="triton"), "declares no triton_update"),
        (lambda: ours.NAdam([_one_param(False)], backend="triton"), "not contiguous"),
        (
            lambda: ours.RAdam([_one_param()], backend="triton", differentiable=True),
            "differentiable=True",
        ),
    ],
    ids=["no_triton_update", "non_contiguous", "differentiable"],
)
def test_explicit_triton_backend_refuses_what_the_rule_kernel_cannot_do(
    make: Any, message: str
) -> None:
    with pytest.raises(
        RuntimeError, match=f"backend='triton' cannot run the rule kernel.*{message}"
    ):
        make().step()


def test_auto_backend_records_why_a_rule_ran_on_the_torch_path(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # With "auto" meaning Triton in this process, a differentiable step falls back, and says so.
    monkeypatch.setenv(backend.ENV_VAR, "triton")
    param = _one_param().requires_grad_(False)
    ours.Adamax([param], differentiable=True).step()
    decision = backend.backend_info()["decisions"]["optim.Adamax"]
    assert decision["backend"] == "torch"
    assert "differentiable=True" in decision["reason"]


def test_rule_step_refuses_mismatched_inputs() -> None:
    param, grad = torch.zeros(3), torch.zeros(3)
    update = ours.Lion.rule.triton_update
    with pytest.raises(ValueError, match="one of each per param"):
        rule_step(update, [param], [grad], [[]], [(0.1, 0.9, 0.99, 0.0)], [0])
    with pytest.raises(TypeError, match=r"dtype torch\.float16 is not supported"):
        rule_step(update, [param.half()], [grad.half()], [[param.half()]], [(0.1,)], [0])
    with pytest.raises(ValueError, match="contiguous"):
        wide = torch.zeros(3, 2)
        rule_step(update, [wide.t()], [wide.t()], [[wide.t()]], [(0.1, 0.9, 0.99, 0.0)], [0])
