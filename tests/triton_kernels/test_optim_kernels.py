"""The fused optimizer kernels, under TRITON_INTERPRET=1 on the CPU, against torch.optim.

Tolerances: float64 1e-12 relative; float32 1e-6 relative and 1e-5 absolute. The kernels do the
torch reference's arithmetic in the same order on O(1) values; what differs is whether a
multiply-add is fused (torch's CPU kernels may contract ``a + b * c``, numpy does not), which
moves an intermediate by one unit in the last place. RMSprop's momentum buffer adds terms
``grad / avg`` of size up to ~16 that cancel, so one ulp of such a term (1.9e-6) shows up as an
absolute error in a small result: the 1e-5 absolute term covers a few such ulps.
bfloat16/float16: the oracle steps in float32 and rounds after each step, exactly what the
kernels do, so the only difference is a float32 rounding that can flip one final rounding: one
unit in the last place, 2**-7 relative for bfloat16, 2**-10 for float16.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from optim_kernel_oracle import Run, options_of

from triton_kernels.optim import (
    ADAM_FIELDS,
    MultiTensorTable,
    StepControls,
    adam_step,
    grad_square_norm,
    sgd_step,
)
from triton_kernels.optim.tables import numel_multiple

TOLERANCES = {
    torch.float64: {"rtol": 1e-12, "atol": 1e-14},
    torch.float32: {"rtol": 1e-6, "atol": 1e-5},
    torch.bfloat16: {"rtol": 2**-7, "atol": 1e-5},
    torch.float16: {"rtol": 2**-10, "atol": 1e-5},
}
# 0-dim, empty, one element, odd sizes, a tensor spanning several 32-element blocks with a tail.
SHAPES = [(), (0,), (1,), (7,), (3, 5), (130,)]
STEPS = 3

CASES = [
    ("sgd", {}),
    ("sgd", {"momentum": 0.9, "dampening": 0.1, "weight_decay": 0.01}),
    ("sgd", {"momentum": 0.9, "nesterov": True, "maximize": True}),
    ("adagrad", {"lr_decay": 0.01, "weight_decay": 0.1, "initial_accumulator_value": 0.1}),
    ("adagrad", {"maximize": True, "eps": 1e-6}),
    ("rmsprop", {}),
    ("rmsprop", {"centered": True, "weight_decay": 0.1}),
    ("rmsprop", {"momentum": 0.9, "maximize": True}),
    ("rmsprop", {"centered": True, "momentum": 0.5}),
    ("adam", {}),
    ("adam", {"amsgrad": True, "weight_decay": 0.1}),
    ("adam", {"maximize": True, "beta1": 0.0, "eps": 1e-6}),
    ("adam", {"decoupled_weight_decay": True, "weight_decay": 0.1}),
    (
        "adam",
        {"decoupled_weight_decay": True, "amsgrad": True, "maximize": True, "weight_decay": 0.01},
    ),
]
CASE_IDS = [f"{algorithm}-{'-'.join(options) or 'defaults'}" for algorithm, options in CASES]
# The low-precision runs take the case that exercises the most code per optimizer.
FULLEST = [CASES[2], CASES[3], CASES[8], CASES[13]]


def _random(shape, generator: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
    # Drawn on the CPU, so that every device gets the same values, then moved to the kernel device.
    values = torch.randn(shape, generator=generator, dtype=torch.float64, device="cpu")
    return values.to(torch.get_default_device(), dtype)


def _params(dtype: torch.dtype, shapes=SHAPES, seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [_random(shape, generator, dtype) for shape in shapes]


def _grads(params: list[torch.Tensor], step: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1000 + step)
    return [_random(p.shape, generator, p.dtype) for p in params]


def _assert_run_matches(run: Run, dtype: torch.dtype) -> None:
    tolerance = TOLERANCES[dtype]
    for kernel, reference in zip(run.kernel_params, run.reference_params, strict=True):
        torch.testing.assert_close(kernel, reference, **tolerance)
    for kernel_row, reference_row in zip(run.kernel_states, run.reference_states, strict=True):
        for kernel, reference in zip(kernel_row, reference_row, strict=True):
            if kernel is not None and reference is not None:
                torch.testing.assert_close(kernel, reference.to(kernel.dtype), **tolerance)
    if run.kernel_steps is not None:
        assert [float(s) for s in run.kernel_steps] == [float(s) for s in run.reference_steps]


def _run(algorithm, overrides, dtype, state_dtype=None, shapes=SHAPES, groups=None, group_lrs=None):
    options = options_of(algorithm, overrides)
    params = _params(dtype, shapes)
    run = Run(
        algorithm,
        options,
        params,
        groups=groups or [0] * len(params),
        group_lrs=group_lrs or [options["lr"]],
        state_dtype=state_dtype,
    )
    for step in range(STEPS):
        grads = _grads(params, step)
        run.kernel_step(grads)
        run.reference_step(grads)
        _assert_run_matches(run, dtype)
    return run


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize(("algorithm", "overrides"), CASES, ids=CASE_IDS)
def test_kernel_matches_torch_optim_step_for_step(algorithm, overrides, dtype):
    _run(algorithm, overrides, dtype)


@pytest.mark.parametrize(("algorithm", "overrides"), FULLEST, ids=lambda value: str(value))
def test_kernel_with_sizes_that_are_multiples_of_16_matches_torch_optim(algorithm, overrides):
    # Every size a multiple of 16, so the launch takes NUMEL_MULTIPLE = 16 (the variant whose
    # tails are vectorised on a GPU); 48 and 80 end in partial 32-element blocks.
    run = _run(algorithm, overrides, torch.float32, shapes=[(16,), (48,), (4, 20), (0,)])
    assert run.table.numel_multiple == 16


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("algorithm", "overrides"), FULLEST, ids=lambda value: str(value))
def test_low_precision_kernel_matches_float32_oracle_rounded_each_step(algorithm, overrides, dtype):
    _run(algorithm, overrides, dtype)


@pytest.mark.parametrize(("algorithm", "overrides"), FULLEST, ids=lambda value: str(value))
def test_float32_state_for_bfloat16_params_matches_float32_oracle(algorithm, overrides):
    run = _run(algorithm, overrides, torch.bfloat16, state_dtype=torch.float32)
    states = [t for row in run.kernel_states for t in row if t is not None]
    assert states and all(t.dtype == torch.float32 for t in states)


def test_many_tensors_in_two_param_groups_take_their_own_lr():
    shapes = [(i % 5 + 1,) for i in range(40)] + [(), (33,)]
    groups = [i % 2 for i in range(len(shapes))]
    run = _run(
        "adam",
        {"weight_decay": 0.1},
        torch.float32,
        shapes=shapes,
        groups=groups,
        group_lrs=[0.1, 0.001],
    )
    assert run.table.tensor_count == len(shapes)


def test_table_is_built_once_and_survives_new_wrappers_of_the_same_storage():
    params = _params(torch.float32)
    run = Run("adam", options_of("adam", {}), params, groups=[0] * len(params), group_lrs=[0.01])
    grads = _grads(params, 0)
    run.kernel_step(grads)
    # New Python objects over the same storage (what FSDP2's DTensor.to_local() hands out), for
    # parameters and state alike.
    run.kernel_params = [p.detach().view_as(p) for p in run.kernel_params]
    run.kernel_states = [
        [t if t is None else t.view_as(t) for t in row] for row in run.kernel_states
    ]
    run.kernel_step([g.view_as(g) for g in grads])
    assert run.table.builds == 1 and run.table.grad_uploads == 1
    run.kernel_step(_grads(params, 1))  # autograd-style fresh gradients: only their row moves
    assert run.table.builds == 1 and run.table.grad_uploads == 2


def test_refresh_rereads_only_gradient_addresses_and_declines_when_memory_changes():
    params = _params(torch.float32)
    run = Run("adam", options_of("adam", {}), params, groups=[0] * len(params), group_lrs=[0.01])
    run.kernel_step(_grads(params, 0))
    table = run.table
    grads = _grads(params, 1)
    assert table.refresh(run.kernel_params, grads)
    assert (table.builds, table.grad_uploads) == (1, 2)
    assert table.refresh(run.kernel_params, grads)  # nothing moved: nothing to do
    assert (table.builds, table.grad_uploads) == (1, 2)
    # A parameter moved, or resized at the same address (p.data = p.data[:n]), or a gradient
    # unlike its parameter: refresh changes nothing and says so; update() rebuilds or refuses.
    moved = [p.clone() for p in run.kernel_params]
    index = next(i for i, p in enumerate(run.kernel_params) if p.numel() > 1)
    resized = list(run.kernel_params)
    resized[index] = resized[index].view(-1)[:1]
    mistyped = [*grads[:3], grads[3].double(), *grads[4:]]
    assert not table.refresh(moved, grads)
    assert not table.refresh(resized, grads)
    assert not table.refresh(run.kernel_params, mistyped)
    assert (table.builds, table.grad_uploads) == (1, 2)
    with pytest.raises(ValueError, match="tensors in the table"):
        table.refresh(moved[:-1], grads[:-1])


@pytest.mark.parametrize(
    ("numels", "expected"),
    [
        ([2048, 768, 32], 16),
        ([0, 16], 16),  # an empty tensor has no tail to mask
        ([64, 8], 8),
        ([4, 12], 4),
        ([768, 10], 2),
        ([130, 7], 1),
    ],
)
def test_numel_multiple_is_the_largest_power_of_two_up_to_16_dividing_every_size(numels, expected):
    # The kernels promise the compiler this divides every size: a wrong answer would make masked
    # tails read and write out of bounds on a GPU.
    assert numel_multiple(numels) == expected
    assert all(numel % expected == 0 for numel in numels)


def test_transposed_and_unaligned_params_are_updated_in_place():
    storage = torch.randn(1 + 4 * 6, dtype=torch.float32)
    unaligned = storage[1:7]  # 4 bytes past a 16-byte boundary
    transposed = torch.randn(6, 4).t()
    params = [unaligned, transposed]
    run = Run("adam", options_of("adam", {}), params, groups=[0, 0], group_lrs=[0.01])
    run.kernel_params = params
    run.reference_params = [p.clone() for p in params]
    grads = [torch.randn_like(p) for p in params]
    run.kernel_step(grads)
    run.reference_step(grads)
    assert not run.table.aligned
    _assert_run_matches(run, torch.float32)
    assert storage[1:7].data_ptr() == unaligned.data_ptr()


def _clip_reference(params, grads, max_norm, options):
    reference = [p.clone().requires_grad_() for p in params]
    for p, g in zip(reference, grads, strict=True):
        p.grad = g.clone()
    torch.nn.utils.clip_grad_norm_(reference, max_norm)
    return [p.grad for p in reference]


@pytest.mark.parametrize("max_norm", [0.5, 1e6])
def test_fused_clipping_matches_clip_grad_norm_then_step(max_norm):
    shapes = [(7,), (3, 5), (130,), ()]
    params32, params64 = _params(torch.float32, shapes), _params(torch.float64, shapes, seed=1)
    runs = [
        Run("adam", options_of("adam", {}), params, groups=[0] * 4, group_lrs=[0.01])
        for params in (params32, params64)
    ]
    square_norms = torch.zeros(2, dtype=torch.float64)
    for step in range(STEPS):
        grads = [_grads(params32, step), _grads(params64, 10 + step)]
        clipped = _clip_reference(params32 + params64, grads[0] + grads[1], max_norm, None)
        for slot, (run, run_grads) in enumerate(zip(runs, grads, strict=True)):
            run.table.update(
                run.kernel_params, run_grads, run.kernel_states, run.kernel_steps, [0] * 4
            )
            grad_square_norm(run.table, square_norms, slot)
        controls = StepControls(square_norms=square_norms, max_grad_norm=max_norm)
        for run, run_grads, reference_grads in zip(
            runs, grads, (clipped[:4], clipped[4:]), strict=True
        ):
            run.kernel_step(run_grads, controls)
            run.reference_step([g.to(run_grads[0].dtype) for g in reference_grads])
        # Mixed float32/float64 clipping: the float32 part bounds the tolerance.
        for run in runs:
            _assert_run_matches(run, torch.float32)


def test_grad_square_norm_is_deterministic_and_matches_torch():
    params = _params(torch.float32, [(1000,), (7,), ()])
    grads = _grads(params, 0)
    table = MultiTensorTable(block_size=64).update(params, grads, [], None, [0, 0, 0])
    results = []
    for _ in range(2):
        square_norms = torch.zeros(1, dtype=torch.float64)
        grad_square_norm(table, square_norms)
        results.append(square_norms.clone())
    assert torch.equal(results[0], results[1])
    expected = torch.linalg.vector_norm(torch.cat([g.flatten().double() for g in grads])) ** 2
    torch.testing.assert_close(results[0][0], expected, rtol=1e-6, atol=0)


def _adam_table(params, grads):
    exp_avgs = [torch.zeros_like(p) for p in params]
    exp_avg_sqs = [torch.zeros_like(p) for p in params]
    steps = [torch.zeros((), dtype=torch.float32) for _ in params]
    table = MultiTensorTable(block_size=32).update(
        params, grads, [exp_avgs, exp_avg_sqs], steps, [0] * len(params)
    )
    return table, steps


def _adam_hyperparameters(lr=0.01):
    values = {"lr": lr, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "weight_decay": 0.0}
    return torch.tensor([[values[name] for name in ADAM_FIELDS]], dtype=torch.float64)


def _adam(table, controls):
    adam_step(
        table,
        _adam_hyperparameters(),
        amsgrad=False,
        maximize=False,
        decoupled_weight_decay=False,
        controls=controls,
    )


def test_nonfinite_norm_skips_the_step_on_the_device_and_counts_it():
    params = _params(torch.float32, [(40,), (3,)])
    before = [p.clone() for p in params]
    grads = _grads(params, 0)
    grads[1][0] = float("inf")
    table, steps = _adam_table(params, grads)
    square_norms = torch.zeros(1, dtype=torch.float64)
    skipped = torch.zeros(1, dtype=torch.int32)
    grad_square_norm(table, square_norms)
    _adam(
        table,
        StepControls(
            square_norms=square_norms, max_grad_norm=1.0, skip_nonfinite=True, skipped_steps=skipped
        ),
    )
    assert int(skipped) == 1 and all(float(s) == 0 for s in steps)
    assert all(torch.equal(p, b) for p, b in zip(params, before, strict=True))


def test_nonfinite_norm_without_skip_poisons_params_as_torch_clipping_does():
    params = _params(torch.float32, [(40,)])
    grads = _grads(params, 0)
    grads[0][0] = float("nan")
    table, _ = _adam_table(params, grads)
    square_norms = torch.zeros(1, dtype=torch.float64)
    grad_square_norm(table, square_norms)
    _adam(table, StepControls(square_norms=square_norms, max_grad_norm=1.0))
    reference = _clip_reference(_params(torch.float32, [(40,)]), grads, 1.0, None)
    assert torch.isnan(params[0]).all() and torch.isnan(reference[0]).all()


def test_grad_scale_unscales_in_kernel_and_found_inf_skips():
    params = _params(torch.float32, [(40,), (5,)])
    grads = _grads(params, 0)
    scale = torch.tensor(1024.0)
    scaled = [g * scale for g in grads]
    run = Run("adam", options_of("adam", {}), params, groups=[0, 0], group_lrs=[0.01])
    run.kernel_step(scaled, StepControls(grad_scale=scale, found_inf=torch.tensor(0.0)))
    run.reference_step(grads)
    _assert_run_matches(run, torch.float32)
    before = [p.clone() for p in run.kernel_params]
    run.kernel_step(scaled, StepControls(grad_scale=scale, found_inf=torch.tensor(1.0)))
    assert all(torch.equal(p, b) for p, b in zip(run.kernel_params, before, strict=True))
    assert all(float(s) == 1 for s in run.kernel_steps)
    assert all(torch.equal(g, s) for g, s in zip([g * scale for g in grads], scaled, strict=True))


@pytest.mark.parametrize(("algorithm", "overrides"), [CASES[1], CASES[3], CASES[6], CASES[12]])
def test_recorded_norms_are_grad_update_and_param_squared_norms(algorithm, overrides):
    params = _params(torch.float64, [(70,), (), (3, 5)])
    run = Run(algorithm, options_of(algorithm, overrides), params, groups=[0] * 3, group_lrs=[0.05])
    for step in range(2):
        grads = _grads(params, step)
        before = [p.clone() for p in run.kernel_params]
        run.kernel_step(grads, StepControls(record_norms=True))
        expected = torch.tensor(
            [
                [g.square().sum(), (p - b).square().sum(), b.square().sum()]
                for g, p, b in zip(grads, run.kernel_params, before, strict=True)
            ]
        )
        torch.testing.assert_close(run.table.diagnostics.double(), expected, rtol=1e-6, atol=1e-12)


ERRORS = [
    ("mixed dtypes", lambda p, g: ([p[0], p[1].double()], g), ValueError, "one device and dtype"),
    (
        "gapped param",
        lambda p, g: ([torch.randn(4, 6)[:, ::2], *p[1:]], [torch.randn(4, 3), *g[1:]]),
        ValueError,
        "gaps in memory",
    ),
    (
        "grad shape",
        lambda p, g: (p, [g[0].reshape(-1, 1), *g[1:]]),
        ValueError,
        "grad of params\\[0\\]",
    ),
    (
        "integer param",
        lambda p, g: ([torch.ones(3, dtype=torch.int64)], [torch.ones(3, dtype=torch.int64)]),
        TypeError,
        "int64",
    ),
]


@pytest.mark.parametrize(("name", "change", "error", "message"), ERRORS, ids=[e[0] for e in ERRORS])
def test_table_refuses_what_the_kernels_cannot_update(name, change, error, message):
    params = _params(torch.float32, [(4, 3), (5,)])
    params, grads = change(params, _grads(params, 0))
    with pytest.raises(error, match=message):
        MultiTensorTable().update(params, grads, [], None, [0] * len(params))


def test_launchers_refuse_bad_controls_and_hyperparameters():
    params = _params(torch.float32, [(4,)])
    table, _ = _adam_table(params, _grads(params, 0))
    with pytest.raises(ValueError, match="shape \\[>=1, 5\\]"):
        adam_step(
            table,
            torch.zeros(1, 4, dtype=torch.float64),
            amsgrad=False,
            maximize=False,
            decoupled_weight_decay=False,
        )
    with pytest.raises(ValueError, match="skip_nonfinite needs max_grad_norm"):
        _adam(table, StepControls(skip_nonfinite=True))
    with pytest.raises(ValueError, match=r"max_grad_norm must be positive, got -1\.0"):
        _adam(
            table,
            StepControls(max_grad_norm=-1.0, square_norms=torch.zeros(1, dtype=torch.float64)),
        )
    with pytest.raises(ValueError, match=r"grad_scale must be a one-element torch\.float32"):
        _adam(table, StepControls(grad_scale=torch.tensor(2.0, dtype=torch.float64)))
    with pytest.raises(ValueError, match="Nesterov momentum requires a momentum"):
        sgd_step(
            table,
            torch.zeros(1, 4, dtype=torch.float64),
            momentum=False,
            nesterov=True,
            maximize=False,
        )


@settings(max_examples=12, deadline=None)
@given(
    algorithm=st.sampled_from(["sgd", "adagrad", "rmsprop", "adam"]),
    sizes=st.lists(st.integers(0, 200), min_size=1, max_size=4),
    lr=st.floats(1e-4, 0.5),
    weight_decay=st.sampled_from([0.0, 0.01, 0.3]),
    maximize=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_kernel_matches_torch_optim_for_random_shapes_and_hyperparameters(
    algorithm, sizes, lr, weight_decay, maximize, seed
):
    shapes = [() if size == 0 else (size,) for size in sizes]
    overrides = {"lr": lr, "weight_decay": weight_decay, "maximize": maximize}
    if algorithm == "sgd":
        overrides["momentum"] = 0.9
    options = options_of(algorithm, overrides)
    params = _params(torch.float64, shapes, seed=seed)
    run = Run(algorithm, options, params, groups=[0] * len(params), group_lrs=[lr])
    for step in range(2):
        grads = _grads(params, seed + step)
        run.kernel_step(grads)
        run.reference_step(grads)
        _assert_run_matches(run, torch.float64)


def test_a_declaration_whose_update_reads_its_fields_in_another_order_raises() -> None:
    # The order of a hyperparameter row is declared once (KernelUpdate.fields) and checked
    # against the update's own unpacking, so a mismatch fails at import instead of giving
    # wrong numbers.
    from triton_kernels.optim.kernels import ADAM, KernelUpdate

    swapped = (ADAM.fields[1], ADAM.fields[0], *ADAM.fields[2:])
    with pytest.raises(ValueError, match="unpacks hyperparameters as"):
        KernelUpdate("adam", ADAM.update, swapped, ADAM.states, ADAM.options)
    with pytest.raises(ValueError, match="unpacks states as"):
        KernelUpdate("adam", ADAM.update, ADAM.fields, ADAM.states[::-1], ADAM.options)
    with pytest.raises(ValueError, match="unpacks OPTIONS as"):
        KernelUpdate("adam", ADAM.update, ADAM.fields, ADAM.states, ADAM.options[::-1])


@pytest.mark.parametrize("name", ["sgd", "adagrad", "rmsprop", "adam"])
def test_optimizer_rows_follow_the_declared_field_order(name: str) -> None:
    # The optimizers write each hyperparameter row from the kernel declaration's field names.
    import torchopt_lab.optim as optimizers
    from torchopt_lab.optim._fused import kernel_spec
    from triton_kernels.optim.kernels import UPDATES

    classes = {"sgd": "SGD", "adagrad": "Adagrad", "rmsprop": "RMSprop", "adam": "Adam"}
    spec, declaration = kernel_spec(getattr(optimizers, classes[name])), UPDATES[name]
    names = [*declaration.fields, "betas", "maximize"]
    group = {field: 1.0 + index for index, field in enumerate(names)}
    group["betas"] = (0.25, 0.5)
    expected = {**group, "beta1": 0.25, "beta2": 0.5}
    assert spec.values(group) == [expected[field] for field in declaration.fields]
    assert spec.state_keys == declaration.states
