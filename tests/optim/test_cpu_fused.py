"""``fused=True`` on CPU tensors for the optimizers declared as rules: the rule's update compiled by
Inductor (``torchopt_lab/optim/_cpu_fused.py``), held to the rule's torch path (``fused=None``).

Stated tolerance: Inductor may rewrite an operation (a division by a scalar as a multiplication by
its reciprocal, ``lerp``'s formula), each within one rounding, so results are not bitwise those of
the torch path. Every tensor (parameters and state) is compared relative to its largest entry
(entries near zero differ relative to themselves): within ``ULPS`` machine epsilons of it. Over
the :data:`STEPS` steps here the worst rule stays within 4 (so ``ULPS`` = 16 leaves a 4x margin).
Differences compound over a run: measured over 200 steps of every rule (float32 and float64,
weight decay on), the parameters stay within 2 units in the last place of their magnitude
(2.4e-7 at |theta| ~ 1 in float32, 4.4e-16 in float64), the state within 310 epsilons of its
largest entry (Adamax's exp_avg, float32); Lion is bitwise equal.

Compiles are few: tests set ``CHUNK`` to 2 (fewer loops to compile) and reuse each rule's
compiled step across tests.
"""

from __future__ import annotations

import inspect
import pickle
import warnings
from typing import Any

import pytest
import torch

import torchopt_lab
from torchopt_lab.optim import _cpu_fused
from torchopt_lab.optim.rules import REGISTRY

STEPS = 8
ULPS = 16
# One of each kind: a matrix, a vector, a 0-dim and a 1-element parameter, a complex one (updated
# as a real view, in the same compiled step), and a zero-size one; 6 tensors fill 3 chunks of 2.
SHAPES: list[tuple[tuple[int, ...], torch.dtype]] = [
    ((6, 5), torch.float32),
    ((7,), torch.float32),
    ((), torch.float32),
    ((1,), torch.float32),
    ((3, 2), torch.complex64),
    ((0,), torch.float32),
]


@pytest.fixture(autouse=True)
def _small_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_cpu_fused, "CHUNK", 2)


def _options(cls: type) -> dict[str, Any]:
    """Weight decay where the rule has it, so its branch runs in the compiled update."""
    names = {h.name for h in cls.rule.hyperparameters}
    return {"weight_decay": 0.1} if "weight_decay" in names else {}


def _pair(
    cls: type, shapes: list[tuple[tuple[int, ...], torch.dtype]], **options: Any
) -> tuple[list[torch.Tensor], list[torch.Tensor], Any, Any]:
    generator = torch.Generator().manual_seed(0)
    params = [torch.randn(shape, dtype=dtype, generator=generator) for shape, dtype in shapes]
    fused = [p.clone().requires_grad_() for p in params]
    plain = [p.clone().requires_grad_() for p in params]
    return (
        fused,
        plain,
        cls(fused, **options, fused=True),
        cls(plain, **options),
    )


