"""A rule's update run once over lists (``torchopt_lab.optim._lifted``: foreach ops) gives the
same bits as the same update run per parameter (``foreach=False``: torch's for-loop).

The claim is exact equality (``torch.equal``), not a tolerance: every tensor goes through the
same element-wise ops in the same order. Parity with torch.optim itself is held by
``test_rules.py`` and ``test_parity.py``, which run the default (lifted) path.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

import torchopt_lab
import torchopt_lab.optim as ours
from torchopt_lab.optim._lifted import NotLiftable, TensorList
from torchopt_lab.optim.rules import REGISTRY, Hyperparameter, Rule, RuleOptimizer, State, _chunks

# Many small parameters (cut into several lists) and one of more than 256 KiB (alone).
SHAPES = [(4, 3), (5,), (), (2, 3, 4), (7,), (1,), (3, 3), (300, 300)]
STEPS = 8  # RAdam rectifies from step 6 on (beta2=0.999)
RULES = sorted(name for name, cls in REGISTRY.items() if cls.rule.reference is None)

OPTIONS: dict[str, list[dict[str, Any]]] = {
    "NAdam": [
        {},
        {"weight_decay": 0.1},
        {"weight_decay": 0.1, "decoupled_weight_decay": True},
        {"momentum_decay": 0.01, "maximize": True},
    ],
    "RAdam": [
        {},
        {"weight_decay": 0.1},
        {"weight_decay": 0.1, "decoupled_weight_decay": True, "maximize": True},
    ],
    "Adamax": [{}, {"weight_decay": 0.1}, {"maximize": True, "betas": (0.5, 0.9)}],
    "Adadelta": [{}, {"weight_decay": 0.1, "rho": 0.5}, {"maximize": True, "eps": 1e-3}],
    "Lion": [{}, {"weight_decay": 0.1}, {"maximize": True, "betas": (0.5, 0.9)}],
}
ENGINE_OPTIONS: list[dict[str, Any]] = [
    {"max_grad_norm": 0.5},
    {"lr": torch.tensor(0.01, dtype=torch.float64)},
]
CASES = [
    (name, options) for name in RULES for options in [*OPTIONS.get(name, [{}]), *ENGINE_OPTIONS]
]


def _params(dtype: torch.dtype) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return [
        torch.randn(shape, generator=generator, dtype=torch.float64).to(dtype).requires_grad_()
        for shape in SHAPES
    ]


def _set_grads(params: list[torch.Tensor], step: int) -> None:
    generator = torch.Generator().manual_seed(100 + step)
    for p in params:
        grad = torch.randn(p.shape, generator=generator, dtype=torch.float64)
        if p.is_complex():
            grad = torch.complex(grad, torch.randn(p.shape, generator=generator).double())
        p.grad = grad.to(p.dtype)


def _spy(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Count the members of each lifted update."""
    sizes: list[int] = []
    lifted = RuleOptimizer._lifted_update

    def counting(self: RuleOptimizer, members: list, *args: Any) -> None:
        sizes.append(len(members))
        lifted(self, members, *args)

    monkeypatch.setattr(RuleOptimizer, "_lifted_update", counting)
    return sizes


def _run(
    cls: type, options: dict[str, Any], dtype: torch.dtype, foreach: bool | None, **engine: Any
) -> tuple[list[torch.Tensor], dict[str, Any]]:
    params = _params(dtype)
    optimizer = cls(params, **options, foreach=foreach, backend="torch", **engine)
    for step in range(STEPS):
        _set_grads(params, step)
        optimizer.step()
    return [p.detach() for p in params], optimizer.state_dict()["state"]


def _assert_identical(
    loop: tuple[list[torch.Tensor], dict], lifted: tuple[list[torch.Tensor], dict]
) -> None:
    for expected, actual in zip(loop[0], lifted[0], strict=True):
        assert torch.equal(actual, expected)
    assert loop[1].keys() == lifted[1].keys()
    for index, state in loop[1].items():
        assert state.keys() == lifted[1][index].keys()
        for key, value in state.items():
            assert torch.equal(lifted[1][index][key], value), (index, key)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize(("name", "options"), CASES, ids=str)
