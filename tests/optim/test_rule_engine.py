"""Optimizers declared as rules get the engine's options, on both backends (Triton under the
interpreter): ``max_grad_norm`` (torch's ``clip_grad_norm_`` then the optimizer),
``skip_nonfinite`` (the step is skipped and counted, the step count left alone), GradScaler
(torch's result, inf steps skipped) and ``record_norms`` (the norms the step used).

The oracle is torch.optim (Lion, which torch lacks: our Lion on the torch path with the
clipping done by torch). Tolerances: float64 to 1e-12 relative and absolute; float32 to 1e-6
(the rule's update is written out of place, and the kernel multiplies by the clip coefficient
computed in float64).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
import torch

from torchopt_lab.optim.rules import REGISTRY

NAMES = sorted(REGISTRY)
BACKENDS = ["torch", "triton"]
SHAPES = [(4, 3), (5,), ()]
STEPS = 4


def _params(dtype: torch.dtype) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return [torch.randn(shape, generator=generator, dtype=dtype) for shape in SHAPES]


def _grads(params: list[torch.Tensor], step: int, scale: float = 10.0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(100 + step)
    # Large enough that a max_grad_norm of 1 clips every step.
    return [scale * torch.randn(p.shape, generator=generator, dtype=p.dtype) for p in params]


def _oracle(name: str, params: list[torch.Tensor], **kwargs: Any) -> torch.optim.Optimizer:
    if hasattr(torch.optim, name):
        return getattr(torch.optim, name)(params, **kwargs)
    return REGISTRY[name](params, backend="torch", **kwargs)


def _close(mine: list[torch.Tensor], theirs: list[torch.Tensor]) -> None:
    for ours, reference in zip(mine, theirs, strict=True):
        tolerance = 1e-12 if ours.dtype == torch.float64 else 1e-6
        torch.testing.assert_close(ours, reference, rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("name", NAMES)
def test_max_grad_norm_equals_clip_grad_norm_then_torch(
    name: str, dtype: torch.dtype, backend: str
) -> None:
    mine, theirs = _params(dtype), _params(dtype)
    ours = REGISTRY[name](mine, backend=backend, max_grad_norm=1.0)
    reference = _oracle(name, theirs)
    for step in range(STEPS):
        for p, q, grad in zip(mine, theirs, _grads(mine, step), strict=True):
            p.grad, q.grad = grad.clone(), grad.clone()
        torch.nn.utils.clip_grad_norm_(theirs, 1.0)
        ours.step()
        reference.step()
        # The gradients themselves are left as they were (the clip scales what the step reads).
        torch.testing.assert_close(mine[0].grad, _grads(mine, step)[0], rtol=0, atol=0)
    _close(mine, theirs)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", NAMES)
def test_skip_nonfinite_skips_the_step_counts_it_and_keeps_the_step_count(
    name: str, backend: str
) -> None:
    mine, theirs = _params(torch.float64), _params(torch.float64)
    ours = REGISTRY[name](mine, backend=backend, max_grad_norm=1.0, skip_nonfinite=True)
    reference = _oracle(name, theirs)
    for step in range(STEPS):
        grads = _grads(mine, step)
        for p, grad in zip(mine, grads, strict=True):
            p.grad = grad.clone()
        if step == 1:
            mine[1].grad[0] = float("inf")
            before = [p.clone() for p in mine]
            ours.step()
            _close(mine, before)  # nothing moved
            continue
        for q, grad in zip(theirs, grads, strict=True):
            q.grad = grad.clone()
        torch.nn.utils.clip_grad_norm_(theirs, 1.0)
        ours.step()
        reference.step()
    assert ours.skipped_steps == 1
    if REGISTRY[name].rule.step_state:  # SGD keeps no step count, as torch's
        assert all(ours.state[p]["step"].item() == STEPS - 1 for p in mine)
    _close(mine, theirs)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", NAMES)
def test_grad_scaler_gives_torchs_result_and_skips_inf_steps(name: str, backend: str) -> None:
    mine, theirs = _params(torch.float32), _params(torch.float32)
    ours = REGISTRY[name](mine, backend=backend, max_grad_norm=1.0)
    reference = _oracle(name, theirs)
    scalers = [torch.amp.GradScaler("cpu", init_scale=2.0**10) for _ in range(2)]
    for step in range(STEPS):
        for params, scaler in ((mine, scalers[0]), (theirs, scalers[1])):
            scale = scaler.scale(torch.ones(())).item()  # as scaler.scale(loss) would
            for p, grad in zip(params, _grads(params, step), strict=True):
                p.grad = grad * scale
            if step == 2:
                params[0].grad[0] = float("inf")
        # Ours unscales (GradScaler, on the host) and clips inside step(); torch's by hand.
        scalers[0].step(ours)
        scalers[1].unscale_(reference)
        torch.nn.utils.clip_grad_norm_(theirs, 1.0)
        scalers[1].step(reference)
        for scaler in scalers:
            scaler.update()
    assert scalers[0].get_scale() == scalers[1].get_scale()
    if REGISTRY[name].rule.step_state:  # SGD keeps no step count, as torch's
        assert all(ours.state[p]["step"].item() == STEPS - 1 for p in mine)
    _close(mine, theirs)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", NAMES)
def test_record_norms_gives_the_grad_update_and_param_norms_of_the_step(
    name: str, backend: str
) -> None:
    params = _params(torch.float64)
    ours = REGISTRY[name](params, backend=backend, max_grad_norm=1.0, record_norms=True)
    grads = _grads(params, 0)
    for p, grad in zip(params, grads, strict=True):
        p.grad = grad.clone()
    coefficient = min(1.0, 1.0 / (torch.cat([g.reshape(-1) for g in grads]).norm().item() + 1e-6))
    before = [p.clone() for p in params]
    ours.step()
    diagnostics = ours.norm_diagnostics()
    assert set(map(id, diagnostics)) == set(map(id, params))
    for p, old, grad in zip(params, before, grads, strict=True):
        expected = torch.tensor(
            [
                (grad * coefficient).square().sum().item(),
                (p - old).square().sum().item(),
                old.square().sum().item(),
            ],
            dtype=torch.float32,
        )
        torch.testing.assert_close(diagnostics[p], expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", NAMES)
def test_float32_state_keeps_bfloat16_params_state_in_float32(name: str) -> None:
    # The update runs in float32 on the float32 state, each step's parameter rounded to
    # bfloat16: the oracle is the same rule's float32 step on a float32 copy, rounded the same
    # way (the rule's float32 parity with torch is held by test_rules.py).
    params = [p.to(torch.bfloat16) for p in _params(torch.float32)]
    shadow = [p.float() for p in params]
    ours = REGISTRY[name](params, float32_state=True)
    reference = REGISTRY[name](shadow, backend="torch")
    for step in range(STEPS):
        for p, q, grad in zip(params, shadow, _grads(shadow, step, 1.0), strict=True):
            p.grad, q.grad = grad.to(torch.bfloat16), grad.to(torch.bfloat16).float()
        ours.step()
        reference.step()
        with torch.no_grad():
            for q in shadow:
                q.copy_(q.to(torch.bfloat16).float())
    for p in params:
        for key, value in ours.state[p].items():
            if key != "step" and value.dim():
                assert value.dtype == torch.float32, key
    for p, q in zip(params, shadow, strict=True):
        torch.testing.assert_close(p.float(), q, rtol=0, atol=0)


def test_rule_constructors_take_the_engine_options_keyword_only_after_backend() -> None:
    import inspect

    for cls in REGISTRY.values():
        names = list(inspect.signature(cls).parameters)
        tail = ["backend", "max_grad_norm", "skip_nonfinite", "float32_state", "record_norms"]
        assert names[-5:] == tail
        with pytest.raises(ValueError, match="skip_nonfinite=True needs max_grad_norm"):
            cls([torch.zeros(2)], skip_nonfinite=True)
        with pytest.raises(ValueError, match="Invalid max_grad_norm value: -1"):
            cls([torch.zeros(2)], max_grad_norm=-1.0)


def test_a_triton_update_unpacking_scalars_in_another_order_than_the_rule_raises() -> None:
    # Lion's declaration with its kernel update reading lr and beta1 swapped: the kernel would
    # take beta1 for the learning rate; the step refuses instead of giving wrong numbers.
    from torchopt_lab.optim.lion import Lion
    from torchopt_lab.optim.rules import RuleOptimizer, tl, triton_jit

    @triton_jit
    def swapped(param, grad, states, scalars):
        (exp_avg,) = states
        beta1, lr, beta2, weight_decay = scalars
        sign = tl.where(grad > 0, 1.0, -1.0).to(param.dtype)
        return param - lr * (sign + weight_decay * param), (exp_avg + beta1 * beta2,)

    class Swapped(RuleOptimizer):
        rule = dataclasses.replace(Lion.rule, triton_update=swapped)

    param = torch.zeros(3)
    param.grad = torch.ones(3)
    with pytest.raises(ValueError, match=r"unpacks scalars as \['beta1', 'lr'"):
        Swapped([param], backend="triton").step()