def _step_both(fused: list, plain: list, fused_opt: Any, plain_opt: Any, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    for a, b in zip(fused, plain, strict=True):
        grad = torch.randn(a.shape, dtype=a.dtype, generator=generator)
        a.grad, b.grad = grad.clone(), grad.clone()
    fused_opt.step()
    plain_opt.step()


def _real(tensor: torch.Tensor) -> torch.Tensor:
    return torch.view_as_real(tensor) if tensor.is_complex() else tensor


def _assert_close_to_scale(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """``max |actual - expected| <= ULPS eps max |expected|`` (see the module docstring)."""
    actual, expected = _real(actual), _real(expected)
    if expected.numel() == 0:
        return
    eps = torch.finfo(expected.dtype).eps
    bound = ULPS * eps * expected.abs().max().item()
    difference = (actual - expected).abs().max().item()
    assert difference <= bound, f"{difference} > {ULPS} eps x {expected.abs().max().item()}"


def _assert_same_run(fused: list, plain: list, fused_opt: Any, plain_opt: Any) -> None:
    for a, b in zip(fused, plain, strict=True):
        _assert_close_to_scale(a.detach(), b.detach())
        for key, value in plain_opt.state[b].items():
            if key == "step":
                assert fused_opt.state[a][key] == value
            else:
                _assert_close_to_scale(fused_opt.state[a][key], value)


# The built-ins (rule.reference set) are excluded here: their fused=True on the CPU still runs
# torch.optim's own fused CPU kernels (torch's dtypes: no complex), not the compiled rule update.
COMPILED = sorted(name for name, cls in REGISTRY.items() if cls.rule.reference is None)


@pytest.mark.parametrize("name", COMPILED)
def test_fused_cpu_step_matches_the_rules_torch_path(name: str) -> None:
    cls = REGISTRY[name]
    fused, plain, fused_opt, plain_opt = _pair(cls, SHAPES, **_options(cls))
    for seed in range(STEPS):
        _step_both(fused, plain, fused_opt, plain_opt, seed)
        _assert_same_run(fused, plain, fused_opt, plain_opt)
    decision = torchopt_lab.backend_info()["decisions"][f"optim.{name} (fused)"]
    assert decision["backend"] == "inductor"
    assert _cpu_fused.compile_count(cls.rule.update) >= 1


def test_compiled_steps_are_called_directly_and_still_follow_dynamos_guards(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Once Dynamo has compiled a variant, calls check its guards and call its graph directly;
    # a scalar the update branches on (Adamax: weight_decay != 0) fails the guard, so Dynamo
    # compiles the other branch rather than the old graph running: results stay the torch path's.
    monkeypatch.setattr(_cpu_fused, "_compiled", {})  # fresh code objects: nothing compiled

    def through_dynamo() -> int:
        return sum(step.dynamo_calls for step in _cpu_fused._compiled.values())

    def set_all(key: str, value: float) -> None:
        for optimizer in (fused_opt, plain_opt):
            optimizer.param_groups[0][key] = value

    cls = REGISTRY["Adamax"]
    fused, plain, fused_opt, plain_opt = _pair(cls, SHAPES)
    _step_both(fused, plain, fused_opt, plain_opt, 0)
    compiled = through_dynamo()
    assert compiled >= 1
    set_all("lr", 0.01)  # a graph input: the same variant, called directly
    for seed in (1, 2):
        _step_both(fused, plain, fused_opt, plain_opt, seed)
        _assert_same_run(fused, plain, fused_opt, plain_opt)
    assert through_dynamo() == compiled
    set_all("weight_decay", 0.1)  # the other branch: Dynamo compiles it
    _step_both(fused, plain, fused_opt, plain_opt, 3)
    _assert_same_run(fused, plain, fused_opt, plain_opt)
    assert through_dynamo() > compiled
    compiled = through_dynamo()
    for weight_decay in (0.1, 0):  # both variants known (0 an int, as given): direct again
        set_all("weight_decay", weight_decay)
        _step_both(fused, plain, fused_opt, plain_opt, 4)
        _assert_same_run(fused, plain, fused_opt, plain_opt)
    assert through_dynamo() == compiled
    assert all(step.why_not_direct is None for step in _cpu_fused._compiled.values())
    decision = torchopt_lab.backend_info()["decisions"]["optim.Adamax (fused)"]
    assert "called directly once compiled" in decision["reason"]


def _scaled(param: torch.Tensor, grad: torch.Tensor, *, factor: float) -> tuple[torch.Tensor]:
    return (param * factor,)


def _halved_or_scaled(
    param: torch.Tensor, grad: torch.Tensor, *, factor: float, halve: bool
) -> tuple[torch.Tensor]:
    return (param * 0.5 if halve else param * factor,)


class _CountingGuard:
    def __init__(self, guard: Any, failed: list[int]) -> None:
        self.guard, self.failed = guard, failed

    def check(self, arguments: dict[str, Any]) -> bool:
        passed = self.guard.check(arguments)
        self.failed[0] += not passed
        return passed


def test_the_variant_used_last_is_checked_first(monkeypatch: pytest.MonkeyPatch) -> None:
    # Two compiled variants (a branch on `halve`): a step's chunks all run one of them, so only
    # its first call may try the other first (a failed check costs a whole guard check).
    monkeypatch.setattr(_cpu_fused, "_compiled", {})
    params = [torch.ones(3) for _ in range(6)]  # 3 chunks of 2
    grads = [torch.zeros(3) for _ in params]
    plans: dict = {}

    def step(halve: bool) -> None:
        scalars = {"factor": 1.0, "halve": halve}
        update = _halved_or_scaled
        assert (
            _cpu_fused.fused_update("test", update, params, grads, [], scalars, False, plans) == []
        )

    step(True)
    step(False)  # both variants compiled: the False one was used last
    (chunk_step,) = _cpu_fused._compiled.values()
    failed = [0]
    chunk_step.direct = [(_CountingGuard(g, failed), graph) for g, graph in chunk_step.direct]
    step(True)
    assert failed[0] == 1  # the first chunk only; the other two find the True variant first
    assert all(torch.equal(p, torch.full((3,), 0.25)) for p in params)


def test_members_share_a_compiled_call_only_with_the_same_scalars_signed_zeros_included() -> None:
    # 0.0 == -0.0, but param * -0.0 is -0: a member is never run with another's scalars that
    # merely compare equal (the key is the one the torch path batches by, _scalars.scalars_key).
    params = [torch.ones(3), torch.ones(3)]
    grads = [torch.zeros(3), torch.zeros(3)]
    scalars = [{"factor": 0.0}, {"factor": -0.0}]
    assert _cpu_fused.fused_update("test", _scaled, params, grads, [], scalars, False) == []
    assert not torch.signbit(params[0]).any() and torch.signbit(params[1]).all()


def test_direct_call_turns_itself_off_when_its_machinery_fails(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A guard manager that cannot read the chunk's locals (another torch's API): calls go
    # through Dynamo from then on, the step stays right, and backend_info says why.
    monkeypatch.setattr(_cpu_fused, "_compiled", {})
    cls = REGISTRY["Adamax"]
    fused, plain, fused_opt, plain_opt = _pair(cls, SHAPES)
    _step_both(fused, plain, fused_opt, plain_opt, 0)

    class Unreadable:
        def check(self, arguments: dict[str, Any]) -> bool:
            raise TypeError("locals read otherwise")

    steps = list(_cpu_fused._compiled.values())
    for step in steps:
        step.direct = [(Unreadable(), graph) for _, graph in step.direct]
    for seed in (1, 2):
        _step_both(fused, plain, fused_opt, plain_opt, seed)
        _assert_same_run(fused, plain, fused_opt, plain_opt)
    assert all(step.off and step.direct == [] for step in steps)
    assert all("locals read otherwise" in step.why_not_direct for step in steps)
    reason = torchopt_lab.backend_info()["decisions"]["optim.Adamax (fused)"]["reason"]
    assert "called through Dynamo" in reason and "locals read otherwise" in reason


@pytest.mark.parametrize(
    "source",
    [
        "L['params'][0].stride()[0]",  # not an argument the direct call reads
        "G['torch'].pi",
        "L['params'][0]; import os",
    ],
)
def test_direct_call_refuses_a_graph_argument_it_does_not_know(source: str) -> None:
    # Such a variant is called through Dynamo (the reason is recorded), never with a guess.
    assert _cpu_fused._argument_builder([("L['params'][0]", False), (source, False)]) is None
    assert _cpu_fused._argument_builder([("L['scalars']['lr']", True)]) is not None


def test_fused_cpu_step_compiles_once_whatever_the_sizes_and_number_of_tensors(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Tensors from 100 elements take the parallel compiled step here: both kinds run and compile
    # once each (the default threshold, 32768 elements, would need larger tensors).
    monkeypatch.setattr(_cpu_fused, "PARALLEL_NUMEL", 100)
    cls = REGISTRY["Lion"]
    options = {**_options(cls), "maximize": True}
    fused, plain, fused_opt, plain_opt = _pair(cls, SHAPES[:3], **options)
    fused.append(torch.randn(128, requires_grad=True))
    plain.append(fused[-1].detach().clone().requires_grad_())
    fused_opt.add_param_group({"params": [fused[-1]]})
    plain_opt.add_param_group({"params": [plain[-1]]})
    _step_both(fused, plain, fused_opt, plain_opt, 0)
    compiled = _cpu_fused.compile_count(cls.rule.update)
    assert {parallel for _, parallel in _cpu_fused._compiled} >= {False, True}
    # Other sizes, another number of tensors, another optimizer: no new compile.
    shapes = [((11, 3), torch.float32), ((1,), torch.float32), ((4096,), torch.float32)] * 3
    fused, plain, fused_opt, plain_opt = _pair(cls, shapes, **options)
    for seed in range(3):
        _step_both(fused, plain, fused_opt, plain_opt, seed)
    _assert_same_run(fused, plain, fused_opt, plain_opt)
    assert _cpu_fused.compile_count(cls.rule.update) == compiled


# Every registered optimizer: all take fused (RMSprop and the rule optimizers whose torch.optim
# counterparts have none as an extension, an attribute; tests/optim/test_signatures.py).
TAKE_FUSED = sorted(
    name for name, cls in REGISTRY.items() if "fused" in inspect.signature(cls).parameters
)


@pytest.mark.parametrize("name", TAKE_FUSED)
@pytest.mark.parametrize(
    ("flag", "message"),
    [
        ("differentiable", "`fused` does not support `differentiable`"),
        ("foreach", "`fused` and `foreach` cannot be `True` together."),
    ],
)
def test_fused_with_differentiable_or_foreach_raises_as_torch(
    name: str, flag: str, message: str
) -> None:
    with pytest.raises(RuntimeError, match=message):
        REGISTRY[name]([torch.zeros(2, requires_grad=True)], fused=True, **{flag: True})
    # torch.optim.Adam, whose fused flag ours mirror, refuses the same way.
    with pytest.raises(RuntimeError, match=message):
        torch.optim.Adam([torch.zeros(2, requires_grad=True)], fused=True, **{flag: True})


def test_fused_keeps_through_pickle() -> None:
    optimizer = REGISTRY["Lion"]([torch.zeros(2, requires_grad=True)], fused=True)
    assert pickle.loads(pickle.dumps(optimizer)).fused is True


def test_fused_cpu_step_falls_back_to_the_torch_update_when_inductor_fails_and_says_so(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def no_compiler(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("no C++ compiler found")

    # Inductor itself fails, under Dynamo, for a rule compiled afresh.
    monkeypatch.setattr("torch._inductor.compile_fx.compile_fx", no_compiler)
    monkeypatch.setattr(_cpu_fused, "_compiled", {})
    monkeypatch.setattr(_cpu_fused, "_failed", {})
    cls = REGISTRY["Adamax"]
    fused, plain, fused_opt, plain_opt = _pair(cls, SHAPES, **_options(cls))
    with pytest.warns(UserWarning, match="no C\\+\\+ compiler found"):
        _step_both(fused, plain, fused_opt, plain_opt, 0)
    for a, b in zip(fused, plain, strict=True):  # the torch update itself: bitwise
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    decision = torchopt_lab.backend_info()["decisions"]["optim.Adamax (fused)"]
    assert decision["backend"] == "torch"
    assert "no C++ compiler found" in decision["reason"]
    with warnings.catch_warnings():  # warned once; later steps keep the record
        warnings.simplefilter("error")
        _step_both(fused, plain, fused_opt, plain_opt, 1)
    assert (
        "no C++ compiler found"
        in torchopt_lab.backend_info()["decisions"]["optim.Adamax (fused)"]["reason"]
    )


def test_fused_cpu_step_updates_non_contiguous_tensors_with_the_torch_update_recorded() -> None:
    cls = REGISTRY["Lion"]
    generator = torch.Generator().manual_seed(0)
    base = torch.randn(6, 4, generator=generator)
    fused = [base.clone().t().requires_grad_()]
    plain = [base.clone().t().requires_grad_()]
    fused_opt, plain_opt = cls(fused, fused=True), cls(plain)
    _step_both(fused, plain, fused_opt, plain_opt, 0)
    torch.testing.assert_close(fused[0], plain[0], rtol=0, atol=0)
    decision = torchopt_lab.backend_info()["decisions"]["optim.Lion (fused)"]
    assert decision["backend"] == "torch"
    assert "not contiguous" in decision["reason"]


def test_fused_on_a_non_cpu_device_with_the_torch_backend_raises() -> None:
    # On CUDA the fused path is the Triton rule kernel; backend='torch' asks for none. The meta
    # device stands in for CUDA here (no GPU needed): the refusal is the same for any non-CPU one.
    param = torch.zeros(3, device="meta", requires_grad=True)
    param.grad = torch.zeros(3, device="meta")
    optimizer = REGISTRY["Lion"]([param], fused=True, backend="torch")
    with pytest.raises(RuntimeError, match=r"fused=True on meta tensors .*backend='torch'"):
        optimizer.step()


def test_fused_with_the_triton_backend_runs_the_triton_rule_kernel() -> None:
    # Under the interpreter (TRITON_INTERPRET=1, as CI runs) backend='triton' runs the fused
    # Triton rule kernel on CPU tensors: that is the fused path, and nothing is compiled.
    cls = REGISTRY["Lion"]
    param = torch.randn(5, requires_grad=True)
    param.grad = torch.randn(5)
    REGISTRY["Lion"]([param], fused=True, backend="triton").step()
    decisions = torchopt_lab.backend_info()["decisions"]
    assert decisions["optim.Lion"]["backend"] == "triton"
    assert cls.rule.triton_update is not None


def test_fused_step_inside_torch_compile_matches_the_torch_path() -> None:
    # A compiled step traces the rule's torch update (the compiler fuses it); Dynamo's "eager"
    # backend keeps the test fast and checks the trace, not Inductor.
    cls = REGISTRY["Lion"]
    fused, plain, fused_opt, plain_opt = _pair(cls, SHAPES[:2])
    step = torch.compile(fused_opt.step, backend="eager", fullgraph=False)
    for seed in range(2):
        generator = torch.Generator().manual_seed(seed)
        for a, b in zip(fused, plain, strict=True):
            grad = torch.randn(a.shape, dtype=a.dtype, generator=generator)
            a.grad, b.grad = grad.clone(), grad.clone()
        step()
        plain_opt.step()
    for a, b in zip(fused, plain, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize(
    ("options", "named"),
    [
        ({"max_grad_norm": 0.5}, "max_grad_norm"),
        ({"record_norms": True}, "record_norms"),
        ({"max_grad_norm": 0.5, "float32_state": True}, "max_grad_norm, float32_state"),
    ],
)
def test_fused_with_an_engine_option_runs_the_torch_update_and_says_so(
    options: dict[str, Any], named: str
) -> None:
    """The compiled update takes the gradient as it is: clipping, float32 state and norm records
    take the rule's torch update, bit for bit, recorded (never a silent unclipped step)."""
    cls = REGISTRY["NAdam"]
    fused, plain, fused_opt, plain_opt = _pair(cls, SHAPES[:2], **options)
    for seed in range(3):
        _step_both(fused, plain, fused_opt, plain_opt, seed)
    for a, b in zip(fused, plain, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    decision = torchopt_lab.backend_info()["decisions"]["optim.NAdam (fused)"]
    assert decision["backend"] == "torch"
    assert f"does not take {named}" in decision["reason"]


@pytest.mark.parametrize(
    "tensor",
    [
        torch.zeros(4, dtype=torch.complex64),  # 1-D: its real view, never itself
        torch.zeros(4, requires_grad=True),  # a parameter: detached
        torch.zeros(3, 2).view(-1),  # a view: without a _base
        torch.zeros(3, 2),
    ],
)
def test_flat_gives_a_real_1d_detached_tensor_without_a_base(tensor: torch.Tensor) -> None:
    flat = _cpu_fused._flat(tensor)
    assert flat.ndim == 1 and not flat.is_complex() and not flat.requires_grad
    assert flat._base is None and flat.data_ptr() == tensor.data_ptr()


def _restride(tensor: torch.Tensor) -> None:
    with torch.no_grad():
        tensor.set_(tensor.untyped_storage(), 0, tensor.shape, tuple(reversed(tensor.stride())))


def test_plans_keep_flat_views_across_steps_but_never_past_a_change_of_memory() -> None:
    # A plan makes the flat views of parameters and state once (views cost a third of the host
    # time per parameter) and is rebuilt when a tensor is another object or has moved, been
    # resized or been restrided: p.data = ..., set_, resize_, a new state tensor.
    params = [torch.zeros(3, 2, requires_grad=True), torch.zeros(2, 2, requires_grad=True)]
    states = [[torch.zeros(3, 2), torch.zeros(2, 2)]]
    plan = _cpu_fused._Plan([*params, *states[0]], 2, (False,))
    assert plan.fits([*params, *states[0]])
    assert plan.flats[0].data_ptr() == params[0].data_ptr() and plan.flats[0].shape == (6,)
    changes = [
        lambda: setattr(params[0], "data", torch.ones(3, 2)),  # moved
        lambda: setattr(params[0], "data", params[0].data.view(-1)[:2]),  # same address, fewer
        lambda: _restride(params[1]),  # the same address and shape, transposed strides
        lambda: states[0].__setitem__(1, torch.zeros(2, 2)),  # another object
    ]
    for change in changes:
        plan = _cpu_fused._Plan([*params, *states[0]], 2, (False,))
        change()
        assert not plan.fits([*params, *states[0]])
    assert plan.left == [1]  # params[1] is not contiguous now: the torch update takes it


def test_a_plan_rebuilt_for_a_moved_parameter_updates_its_new_memory() -> None:
    # The plan of a list is kept in the dict the caller passes: the second step reuses it, a
    # parameter moved by p.data = ... makes a new one, and the update lands in the new memory.
    params = [torch.ones(4), torch.ones(3, 2)]
    grads = [torch.zeros(4), torch.zeros(3, 2)]
    plans: dict = {}
    for factor in (2.0, 3.0):
        assert (
            _cpu_fused.fused_update(
                "test", _scaled, params, grads, [], {"factor": factor}, False, plans
            )
            == []
        )
    (plan,) = plans.values()
    assert torch.equal(params[1], torch.full((3, 2), 6.0))
    params[1].data = torch.ones(3, 2)
    assert (
        _cpu_fused.fused_update("test", _scaled, params, grads, [], {"factor": 5.0}, False, plans)
        == []
    )
    assert next(iter(plans.values())) is not plan
    assert torch.equal(params[1], torch.full((3, 2), 5.0)) and torch.equal(
        params[0], torch.full((4,), 30.0)
    )


def test_fused_cpu_step_follows_a_parameter_whose_data_is_replaced() -> None:
    # p.data = ... between steps (weight tying, loading weights in place of the tensor): the
    # compiled step updates the new memory, as the torch path does.
    cls = REGISTRY["Adamax"]
    fused, plain, fused_opt, plain_opt = _pair(cls, SHAPES, **_options(cls))
    _step_both(fused, plain, fused_opt, plain_opt, 0)
    for a, b in zip(fused, plain, strict=True):
        fresh = torch.randn(a.shape, dtype=a.dtype, generator=torch.Generator().manual_seed(7))
        a.data, b.data = fresh.clone(), fresh.clone()
    for seed in (1, 2):
        _step_both(fused, plain, fused_opt, plain_opt, seed)
        _assert_same_run(fused, plain, fused_opt, plain_opt)


# The built-ins (rule.reference set) as their rules are registered: fused=True on CPU tensors runs
# torch.optim's fused kernel where torch has one (_cpu_fused.TORCH_KERNELS), else, or with that
# switch off, their rule's update compiled like every other rule's. No complex tensors here:
# torch's fused=True refuses them, and ours with it.
BUILTINS = sorted(name for name in TAKE_FUSED if REGISTRY[name].rule.reference is not None)
BUILTIN_OPTIONS: list[dict[str, Any]] = [
    {"weight_decay": 0.1},
    {"weight_decay": 0.1, "maximize": True, "amsgrad": True, "momentum": 0.9, "nesterov": True},
]


def _builtin_options(cls: type, options: dict[str, Any]) -> dict[str, Any]:
    names = {h.name for h in cls.rule.hyperparameters}
    return {key: value for key, value in options.items() if key in names}


def _assert_same_builtin_run(fused: list, plain: list, fused_opt: Any, plain_opt: Any) -> None:
    """Parameters within ``ULPS`` eps of their largest entry; each state within ``ULPS`` eps of
    its largest entry over all parameters: the built-ins' reference is torch's foreach update,
    whose ``g + lambda theta`` and ``lerp`` round apart from Inductor's (contracted) ones by about
    an eps of their inputs' scale, which a 1-element state that cancels to 1e-3 of that scale
    (Adam's ``exp_avg`` under ``maximize``, measured) shows as 30 eps of itself."""
    scales: dict[str, float] = {}
    for b in plain:
        for key, value in plain_opt.state[b].items():
            if key != "step" and value.numel():
                scales[key] = max(scales.get(key, 0.0), value.abs().max().item())
    for a, b in zip(fused, plain, strict=True):
        _assert_close_to_scale(a.detach(), b.detach())
        for key, value in plain_opt.state[b].items():
            if key == "step":
                assert fused_opt.state[a][key] == value
            elif value.numel():
                bound = ULPS * torch.finfo(value.dtype).eps * scales[key]
                assert (fused_opt.state[a][key] - value).abs().max().item() <= bound, key


@pytest.mark.parametrize("options", BUILTIN_OPTIONS, ids=["weight_decay", "every_branch"])
@pytest.mark.parametrize("name", BUILTINS)
def test_builtin_fused_cpu_step_compiled_matches_its_torch_path(
    name: str, options: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_cpu_fused, "TORCH_KERNELS", False)
    cls = REGISTRY[name]
    real = [shape for shape in SHAPES if not shape[1].is_complex]
    fused, plain, fused_opt, plain_opt = _pair(cls, real, **_builtin_options(cls, options))
    for seed in range(STEPS):
        _step_both(fused, plain, fused_opt, plain_opt, seed)
        _assert_same_builtin_run(fused, plain, fused_opt, plain_opt)
    decision = torchopt_lab.backend_info()["decisions"][f"optim.{name} (fused)"]
    assert decision["backend"] == "inductor", decision
    assert _cpu_fused.compile_count(cls.rule.update) >= 1


@pytest.mark.parametrize("parallel_numel", [32768, 1], ids=["serial", "parallel"])
@pytest.mark.parametrize("name", ["Adam", "Adagrad"])
@pytest.mark.parametrize("count_dtype", [torch.float32, torch.float64])
def test_builtin_fused_cpu_step_counts_each_parameters_own_steps(
    name: str, parallel_numel: int, count_dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Parameters skipped on some steps (no gradient) stand at other counts: each is updated with
    # the scalars of its own count and its count is incremented (in the compiled call for
    # serial chunks of float32 counts, on the host otherwise), as on the torch path; a chunk never
    # mixes counts. torch.optim's counts are float64 under a float64 default dtype: a compiled
    # call's add to a float64 0-dim input is dropped by Dynamo, and they stayed at 0.
    monkeypatch.setattr(_cpu_fused, "TORCH_KERNELS", False)
    monkeypatch.setattr(_cpu_fused, "PARALLEL_NUMEL", parallel_numel)
    cls = REGISTRY[name]
    real = [shape for shape in SHAPES if not shape[1].is_complex]
    default = torch.get_default_dtype()
    torch.set_default_dtype(count_dtype)
    try:
        fused, plain, fused_opt, plain_opt = _pair(cls, real, weight_decay=0.1)
        _step_both(fused, plain, fused_opt, plain_opt, 0)  # the counts are made on a first step
    finally:
        torch.set_default_dtype(default)
    assert {fused_opt.state[p]["step"].dtype for p in fused} == {count_dtype}
    for seed in range(1, 5):
        _step_both(fused, plain, fused_opt, plain_opt, seed)
        if seed % 2:  # the next step leaves out every other parameter
            for a, b in list(zip(fused, plain, strict=True))[::2]:
                a.grad = b.grad = None
            fused_opt.step()
            plain_opt.step()
        _assert_same_builtin_run(fused, plain, fused_opt, plain_opt)
    counts = {fused_opt.state[p]["step"].item() for p in fused}
    assert counts == {5.0, 7.0}
    assert (
        torchopt_lab.backend_info()["decisions"][f"optim.{name} (fused)"]["backend"] == "inductor"
    )


@pytest.mark.parametrize("name", BUILTINS)
def test_builtin_fused_cpu_step_runs_torchs_kernel_where_torch_has_one(name: str) -> None:
    cls = REGISTRY[name]
    assert _cpu_fused.TORCH_KERNELS  # the default
    param = torch.randn(5, requires_grad=True)
    param.grad = torch.randn(5)
    cls([param], fused=True).step()
    decision = torchopt_lab.backend_info()["decisions"][f"optim.{name} (fused)"]
    torch_has_one = cls._reference.__name__ in _cpu_fused._TORCH_FUSED_CPU
    assert decision["backend"] == ("torch" if torch_has_one else "inductor"), decision


# RMSprop takes fused as an extension (torch.optim.RMSprop has none): an attribute, as the rule
# optimizers keep it, running its declaration's update compiled on CPU tensors.
@pytest.mark.parametrize("maximize", [False, True], ids=["min", "maximize"])
@pytest.mark.parametrize("weight_decay", [0, 0.1], ids=["no_wd", "wd"])
@pytest.mark.parametrize("momentum", [0, 0.9], ids=["no_momentum", "momentum"])
@pytest.mark.parametrize("centered", [False, True], ids=["plain", "centered"])
def test_rmsprop_fused_cpu_step_is_its_compiled_update_and_matches_fused_none(
    centered: bool, momentum: float, weight_decay: float, maximize: bool
) -> None:
    cls = REGISTRY["RMSprop"]
    options = {
        "centered": centered,
        "momentum": momentum,
        "weight_decay": weight_decay,
        "maximize": maximize,
    }
    real = [shape for shape in SHAPES if not shape[1].is_complex]
    fused, plain, fused_opt, plain_opt = _pair(cls, real, **options)
    assert fused_opt.fused is True and plain_opt.fused is None
    for seed in range(STEPS):
        _step_both(fused, plain, fused_opt, plain_opt, seed)
        _assert_same_builtin_run(fused, plain, fused_opt, plain_opt)
    decision = torchopt_lab.backend_info()["decisions"]["optim.RMSprop (fused)"]
    assert decision["backend"] == "inductor", decision
    assert _cpu_fused.compile_count(cls.rule.update) >= 1


@pytest.mark.parametrize(
    "options",
    [{"max_grad_norm": 0.5}, {"record_norms": True}, {"max_grad_norm": 0.5, "float32_state": True}],
    ids=["max_grad_norm", "record_norms", "float32_state"],
)
def test_rmsprop_fused_with_an_engine_option_stays_compiled_and_matches_fused_none(
    options: dict[str, Any],
) -> None:
    """Unlike a rule optimizer's, the built-in engine hands the compiled update gradients already
    clipped (and float32 copies, norms recorded around it): nothing falls back to the torch
    update, and the run matches fused=None within the built-ins' bound."""
    cls = REGISTRY["RMSprop"]
    dtype = torch.bfloat16 if options.get("float32_state") else torch.float32
    shapes = [((6, 5), dtype), ((7,), dtype)]
    fused, plain, fused_opt, plain_opt = _pair(cls, shapes, centered=True, **options)
    torchopt_lab.backend_info()["decisions"].pop("optim.RMSprop (fused)", None)
    for seed in range(3):
        _step_both(fused, plain, fused_opt, plain_opt, seed)
    for a, b in zip(fused, plain, strict=True):
        _assert_close_to_scale(a.detach().float(), b.detach().float())
    decision = torchopt_lab.backend_info()["decisions"]["optim.RMSprop (fused)"]
    assert decision["backend"] == "inductor", decision
    if options.get("record_norms"):
        ours, theirs = fused_opt.norm_diagnostics(), plain_opt.norm_diagnostics()
        assert len(ours) == len(theirs) == len(fused)
        for a, b in zip(fused, plain, strict=True):
            _assert_close_to_scale(ours[a], theirs[b])


@pytest.mark.parametrize(
    ("flag", "message"),
    [
        ("differentiable", "`fused` does not support `differentiable`"),
        ("foreach", "`fused` and `foreach` cannot be `True` together."),
    ],
)
def test_rmsprop_fused_with_differentiable_or_foreach_raises_as_the_rule_optimizers(
    flag: str, message: str
) -> None:
    for name in ("RMSprop", "NAdam"):
        with pytest.raises(RuntimeError, match=f"^{message}$"):
            REGISTRY[name]([torch.zeros(2, requires_grad=True)], fused=True, **{flag: True})


def test_rmsprop_fused_on_a_non_cpu_device_with_the_torch_backend_raises() -> None:
    # The meta device stands in for CUDA (see the Lion test above): no fused torch update there.
    param = torch.zeros(3, device="meta", requires_grad=True)
    param.grad = torch.zeros(3, device="meta")
    optimizer = REGISTRY["RMSprop"]([param], fused=True, backend="torch")
    with pytest.raises(RuntimeError, match=r"fused=True .* torch reference path runs for meta"):
        optimizer.step()


def test_rmsprop_fused_keeps_torchs_state_dict_keys() -> None:
    params = [torch.randn(4, requires_grad=True) for _ in range(2)]
    theirs_params = [p.detach().clone().requires_grad_() for p in params]
    options = {"momentum": 0.9, "centered": True}
    ours = REGISTRY["RMSprop"](params, **options, fused=True)
    theirs = torch.optim.RMSprop(theirs_params, **options)
    for p, q in zip(params, theirs_params, strict=True):
        p.grad = torch.ones(4)
        q.grad = torch.ones(4)
    ours.step()
    theirs.step()
    our_dict, their_dict = ours.state_dict(), theirs.state_dict()
    assert [g.keys() for g in our_dict["param_groups"]] == [
        g.keys() for g in their_dict["param_groups"]
    ]
    assert "fused" not in ours.defaults
    assert [s.keys() for s in our_dict["state"].values()] == [
        s.keys() for s in their_dict["state"].values()
    ]
    theirs.load_state_dict(our_dict)  # interchangeable with torch's


def test_rmsprop_fused_keeps_through_pickle_and_old_pickles_default_to_none() -> None:
    optimizer = REGISTRY["RMSprop"]([torch.zeros(2, requires_grad=True)], fused=True)
    assert pickle.loads(pickle.dumps(optimizer)).fused is True
    old = optimizer.__getstate__()
    del old["fused"]  # pickled before RMSprop took fused
    restored = REGISTRY["RMSprop"].__new__(REGISTRY["RMSprop"])
    restored.__setstate__(old)
    assert restored.fused is None


def test_rmsprop_fused_hands_gradscaler_its_scale_and_matches_fused_none() -> None:
    # As torch.optim's fused=True, ours takes grad_scale/found_inf from GradScaler (the torch path
    # unscales before the compiled update); an inf step is skipped, as GradScaler's own unscale.
    results = []
    for fused in (True, None):
        param = torch.nn.Parameter(torch.linspace(-1, 1, 5))
        optimizer = REGISTRY["RMSprop"]([param], fused=fused, momentum=0.9, centered=True)
        assert optimizer._step_supports_amp_scaling is bool(fused)
        scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
        for step in range(3):
            weights = torch.arange(5.0) if step != 1 else torch.full((5,), float("inf"))
            scaler.scale((param * weights).sum()).backward()
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad()
        results.append(param.detach())
    _assert_close_to_scale(results[0], results[1])


def test_wrapper_subclass_parameters_take_the_torch_update_and_plain_subclasses_do_not() -> None:
    # A wrapper subclass (DTensor's kind; TwoTensor here) holds no memory of its own for the
    # compiled loops: its members are returned to the torch update, with the reason recorded. A
    # plain subclass of Parameter has its memory and is updated.
    from torch.testing._internal.two_tensor import TwoTensor

    class Tagged(torch.nn.Parameter):
        pass

    wrapped = [TwoTensor(torch.ones(3), torch.ones(3))]
    grads = [TwoTensor(torch.zeros(3), torch.zeros(3))]
    left = _cpu_fused.fused_update(
        "test.wrapped", _scaled, wrapped, grads, [], {"factor": 2.0}, False
    )
    assert left == [0] and torch.equal(wrapped[0].a, torch.ones(3))
    decision = torchopt_lab.backend_info()["decisions"]["test.wrapped"]
    assert decision["backend"] == "torch" and "subclass" in decision["reason"]
    tagged = [Tagged(torch.ones(3))]
    with torch.no_grad():
        left = _cpu_fused.fused_update(
            "test.tagged", _scaled, tagged, [torch.zeros(3)], [], {"factor": 2.0}, False
        )
    assert left == [] and torch.equal(tagged[0].detach(), torch.full((3,), 2.0))


# --- the memo: a chunk called again skips Dynamo's guards (_cpu_fused._Memo) ------------------


class _Guards:
    """Counts the calls that check a compiled variant's guards (or go through Dynamo): every call
    of a chunk step the memo did not run."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.checks = 0
        call = _cpu_fused._ChunkStep.__call__

        def counted(step: Any, arguments: dict[str, Any], tensors: dict[str, Any]) -> Any:
            self.checks += 1
            return call(step, arguments, tensors)

        monkeypatch.setattr(_cpu_fused._ChunkStep, "__call__", counted)


def test_a_chunk_called_again_skips_the_guards_and_runs_what_they_would_have_run(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The same steps with the memo on and off: bitwise the same (the same compiled loops), the
    # torch path's to the stated tolerance, and with the memo on, no guard check after the first
    # step (every chunk unchanged but its gradients' values and the step's scalars).
    monkeypatch.setattr(_cpu_fused, "TORCH_KERNELS", False)
    monkeypatch.setattr(_cpu_fused, "PARALLEL_NUMEL", 20)  # the matrix in a parallel chunk
    cls = REGISTRY["Adam"]
    real = [shape for shape in SHAPES if not shape[1].is_complex]
    fused, plain, fused_opt, plain_opt = _pair(cls, real, weight_decay=0.1)
    unmemoised = [p.detach().clone().requires_grad_() for p in fused]
    unmemoised_opt = cls(unmemoised, weight_decay=0.1, fused=True)
    guards = _Guards(monkeypatch)
    for seed in range(STEPS):
        _step_both(fused, plain, fused_opt, plain_opt, seed)
        for a, b in zip(fused, unmemoised, strict=True):
            b.grad = a.grad.clone()
        monkeypatch.setattr(_cpu_fused, "MEMO", False)
        unmemoised_opt.step()
        monkeypatch.setattr(_cpu_fused, "MEMO", True)
        _assert_same_builtin_run(fused, plain, fused_opt, plain_opt)
        for a, b in zip(fused, unmemoised, strict=True):
            assert torch.equal(a, b)
            for key, value in fused_opt.state[a].items():
                assert torch.equal(value, unmemoised_opt.state[b][key]), key
        if seed == 0:
            checks = guards.checks
    assert guards.checks > checks  # the unmemoised optimizer's calls check guards
    memoised = guards.checks
    for seed in range(2):
        _step_both(fused, plain, fused_opt, plain_opt, STEPS + seed)
    assert guards.checks == memoised  # the memoised one's do not


def _adam_pair(**options: Any) -> tuple[list, list, Any, Any]:
    real = [shape for shape in SHAPES if not shape[1].is_complex]
    return _pair(REGISTRY["Adam"], real, **options)


def _replace_steps(fused_opt: Any, plain_opt: Any) -> None:
    # New step tensors (the compiled serial loops count them in place): the memo checks the
    # tensors it was made with are the ones given.
    for optimizer in (fused_opt, plain_opt):
        for state in optimizer.state.values():
            state["step"] = torch.tensor(state["step"].item() + 5)


@pytest.mark.parametrize(
    "change",
    [
        # beta1: a float the compiled loops hold as a constant (Dynamo specialised on it).
        lambda fused, plain, fo, po: [
            o.param_groups[0].update(betas=(0.8, 0.99)) for o in (fo, po)
        ],
        # weight_decay: an int 0 the update branches on, then a float.
        lambda fused, plain, fo, po: [o.param_groups[0].update(weight_decay=0.3) for o in (fo, po)],
        lambda fused, plain, fo, po: _replace_steps(fo, po),
    ],
    ids=["specialised_float", "branch", "step_tensors"],
)
def test_the_memo_sends_a_chunk_through_the_guards_when_anything_they_check_changed(
    change: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Each change fails the memoised variant's guards: the result is the torch path's, which a
    # call of the memoised variant (the old constant, branch, count dtype or memory) is not.
    monkeypatch.setattr(_cpu_fused, "TORCH_KERNELS", False)
    fused, plain, fused_opt, plain_opt = _adam_pair(weight_decay=0)
    for seed in range(3):
        _step_both(fused, plain, fused_opt, plain_opt, seed)
    guards = _Guards(monkeypatch)
    generator = torch.Generator().manual_seed(7)
    for a, b in zip(fused, plain, strict=True):
        grad = torch.randn(a.shape, dtype=a.dtype, generator=generator)
        a.grad, b.grad = grad.clone(), grad.clone()
    change(fused, plain, fused_opt, plain_opt)
    fused_opt.step()
    plain_opt.step()
    assert guards.checks > 0
    _assert_same_builtin_run(fused, plain, fused_opt, plain_opt)


def test_the_memo_sees_the_global_state_dynamos_guards_check() -> None:
    class Passthrough(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    outside = _cpu_fused._ambient()
    with Passthrough():
        assert _cpu_fused._ambient() != outside
    with torch.no_grad():
        assert _cpu_fused._ambient() != outside
    with torch.autocast("cpu"):
        assert _cpu_fused._ambient() != outside
    assert _cpu_fused._ambient() == outside


_OFFSET = 1.0


def _offset(param: torch.Tensor, grad: torch.Tensor, *, factor: float) -> tuple[torch.Tensor]:
    return (param * factor + _OFFSET,)  # reads a global: only Dynamo's guards follow it


def test_a_users_update_is_never_memoised_so_the_globals_it_reads_are_followed() -> None:
    # A rule of one's own may read a global that changes between steps: Dynamo's guards see the
    # change (and compile again), a memo would run the old constant. Updates of this package only
    # read modules and functions (_cpu_fused._own).
    params = [torch.zeros(3) for _ in range(4)]
    grads = [torch.zeros(3) for _ in params]
    plans: dict = {}

    def step() -> None:
        assert (
            _cpu_fused.fused_update("t", _offset, params, grads, [], {"factor": 1.0}, False, plans)
            == []
        )

    step()
    step()
    globals()["_OFFSET"] = 10.0
    try:
        step()
    finally:
        globals()["_OFFSET"] = 1.0
    assert all(torch.equal(p, torch.full((3,), 12.0)) for p in params)
    assert not any(plan.memos for plan in plans.values())


@pytest.mark.parametrize("name", ["NAdam", "Adam"])
def test_a_gradient_with_the_negative_bit_is_read_as_its_value(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # torch._neg_view(-g) is g, held as -g in memory with the negative bit set: the compiled
    # loops read memory, so the gradient is resolved first (it ran the update with -g before).
    monkeypatch.setattr(_cpu_fused, "TORCH_KERNELS", False)
    cls = REGISTRY[name]
    real = [shape for shape in SHAPES if not shape[1].is_complex]
    fused, plain, fused_opt, plain_opt = _pair(cls, real)
    for seed in range(3):
        generator = torch.Generator().manual_seed(seed)
        for a, b in zip(fused, plain, strict=True):
            grad = torch.randn(a.shape, dtype=a.dtype, generator=generator)
            a.grad, b.grad = torch._neg_view(grad.neg()), grad
        fused_opt.step()
        plain_opt.step()
        _assert_same_builtin_run(fused, plain, fused_opt, plain_opt)


def test_a_memoised_call_that_fails_goes_through_the_guards_from_then_on(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The raw call's own machinery failing (as a gradient whose memory cannot be read fails it,
    # before the loops run): that call and every later one check the guards, results unchanged.
    monkeypatch.setattr(_cpu_fused, "TORCH_KERNELS", False)
    fused, plain, fused_opt, plain_opt = _adam_pair(weight_decay=0.1)
    for seed in range(2):
        _step_both(fused, plain, fused_opt, plain_opt, seed)
    plans = fused_opt.__dict__["_cpu_fused_plans"]
    memos = [memo for plan in plans.values() for memo in plan.memos.values()]
    assert memos

    def unreadable(args: list) -> None:
        raise RuntimeError("cannot access data pointer")

    for memo in memos:
        monkeypatch.setattr(memo.graph, "raw", (unreadable, memo.graph.raw[1]))
    guards = _Guards(monkeypatch)
    for seed in range(2, 4):
        _step_both(fused, plain, fused_opt, plain_opt, seed)
        _assert_same_builtin_run(fused, plain, fused_opt, plain_opt)
    assert guards.checks >= 2 * len(memos)
    assert all(memo.graph.raw is None for memo in memos)


def test_the_memos_scalar_shape_keeps_what_guards_read_and_refuses_what_it_cannot_compare() -> None:
    shape = _cpu_fused._scalar_shape
    floats = frozenset({"lr"})
    # A float the variant takes as a tensor: only whether it is NaN.
    assert shape({"lr": 0.1}, floats) == shape({"lr": 0.2}, floats)
    assert shape({"lr": 0.1}, floats) != shape({"lr": float("nan")}, floats)
    # A float held as a constant (specialised): its value, signed zeros apart, ints apart.
    assert shape({"beta": 0.9}, floats) != shape({"beta": 0.8}, floats)
    assert shape({"beta": 0.0}, floats) != shape({"beta": -0.0}, floats)
    assert shape({"beta": 0}, floats) != shape({"beta": 0.0}, floats)
    assert shape({"flag": True}, floats) != shape({"flag": False}, floats)
    # A tensor scalar: guards read more than its value, so no memo.
    assert shape({"lr": torch.tensor(0.1)}, floats) is None


@pytest.mark.parametrize(
    "dtypes",
    [[torch.float32] * 3, [torch.float64] * 3, [torch.float32, torch.float64, torch.float32]],
    ids=["float32", "float64", "mixed"],
)
def test_increment_adds_one_to_each_count_in_its_own_dtype(dtypes: list[torch.dtype]) -> None:
    from torchopt_lab.optim._scalars import increment

    counts = [torch.tensor(float(i), dtype=dtype) for i, dtype in enumerate(dtypes)]
    versions = [count._version for count in counts]
    increment(counts)
    assert [count.item() for count in counts] == [1.0, 2.0, 3.0]
    assert [count.dtype for count in counts] == dtypes
    assert all(count._version > version for count, version in zip(counts, versions, strict=True))
    increment([])