def test_lifted_update_is_bitwise_the_per_parameter_update(
    name: str, options: dict[str, Any], dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    cls = REGISTRY[name]
    loop = _run(cls, options, dtype, foreach=False)
    sizes = _spy(monkeypatch)
    lifted = _run(cls, options, dtype, foreach=None)
    assert sizes and max(sizes) > 1  # the lifted path ran, over several parameters at once
    _assert_identical(loop, lifted)


@pytest.mark.parametrize("name", RULES)
def test_lifted_update_is_bitwise_the_per_parameter_update_with_float32_state(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    cls = REGISTRY[name]
    loop = _run(cls, {}, torch.bfloat16, foreach=False, float32_state=True)
    sizes = _spy(monkeypatch)
    lifted = _run(cls, {}, torch.bfloat16, foreach=True, float32_state=True)
    assert sizes and max(sizes) > 1
    _assert_identical(loop, lifted)


@pytest.mark.parametrize("dtype", [torch.complex64, torch.complex128], ids=str)
@pytest.mark.parametrize("name", RULES)
def test_lifted_update_is_bitwise_the_per_parameter_update_on_complex_params(
    name: str, dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    cls = REGISTRY[name]
    loop = _run(cls, {}, dtype, foreach=False)
    sizes = _spy(monkeypatch)
    lifted = _run(cls, {}, dtype, foreach=None)
    assert sizes and max(sizes) > 1
    _assert_identical(loop, lifted)


@pytest.mark.parametrize(
    "options",
    [{"foreach": False}, {"differentiable": True}, {"record_norms": True}],
    ids=str,
)
def test_per_parameter_update_runs_where_asked_or_needed(
    options: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    # foreach=False is torch's for-loop, as asked; differentiable=True and record_norms keep the
    # per-parameter update (autograd through foreach ops, norms per parameter).
    sizes = _spy(monkeypatch)
    params = [p.detach() for p in _params(torch.float32)]  # differentiable: no leaf to update
    optimizer = ours.NAdam(params, backend="torch", **options)
    _set_grads(params, 0)
    optimizer.step()
    assert sizes == []


def _odd_update(
    param: torch.Tensor,
    grad: torch.Tensor,
    velocity: torch.Tensor | None,
    trace: torch.Tensor | None,
    *,
    lr: float,
    decay: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    # Ops with no foreach form (atan2, where, hypot, nan_to_num, comparisons), a tensor method
    # and an attribute read, and state created by the update (velocity) or absent (trace).
    if velocity is None:
        velocity = grad.clone()
    else:
        velocity = torch.where(grad > 0, velocity * decay, torch.atan2(grad, velocity))
    if trace is not None:
        trace = torch.hypot(trace, grad)
    step = torch.nan_to_num(velocity / (velocity.abs() + 1)).to(param.dtype)
    param = param - lr * step.clamp(min=-0.5, max=0.5) - (2 - param) * 1e-3 / (3 + param.square())
    return param, velocity, trace


def _odd_rule(**overrides: Any) -> Rule:
    fields: dict[str, Any] = {
        "hyperparameters": (
            Hyperparameter("lr", 0.1),
            Hyperparameter("decay", 0.9),
            Hyperparameter("traced", False),
            Hyperparameter("foreach", None, keyword_only=True),
        ),
        "checks": (),
        "state": (
            State("velocity", init=None),
            State("trace", init=0.5, when=lambda group: group["traced"]),
        ),
        "scalars": lambda group, step, state: {"lr": group["lr"], "decay": group["decay"]},
        "update": _odd_update,
    }
    return Rule(**{**fields, **overrides})


class Odd(RuleOptimizer):
    """A user's rule whose update uses ops torch has no foreach form of."""

    rule = _odd_rule()


class OddComplex(RuleOptimizer):
    """The same, updating complex parameters as they are (not as real views)."""

    rule = _odd_rule(
        update=lambda param, grad, velocity, trace, *, lr, decay: (
            param - lr * (grad if velocity is None else velocity * decay + grad),
            grad.clone() if velocity is None else velocity * decay + grad,
            None if trace is None else trace * decay,
        ),
        complex_as_real=False,
    )


@pytest.mark.parametrize("traced", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_user_rule_with_ops_lacking_a_foreach_form_lifts_bitwise(
    dtype: torch.dtype, traced: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    loop = _run(Odd, {"traced": traced}, dtype, foreach=False)
    sizes = _spy(monkeypatch)
    lifted = _run(Odd, {"traced": traced}, dtype, foreach=None)
    assert sizes and max(sizes) > 1
    _assert_identical(loop, lifted)


@pytest.mark.parametrize("dtype", [torch.complex64, torch.complex128], ids=str)
def test_user_rule_on_complex_params_not_as_real_views_lifts_bitwise(
    dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    loop = _run(OddComplex, {"traced": True}, dtype, foreach=False)
    sizes = _spy(monkeypatch)
    lifted = _run(OddComplex, {"traced": True}, dtype, foreach=None)
    assert sizes and max(sizes) > 1
    _assert_identical(loop, lifted)


class ByShape(RuleOptimizer):
    """A user's rule that branches on each parameter's shape: it cannot run over lists."""

    rule = Rule(
        hyperparameters=(Hyperparameter("lr", 0.1), Hyperparameter("foreach", None)),
        checks=(),
        state=(),
        scalars=lambda group, step, state: {"lr": group["lr"]},
        update=lambda param, grad, *, lr: (param - (lr if param.dim() > 1 else 2 * lr) * grad,),
    )


def test_update_branching_per_parameter_runs_per_parameter_and_says_so() -> None:
    loop = _run(ByShape, {}, torch.float32, foreach=False)
    lifted = _run(ByShape, {}, torch.float32, foreach=None)
    _assert_identical(loop, lifted)
    decision = torchopt_lab.backend_info()["decisions"]["optim.ByShape (foreach)"]
    assert "cannot run over lists" in decision["reason"]


BINARY: list[Callable[[Any, Any], Any]] = [
    lambda x, y: x + y,
    lambda x, y: x - y,
    lambda x, y: x * y,
    lambda x, y: x / y,
    lambda x, y: x + 0.3,
    lambda x, y: 0.3 + x,
    lambda x, y: x - 0.3,
    lambda x, y: 0.3 - x,
    lambda x, y: 0.3 * x,
    lambda x, y: x / 0.3,
    lambda x, y: 0.3 / x,
    lambda x, y: x**2,
    lambda x, y: 2**x,
    lambda x, y: -x,
    lambda x, y: abs(x),
    lambda x, y: torch.add(x, y, alpha=0.5),
    lambda x, y: x.sub(y, alpha=2),
    lambda x, y: torch.lerp(x, y, 0.3),
    lambda x, y: torch.lerp(x, y, 0.7),
    lambda x, y: x.lerp(y, y.sigmoid()),
    lambda x, y: torch.maximum(x, y),
    lambda x, y: torch.minimum(x, y),
    lambda x, y: x.clamp(min=0.0),
    lambda x, y: x.clamp(-0.5, 0.5),
    lambda x, y: x.clamp_max(0.0),
    lambda x, y: torch.addcmul(x, y, y, value=0.5),
    lambda x, y: torch.addcdiv(x, y, x, value=-2),
    lambda x, y: x.sqrt(),
    lambda x, y: torch.sign(x),
    lambda x, y: x.exp().log(),
    lambda x, y: x.reciprocal().rsqrt(),
    lambda x, y: x * torch.tensor(0.3, dtype=torch.float64),
    lambda x, y: torch.where(x > y, x, y),
    lambda x, y: x[x > 0].sum() * 0 + x.square(),
]


@pytest.mark.parametrize("shapes", [[(5, 3), (7,)], [(5, 3), (7,), ()]], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("op", BINARY, ids=range(len(BINARY)))
def test_tensor_list_op_is_bitwise_the_op_on_each_tensor(
    op: Callable[[Any, Any], Any], dtype: torch.dtype, shapes: list[tuple[int, ...]]
) -> None:
    # With a 0-dim tensor in the list and without (numbers reach foreach differently); special
    # values too: NaN, infinities and both zeros.
    special = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 1.0, -2.5])
    generator = torch.Generator().manual_seed(0)
    xs = [torch.randn(shape, generator=generator).to(dtype) for shape in shapes]
    ys = [torch.randn(x.shape, generator=generator).to(dtype) for x in xs]
    xs.append(special.to(dtype))
    ys.append(special.flip(0).to(dtype))
    result = op(TensorList(xs), TensorList(ys))
    assert isinstance(result, TensorList)
    for x, y, actual in zip(xs, ys, result.tensors, strict=True):
        expected = op(x, y)
        torch.testing.assert_close(actual, expected, rtol=0, atol=0, equal_nan=True)
        # assert_close takes -0.0 for 0.0: the signs of zeros too.
        signs = [torch.where(t.isnan(), False, t.signbit()) for t in (actual, expected)]
        assert torch.equal(*signs)


def test_tensor_list_refuses_what_differs_per_tensor() -> None:
    tensors = TensorList([torch.zeros(2), torch.zeros(2, 2)])
    assert tensors.dtype == torch.float32  # the same for every tensor: answered
    with pytest.raises(NotLiftable):
        _ = tensors.shape
    with pytest.raises(NotLiftable):
        bool(tensors)
    with pytest.raises(NotLiftable):
        len(tensors)


@pytest.mark.parametrize("name", RULES)
def test_lifted_update_is_bitwise_the_per_parameter_update_on_dtensor_parameters(
    name: str, tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # FSDP2's parameters are DTensors, which lack a sharding rule for torch._foreach_copy_.
    import torch.distributed as dist

    tensor = pytest.importorskip("torch.distributed.tensor")
    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1
    )
    try:
        mesh = tensor.init_device_mesh("cpu", (1,))

        def run(foreach: bool | None) -> list[torch.Tensor]:
            params = [
                torch.nn.Parameter(tensor.distribute_tensor(p.detach(), mesh, [tensor.Shard(0)]))
                for p in _params(torch.float32)
                if p.dim() > 0
            ]
            optimizer = REGISTRY[name](params, foreach=foreach, backend="torch", max_grad_norm=0.5)
            for step in range(3):
                generator = torch.Generator().manual_seed(step)
                for p in params:
                    grad = torch.randn(p.shape, generator=generator)
                    p.grad = tensor.distribute_tensor(grad, mesh, [tensor.Shard(0)])
                optimizer.step()
            return [p.full_tensor() for p in params]

        loop = run(False)
        sizes = _spy(monkeypatch)
        lifted = run(None)
    finally:
        dist.destroy_process_group()
    assert sizes and max(sizes) > 1
    for expected, actual in zip(loop, lifted, strict=True):
        assert torch.equal(actual, expected)


def test_cpu_lists_pack_small_parameters_and_leave_large_ones_alone() -> None:
    # 256 KiB of float32 per list at most: 65536 elements; larger parameters run alone.
    numels = [10, 100_000, 10, *[8192] * 9, 70_000, 10]
    members = [(torch.zeros(n), {}, {}) for n in numels]
    sizes = [[m[0].numel() for m in chunk] for chunk in _chunks(members)]
    assert sizes == [[10, 10, *[8192] * 7], [8192, 8192, 10], [100_000], [70_000]]
