"""Adam's declaration holds three forms of one update side by side: the per-tensor ``update`` +
``scalars`` (run here by the rule engine, :class:`RuleOptimizer`; what ``fused=True`` compiles on
the CPU), the group-level ``reference`` (:func:`torchopt_lab.optim.adam.adam`, the built-in
engine's torch path) and the fused Triton ``kernel`` (the built-in engine's ``adam``
KernelUpdate, under the Triton interpreter here). They are bound to each other for every option
combination: amsgrad, maximize, weight_decay, decoupled_weight_decay (AdamW), tensor lr, complex
parameters (the kernel takes real tensors only: complex ones are bound update to reference).

Stated tolerances: float64 to 1e-12 relative (the update is written out of place in the
reference's order of operations; the kernel computes in registers, fused multiply-adds allowed),
float32 to 1e-6, complex64 to 1e-6.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any

import pytest
import torch

from torchopt_lab.optim import Adam, AdamW
from torchopt_lab.optim.adam import ADAM, ADAMW
from torchopt_lab.optim.rules import REGISTRY, RuleOptimizer

STEPS = 5
SHAPES = [(4, 3), (5,), ()]
TOLERANCES = {
    torch.float64: (1e-12, 1e-12),
    torch.float32: (1e-6, 1e-6),
    torch.complex64: (1e-6, 1e-6),
}


class _AdamUpdate(RuleOptimizer):
    """Adam's per-tensor update on the rule engine (not registered: Adam is, on its engine)."""

    rule = dataclasses.replace(ADAM, reference=None, kernel=None)


class _AdamWUpdate(RuleOptimizer):
    rule = dataclasses.replace(ADAMW, reference=None, kernel=None)


COMBOS = [
    {"amsgrad": a, "maximize": m, "weight_decay": wd, "decoupled_weight_decay": d}
    for a, m, wd, d in itertools.product([False, True], [False, True], [0.0, 0.1], [False, True])
]


def _params(dtype: torch.dtype) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return [torch.randn(shape, generator=generator, dtype=dtype) for shape in SHAPES]


def _run(make: Any, dtype: torch.dtype) -> tuple[list[torch.Tensor], list[dict[str, Any]]]:
    params = _params(dtype)
    optimizer = make(params)
    for step in range(STEPS):
        generator = torch.Generator().manual_seed(100 + step)
        for p in params:
            p.grad = torch.randn(p.shape, generator=generator, dtype=dtype)
        optimizer.step()
    return params, [dict(optimizer.state[p]) for p in params]


def _assert_same(run: Any, expected: Any, dtype: torch.dtype) -> None:
    rtol, atol = TOLERANCES[dtype]
    for mine, theirs in zip(run[0], expected[0], strict=True):
        torch.testing.assert_close(mine, theirs, rtol=rtol, atol=atol)
    for mine, theirs in zip(run[1], expected[1], strict=True):
        assert list(mine) == list(theirs)
        for key, value in theirs.items():
            torch.testing.assert_close(mine[key].cpu(), value, rtol=rtol, atol=atol)


@pytest.mark.parametrize("tensor_lr", [False, True], ids=["float_lr", "tensor_lr"])
@pytest.mark.parametrize("dtype", list(TOLERANCES), ids=str)
@pytest.mark.parametrize(
    "options", COMBOS, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items())
)
def test_adam_update_reference_and_kernel_agree(
    options: dict[str, Any], dtype: torch.dtype, tensor_lr: bool
) -> None:
    def lr() -> float | torch.Tensor:
        return torch.tensor(0.01) if tensor_lr else 0.01

    reference = _run(lambda ps: Adam(ps, lr=lr(), backend="torch", **options), dtype)
    update = _run(lambda ps: _AdamUpdate(ps, lr=lr(), backend="torch", **options), dtype)
    _assert_same(update, reference, dtype)
    if not dtype.is_complex:
        kernel = _run(lambda ps: Adam(ps, lr=lr(), backend="triton", **options), dtype)
        _assert_same(kernel, reference, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("amsgrad", [False, True])
def test_adamw_rule_update_reference_and_kernel_agree(dtype: torch.dtype, amsgrad: bool) -> None:
    # AdamW's rule: Adam's with weight_decay=1e-2 by default and decoupled_weight_decay fixed.
    reference = _run(lambda ps: AdamW(ps, amsgrad=amsgrad, backend="torch"), dtype)
    update = _run(lambda ps: _AdamWUpdate(ps, amsgrad=amsgrad, backend="torch"), dtype)
    kernel = _run(lambda ps: AdamW(ps, amsgrad=amsgrad, backend="triton"), dtype)
    _assert_same(update, reference, dtype)
    _assert_same(kernel, reference, dtype)
    theirs = _run(lambda ps: torch.optim.AdamW(ps, amsgrad=amsgrad), dtype)
    _assert_same(reference, theirs, dtype)


def test_adam_and_adamw_are_registered_built_ins_of_one_rule_each() -> None:
    assert REGISTRY["Adam"] is Adam and REGISTRY["AdamW"] is AdamW
    assert Adam.rule is ADAM and AdamW.rule is ADAMW
    assert ADAM.reference is ADAMW.reference and ADAM.kernel is ADAMW.kernel
    assert dict(ADAMW.fixed) == {"decoupled_weight_decay": True}
    # The kernel spec lives in the rule: _fused has no table of its own (SPECS is gone).
    from torchopt_lab.optim import _fused

    assert not hasattr(_fused, "SPECS")
    assert _fused.kernel_spec(AdamW) is ADAM.kernel
