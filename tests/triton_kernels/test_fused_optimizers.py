"""Every optimizer with backend="triton" (the fused kernels: under TRITON_INTERPRET=1 on the CPU,
compiled on a GPU when there is one) matches backend="torch" step for step, for every option of
the optimizer parity table."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "optim"))
from optim_cases import CASES, Case, clone_params, train, two_groups
from optim_cases import make_params as make_cpu_params


def make_params(dtype: torch.dtype, seed: int = 0) -> list[torch.Tensor]:
    """The optimizer tests' parameters (drawn on the CPU, the same on every device), on the
    kernel device (tests/triton_kernels/conftest.py)."""
    device = torch.get_default_device()
    return [p.detach().to(device).requires_grad_() for p in make_cpu_params(dtype, seed)]


# Few steps: the interpreter is slow, and four steps already exercise first-step state creation,
# the in-kernel step counter, bias corrections and momentum.
STEPS = 4
# Same as the kernel tests: float32 1e-6 relative, 1e-5 absolute (a fused multiply-add moves an
# intermediate by one ulp; see tests/triton_kernels/test_optim_kernels.py); float64 1e-12.
TOLERANCES = {torch.float64: (1e-12, 1e-12), torch.float32: (1e-6, 1e-5)}


def _train(case: Case, params, backend: str, **extra):
    return train(
        lambda ps: case.ours(
            two_groups(ps, case.options), **case.options, backend=backend, **extra
        ),
        params,
        steps=STEPS,
    )


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda case: case.id)
def test_triton_backend_matches_torch_backend(case: Case, dtype: torch.dtype) -> None:
    params = make_params(dtype)
    reference = clone_params(params)
    fused = _train(case, params, "triton")
    torch_path = _train(case, reference, "torch")
    rtol, atol = TOLERANCES[dtype]
    for a, b in zip(params, reference, strict=True):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=rtol, atol=atol)
    ours, theirs = fused.state_dict(), torch_path.state_dict()
    assert ours["param_groups"] == theirs["param_groups"]
    for our_state, their_state in zip(
        ours["state"].values(), theirs["state"].values(), strict=True
    ):
        assert our_state.keys() == their_state.keys()
        for key, value in their_state.items():
            torch.testing.assert_close(
                our_state[key], value.to(our_state[key].dtype), rtol=rtol, atol=atol
            )


def _count_launches(monkeypatch) -> list[str]:
    from triton_kernels.optim import launchers

    launched: list[str] = []
    original = launchers._launch

    def counting(kernel, grid, *args, **constexprs):
        launched.append(kernel.fn.__name__ if hasattr(kernel, "fn") else str(kernel))
        original(kernel, grid, *args, **constexprs)

    monkeypatch.setattr(launchers, "_launch", counting)
    return launched


def _loss(params) -> torch.Tensor:
    return sum(((p.double() - 0.3) ** 2).sum() + torch.sin(3 * p.double()).sum() for p in params)


def _step(optimizer, params) -> None:
    optimizer.zero_grad()
    _loss(params).backward()
    optimizer.step()


LAUNCH_CASES = [
    # (param dtypes, max_grad_norm, expected launches per step)
    ([torch.float32] * 4, None, 1),
    ([torch.float32] * 4, 1.0, 2),
    ([torch.float32, torch.float64, torch.float32, torch.float64], None, 2),
    ([torch.float32, torch.float64, torch.float32, torch.float64], 1.0, 4),
]


@pytest.mark.parametrize(("dtypes", "max_grad_norm", "expected"), LAUNCH_CASES)
def test_one_launch_per_device_dtype_group_plus_one_norm_launch_when_clipping(
    monkeypatch, dtypes, max_grad_norm, expected
):
    params = [
        torch.randn(5 + index, dtype=dtype, requires_grad=True)
        for index, dtype in enumerate(dtypes)
    ]
    # Two param groups with different lr: the same launch serves both.
    groups = [{"params": params[:2]}, {"params": params[2:], "lr": 0.01}]
    optimizer = torch_lab_optim().Adam(groups, backend="triton", max_grad_norm=max_grad_norm)
    launched = _count_launches(monkeypatch)
    for step in range(3):
        _step(optimizer, params)
        assert len(launched) == expected * (step + 1), launched


def torch_lab_optim():
    import torchopt_lab.optim

    return torchopt_lab.optim


CLIP_CASES = [case for case in CASES if not case.options.get("foreach")][::4]


@pytest.mark.parametrize("case", CLIP_CASES, ids=lambda case: case.id)
def test_fused_clipping_matches_torch_path_clipping(case: Case) -> None:
    params = make_params(torch.float64)
    reference = clone_params(params)
    _train(case, params, "triton", max_grad_norm=0.5)
    _train(case, reference, "torch", max_grad_norm=0.5)
    for a, b in zip(params, reference, strict=True):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_skip_nonfinite_skips_the_whole_step_and_counts_it(backend):
    params = make_params(torch.float32)
    optimizer = torch_lab_optim().Adam(
        params, backend=backend, max_grad_norm=1.0, skip_nonfinite=True
    )
    _step(optimizer, params)
    before = [p.detach().clone() for p in params]
    steps_before = [float(optimizer.state[p]["step"]) for p in params]
    optimizer.zero_grad()
    _loss(params).backward()
    params[1].grad[0] = float("inf")
    optimizer.step()
    assert optimizer.skipped_steps == 1
    assert all(torch.equal(p.detach(), b) for p, b in zip(params, before, strict=True))
    assert [float(optimizer.state[p]["step"]) for p in params] == steps_before
    _step(optimizer, params)
    assert optimizer.skipped_steps == 1
    assert [float(optimizer.state[p]["step"]) for p in params] == [s + 1 for s in steps_before]


def test_skip_nonfinite_needs_max_grad_norm():
    with pytest.raises(ValueError, match="skip_nonfinite=True needs max_grad_norm"):
        torch_lab_optim().Adam(make_params(torch.float32), skip_nonfinite=True)


@pytest.mark.parametrize("overflow", [False, True])
def test_grad_scaler_step_works_unchanged_with_in_kernel_unscaling(overflow):
    params = make_params(torch.float32)
    reference = clone_params(params)
    ours = torch_lab_optim().AdamW(params, lr=0.01, backend="triton")
    theirs = torch.optim.AdamW(reference, lr=0.01)
    assert ours._step_supports_amp_scaling
    for optimizer, tensors in ((ours, params), (theirs, reference)):
        scaler = torch.amp.GradScaler(torch.get_default_device().type, init_scale=2.0**10)
        for step in range(3):
            optimizer.zero_grad()
            scaler.scale(_loss(tensors)).backward()
            if overflow and step == 1:
                tensors[0].grad[0] = float("inf")
            scaler.step(optimizer)
            scaler.update()
    for a, b in zip(params, reference, strict=True):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-6, atol=1e-5)
    for p, q in zip(params, reference, strict=True):
        assert float(ours.state[p]["step"]) == float(theirs.state[q]["step"])


def test_state_dicts_interchange_with_torch_optim_mid_run():
    params = make_params(torch.float64)
    reference = clone_params(params)
    theirs = torch.optim.Adam(reference, lr=0.01, amsgrad=True)
    for _ in range(2):
        _step(theirs, reference)
    with torch.no_grad():
        for p, q in zip(params, reference, strict=True):
            p.copy_(q)
    ours = torch_lab_optim().Adam(params, lr=0.01, amsgrad=True, backend="triton")
    # Deep copies, as a checkpoint would be: load_state_dict may alias tensors it need not convert.
    ours.load_state_dict(copy.deepcopy(theirs.state_dict()))
    for _ in range(2):
        _step(ours, params)
        _step(theirs, reference)
    for a, b in zip(params, reference, strict=True):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-12, atol=1e-12)
    back = torch.optim.Adam(clone_params(params), lr=0.01, amsgrad=True)
    back.load_state_dict(copy.deepcopy(ours.state_dict()))
    assert [float(s["step"]) for s in back.state.values()] == [4.0] * len(params)


def test_float32_state_keeps_low_precision_params_state_in_float32():
    params = [p.detach().to(torch.bfloat16).requires_grad_() for p in make_params(torch.float32)]
    master = [p.detach().float().requires_grad_() for p in params]
    ours = torch_lab_optim().Adam(params, lr=0.01, backend="triton", float32_state=True)
    theirs = torch_lab_optim().Adam(master, lr=0.01, backend="torch")
    for _ in range(3):
        _step(ours, params)
        # The oracle: float32 state and math on the same bfloat16 values and gradients, with the
        # parameters rounded to bfloat16 after each step.
        theirs.zero_grad()
        _loss(master).backward()
        with torch.no_grad():
            for q in master:
                q.grad.copy_(q.grad.to(torch.bfloat16))
            theirs.step()
            for q in master:
                q.copy_(q.to(torch.bfloat16))
    for p, q in zip(params, master, strict=True):
        assert {ours.state[p][k].dtype for k in ("exp_avg", "exp_avg_sq")} == {torch.float32}
        # One bfloat16 ulp (2**-7): a float32 rounding difference can flip one final rounding.
        torch.testing.assert_close(p.detach().float(), q.detach(), rtol=2**-7, atol=1e-5)


def test_norm_diagnostics_are_grad_update_and_param_squared_norms():
    params = make_params(torch.float64)
    optimizer = torch_lab_optim().SGD(
        params, lr=0.1, momentum=0.9, backend="triton", record_norms=True, max_grad_norm=0.5
    )
    _step(optimizer, params)
    before = [p.detach().clone() for p in params]
    optimizer.zero_grad()
    _loss(params).backward()
    grads = [p.grad.clone() for p in params]
    optimizer.step()
    total = torch.linalg.vector_norm(torch.cat([g.flatten() for g in grads]))
    coefficient = min(1.0, 0.5 / (float(total) + 1e-6))
    norms = optimizer.norm_diagnostics()
    assert set(map(id, norms)) == set(map(id, params))
    for p, b, g in zip(params, before, grads, strict=True):
        expected = torch.stack(
            [(g * coefficient).square().sum(), (p.detach() - b).square().sum(), b.square().sum()]
        ).float()
        torch.testing.assert_close(norms[p], expected, rtol=1e-5, atol=1e-8)


def test_params_with_gaps_take_the_torch_path_under_auto_and_say_why(monkeypatch):
    from torchopt_lab import backend

    monkeypatch.setenv(backend.ENV_VAR, "triton")  # "auto" means Triton even on the CPU
    gapped = torch.nn.Parameter(torch.randn(4, 6)[:, ::2])
    dense = torch.nn.Parameter(torch.randn(5))
    reference = [gapped.detach().clone().requires_grad_(), dense.detach().clone().requires_grad_()]
    ours = torch_lab_optim().Adam([gapped, dense], lr=0.01)
    theirs = torch.optim.Adam(reference, lr=0.01)
    _step(ours, [gapped, dense])
    _step(theirs, reference)
    torch.testing.assert_close(gapped.detach(), reference[0].detach(), rtol=1e-6, atol=1e-6)
    decision = backend.backend_info()["decisions"]["optim.Adam (tensors the kernels cannot update)"]
    assert decision["backend"] == "torch" and "gaps in memory" in decision["reason"]
    with pytest.raises(RuntimeError, match="gaps in memory"):
        _step(torch_lab_optim().Adam([gapped], backend="triton"), [gapped])


@pytest.mark.parametrize(
    ("make", "options"),
    [
        ("Adam", {"lr": 0.01}),
        ("SGD", {"lr": 0.05, "momentum": 0.9}),
    ],
)
def test_one_cycle_schedule_updates_device_hyperparameters_without_rebuilding_tables(make, options):
    # OneCycleLR changes lr and cycles betas[0] (Adam) or momentum (SGD) every step.
    params = make_params(torch.float64)
    reference = clone_params(params)
    runs = []
    for tensors, backend in ((params, "triton"), (reference, "torch")):
        optimizer = getattr(torch_lab_optim(), make)(tensors, **options, backend=backend)
        schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=0.1, total_steps=10)
        for _ in range(4):
            _step(optimizer, tensors)
            schedule.step()
        runs.append(optimizer)
    for a, b in zip(params, reference, strict=True):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-12, atol=1e-12)
    (launch,) = runs[0]._fused_state.launches.values()
    # Built on the first step, and once more on the second for SGD (its first-step flag clears).
    assert launch.table.builds == (2 if make == "SGD" else 1)


class _Sharded(torch.nn.Parameter):
    """Stands in for an FSDP2 DTensor: each to_local() is a new view of the same storage."""

    def to_local(self) -> torch.Tensor:
        return self.detach()


def test_to_local_shards_are_updated_in_place_and_keep_the_table_cached():
    params = [_Sharded(p.detach()) for p in make_params(torch.float32)[:4]]
    reference = clone_params(params)
    mine = torch_lab_optim().Adam(params, lr=0.01, backend="triton")
    theirs = torch_lab_optim().Adam(reference, lr=0.01, backend="torch")
    for _ in range(3):
        _step(mine, params)
        _step(theirs, reference)
    for a, b in zip(params, reference, strict=True):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-6, atol=1e-5)
    (launch,) = mine._fused_state.launches.values()
    assert launch.table.builds == 1


def test_steady_state_step_runs_no_torch_operator_besides_our_launches(monkeypatch):
    # On a GPU any torch operator here would be an extra kernel launch or a host sync: with
    # clipping, skip_nonfinite, diagnostics and GradScaler inputs, a step after the first two
    # runs only the kernels (and .to() calls that are no-ops for tensors already in place).
    from triton_kernels.optim import launchers

    params = make_params(torch.float32)
    optimizer = torch_lab_optim().Adam(
        params, backend="triton", max_grad_norm=1.0, skip_nonfinite=True, record_norms=True
    )
    optimizer.grad_scale, optimizer.found_inf = torch.tensor(2.0), torch.tensor(0.0)
    _loss(params).backward()
    optimizer.step()
    optimizer.step()
    # The interpreter copies kernel arguments with torch operators; a GPU launch does not, so the
    # profiled step records launches without running them.
    launched = []
    monkeypatch.setattr(
        launchers, "_launch", lambda kernel, *args, **kwargs: launched.append(kernel)
    )
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        optimizer.step()
    operators = {event.name for event in profile.events() if event.name.startswith("aten::")}
    assert operators <= {"aten::to"}, operators
    assert len(launched) == 2  # the norm and the update


def test_sparse_gradients_take_the_torch_path_under_auto(monkeypatch):
    from torchopt_lab import backend

    monkeypatch.setenv(backend.ENV_VAR, "triton")  # "auto" means Triton even on the CPU
    embeddings = [torch.nn.Embedding(10, 3, sparse=True) for _ in range(2)]
    embeddings[1].load_state_dict(embeddings[0].state_dict())
    mine = torch_lab_optim().SGD(embeddings[0].parameters(), lr=0.1)
    theirs = torch.optim.SGD(embeddings[1].parameters(), lr=0.1)
    for optimizer, embedding in zip((mine, theirs), embeddings, strict=True):
        embedding(torch.tensor([1, 4, 4])).sum().backward()
        optimizer.step()
    torch.testing.assert_close(embeddings[0].weight, embeddings[1].weight)
    decision = backend.backend_info()["decisions"]["optim.SGD (tensors the kernels cannot update)"]
    assert "sparse" in decision["reason"]


CHANGES = {
    "nothing": (lambda optimizer, params: None, False),
    "a missing gradient": (lambda optimizer, params: setattr(params[0], "grad", None), True),
    "a loaded state dict": (
        lambda optimizer, params: optimizer.load_state_dict(copy.deepcopy(optimizer.state_dict())),
        True,
    ),
    "a replaced parameter state": (
        lambda optimizer, params: optimizer.state.__setitem__(
            params[1], copy.deepcopy(optimizer.state[params[1]])
        ),
        True,
    ),
    "a replaced state tensor": (
        lambda optimizer, params: optimizer.state[params[1]].__setitem__(
            "exp_avg", optimizer.state[params[1]]["exp_avg"].clone()
        ),
        True,
    ),
    "a parameter moved to new storage": (
        lambda optimizer, params: setattr(params[0], "data", params[0].data.clone()),
        True,  # the full step re-decides: the new storage may alias another parameter
    ),
    "a gradient for a parameter that had none": (
        lambda optimizer, params: setattr(params[-1], "grad", torch.ones_like(params[-1])),
        True,
    ),
    "an added param group": (
        lambda optimizer, params: optimizer.add_param_group(
            {"params": [torch.zeros(2, requires_grad=True)]}
        ),
        True,
    ),
    "a flipped option": (
        lambda optimizer, params: optimizer.param_groups[0].__setitem__("maximize", True),
        True,
    ),
    "a new max_grad_norm": (
        lambda optimizer, params: setattr(optimizer, "max_grad_norm", 1.0),
        True,
    ),
}


@pytest.mark.parametrize("change", list(CHANGES))
def test_repeated_steps_skip_collecting_tensors_until_something_changes(monkeypatch, change):
    params = make_params(torch.float64)
    reference = clone_params(params)
    # A frozen parameter (no gradient, ever) in the optimizer, as when a whole model's
    # parameters are handed over: the other parameters' steps still repeat.
    params.append(torch.zeros(3, dtype=torch.float64))
    optimizer = torch_lab_optim().Adam(params, lr=0.01, backend="triton")
    theirs = torch_lab_optim().Adam(reference, lr=0.01, backend="torch")
    for _ in range(2):
        _step(optimizer, params[:-1])
        _step(theirs, reference)
    collected = []
    original = type(optimizer)._group_tensors
    monkeypatch.setattr(
        type(optimizer),
        "_group_tensors",
        lambda self, group: collected.append(1) or original(self, group),
    )
    optimizer.zero_grad()
    _loss(params[:-1]).backward()
    apply, recollects = CHANGES[change]
    apply(optimizer, params)
    optimizer.step()
    assert bool(collected) == recollects
    if change == "nothing":
        theirs.zero_grad()
        _loss(reference).backward()
        theirs.step()
        for a, b in zip(params[:-1], reference, strict=True):
            torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-12, atol=1e-12)
        assert not params[-1].any() and params[-1] not in optimizer.state


# Changes a user may make between steps that torch.optim honours: the fused step must too.
HONOURED = {
    "zeroed moments in a new tensor": lambda optimizer, params: optimizer.state[
        params[1]
    ].__setitem__("exp_avg", torch.zeros_like(params[1])),
    "a parameter moved to new storage": lambda optimizer, params: setattr(
        params[0], "data", params[0].data.clone() * 0.5
    ),
}


@pytest.mark.parametrize("change", list(HONOURED))
def test_repeated_steps_honour_what_torch_honours(change):
    params = make_params(torch.float64)
    reference = clone_params(params)
    optimizer = torch_lab_optim().Adam(params, lr=0.01, backend="triton")
    theirs = torch.optim.Adam(reference, lr=0.01)
    for step in range(4):
        for opt, ps in ((optimizer, params), (theirs, reference)):
            if step == 2:
                HONOURED[change](opt, ps)
            _step(opt, ps)
    for a, b in zip(params, reference, strict=True):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-12, atol=1e-12)
