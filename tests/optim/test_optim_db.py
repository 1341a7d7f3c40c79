"""Every behaviour PyTorch's ``test/test_optim.py`` checks on the CPU, held for our SGD, Adagrad,
RMSprop, Adam, AdamW, NAdam, RAdam, Adamax and Adadelta, driven from torch's own table of
optimizers (``torch.testing._internal.common_optimizers.optim_db``): its optim inputs (with the
``fused`` and ``differentiable`` configurations its OptimizerInfos support), error inputs and LR
scheduler inputs. Where torch checks only a direction (the loss went down), these tests also hold
ours to torch.optim on the same run.

torch's tests (TestOptimRenewed, and TestDifferentiableOptimizer, TestLRScheduler and
TestSWAUtils which test_optim.py runs too) and where each is held here:
- test_errors: test_error_input_raises_torchs_exception_and_message
- test_forloop_goes_right_direction (contiguous or not, with LR schedulers),
  test_param_group_with_lrscheduler_goes_right_direction: test_forloop_goes_right_direction_*,
  test_param_group_with_lr_scheduler_*
- test_tensor_lr (0, 1, 2 dims): test_tensor_lr_of_any_shape_*; tensor betas: test_tensor_betas_*
- test_rosenbrock_sparse (SGD, Adagrad): test_sparse_gradients_step_as_dense_ones_and_as_torch
- test_complex, test_complex_2d: test_complex_params_step_as_their_real_views,
  test_complex_param_steps_as_its_real_and_imaginary_parts
- test_foreach_matches_forloop, test_fused_matches_forloop: test_foreach_matches_forloop_*,
  test_fused_matches_forloop_*; test_fused_error_on_params_on_meta: test_fused_refuses_meta_*,
  test_fused_steps_as_torch_once_meta_*; test_fused_does_not_step_if_foundinf: test_fused_does_
  not_step_when_found_inf_is_set, test_grad_scaler_*, test_step_supports_amp_scaling_*
- test_param_groups_weight_decay, test_param_groups_lr: test_param_groups_*
- test_step_is_noop_when_params_have_no_grad, test_step_is_noop_for_zero_grads,
  test_non_empty_state: test_step_is_noop_*, test_one_step_leaves_every_parameter_with_state
- test_optimizer_can_be_printed, test_deepcopy_copies_all_public_attrs: test_every_optim_input_
  can_be_printed, test_deepcopy_and_pickle_*
- test_state_dict_deterministic, test_can_load_older_state_dict, test_can_load_from_to_named_
  state_dict, test_save_load_equality_with_weights_only, test_load_nontensor_step:
  test_state_dict_round_trip_is_deterministic, test_loads_a_state_dict_without_newer_flags_*,
  test_state_dict_loads_from_and_to_named_parameters, test_state_dict_saves_and_loads_with_
  weights_only, test_loads_python_number_steps_*; with torch.optim both ways:
  test_state_dict_interchanges_with_torch_*
- test_state_dict_{pre,post,pre_post}_hook, test_load_state_dict_{pre_hook_and_prepend,post_hook,
  pre_post_hook}: test_state_dict_pre_and_post_hooks_*, test_load_state_dict_pre_and_post_hooks_*
- test_step_{pre,post,all}_hook: test_step_pre_and_post_hooks_*, test_global_step_hooks_*
- TestDifferentiableOptimizer: test_differentiable_step_passes_gradcheck_*,
  test_sgd_hyperparameter_tensors_get_gradients_through_steps
- TestLRScheduler, TestSWAUtils (over SGD there): test_schedulers_cycling_*,
  test_scheduler_stepped_before_the_optimizer_warns_as_torch
- the Triton backend (interpreter, tiny tensors): no-op steps, hooks, the network run and state
  dicts loaded from torch.optim.

Behaviours of torch's suite that do not apply on the CPU, and why:
- CUDA/MPS only: multi-GPU direction, ``test_mixed_device_dtype`` across GPUs (its CPU analogue,
  mixed dtypes in one optimizer, is here), ``test_set_default_dtype_works_with_foreach``,
  ``test_peak_memory_foreach``, ``test_foreach_large_tensor``, ``test_fused_large_tensor`` (64 GB),
  ``test_cpu_load_state_dict`` (skips the CPU), ``test_state_dict_with_cuda_params``,
  ``test_fused_cpu_matches_cuda``, ``test_defaults_changed_to_foreach`` (foreach is the default on
  CUDA only).
- Not about an optimizer class: ``test_optim_infos_do_not_specify_global_cliquey_kwargs`` (checks
  the table itself); ``test_second_order_optims_return_consistent_types`` (LBFGS only).

Covered elsewhere, not repeated here: the rule optimizers' (NAdam, RAdam, Adamax, Adadelta) error
inputs and optim inputs against torch step for step (tests/optim/test_rules.py); the built-ins'
fused and differentiable results against torch's own (tests/optim/test_torch_flags.py).

Stated tolerances: against torch.optim, float64 to 1e-12 and float32 to 1e-6 (relative and
absolute), fused kernels bit for bit in every dtype; ours against ours exact (state-dict round
trips, foreach vs forloop, mixed dtypes) or, where torch's suite compares two paths of torch.optim
that round differently (tensor vs float lr, complex vs real, fused vs forloop in float32/64),
torch.testing's defaults for the dtype as torch's suite does. Each exception says why in place.
"""

from __future__ import annotations

import copy
import functools
import inspect
import io
import pickle
import re
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from torch.nn import Parameter
from torch.optim.lr_scheduler import LRScheduler, ReduceLROnPlateau
from torch.optim.optimizer import (
    register_optimizer_step_post_hook,
    register_optimizer_step_pre_hook,
)
from torch.testing._internal.common_optimizers import (
    OptimizerErrorEnum,
    _get_optim_inputs_including_global_cliquey_kwargs,
    optim_db,
)

import torchopt_lab.optim as ours

NAMES = ("SGD", "Adagrad", "RMSprop", "Adam", "AdamW", "NAdam", "RAdam", "Adamax", "Adadelta")
BUILT_INS = NAMES[:5]
INFOS = {info.optim_cls.__name__: info for info in optim_db}
FUSED_ON_CPU = tuple(name for name in NAMES if "cpu" in INFOS[name].supports_fused_on)
SPARSE = tuple(name for name in NAMES if INFOS[name].supports_sparse)
TOLERANCES = {torch.float64: (1e-12, 1e-12), torch.float32: (1e-6, 1e-6)}


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    """Every tensor here is tiny: torch's intra-op threads would only contend for the cores the
    suite's workers already share (several times the wall time on a loaded 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def mine(name: str, backend: str = "torch") -> Callable[..., torch.optim.Optimizer]:
    """Our optimizer class ``name``, built on ``backend``."""
    return functools.partial(getattr(ours, name), backend=backend)


def theirs(name: str) -> type[torch.optim.Optimizer]:
    return getattr(torch.optim, name)


def optim_inputs(
    name: str, dtype: torch.dtype = torch.float32, skip: tuple[str, ...] = ()
) -> list[tuple[str, dict[str, Any]]]:
    """``(desc, kwargs)`` of every CPU optim input of ``name`` with the global flags (``fused``,
    ``differentiable``) its OptimizerInfo supports, as torch's suite builds them; fresh tensors
    (a tensor lr) on every call, so that two optimizers never share one."""
    built = _get_optim_inputs_including_global_cliquey_kwargs("cpu", dtype, INFOS[name], skip=skip)
    return [(optim_input.desc, optim_input.kwargs) for optim_input in built]


def ours_then_torchs(
    name: str, kwargs: dict[str, Any], run: Callable[[Callable[..., Any], dict[str, Any]], Any]
) -> list[Any]:
    """``[run(ours, options), run(torch's, options)]``: the same run of ours and of torch.optim's
    ``name``, each given its own deep copy of ``kwargs`` (so the two never share a tensor lr)."""
    return [run(make, copy.deepcopy(kwargs)) for make in (mine(name), theirs(name))]


def plain_inputs(name: str) -> list[tuple[str, dict[str, Any]]]:
    """The OptimizerInfo's own optim inputs, without the global flags."""
    return [(i.desc, i.kwargs) for i in INFOS[name].optim_inputs_func(device="cpu")]


def assert_close(actual: Any, expected: Any, message: str = "") -> None:
    if torch.is_tensor(expected) and expected.dtype in TOLERANCES:
        rtol, atol = TOLERANCES[expected.dtype]
        torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, msg=message or None)
    elif torch.is_tensor(expected):
        torch.testing.assert_close(actual, expected, msg=message or None)
    else:
        assert actual == expected, message


def assert_same_state(mine_: torch.optim.Optimizer, theirs_: torch.optim.Optimizer) -> None:
    a, b = mine_.state_dict(), theirs_.state_dict()
    assert a["param_groups"] == b["param_groups"]
    assert a["state"].keys() == b["state"].keys()
    for index, state in b["state"].items():
        assert list(a["state"][index]) == list(state)
        for key, value in state.items():
            assert_close(a["state"][index][key], value, f"state {index}.{key}")


def step_schedulers(schedulers: list[LRScheduler], loss: torch.Tensor) -> None:
    for scheduler in schedulers:
        if isinstance(scheduler, ReduceLROnPlateau):
            scheduler.step(loss)
        else:
            scheduler.step()


def linear_problem(
    dtype: torch.dtype, contiguous: bool = True, seed: int = 0
) -> tuple[Parameter, Parameter, torch.Tensor]:
    """torch's suite's problem: ``loss = |W x + b|^2`` with W (10, 5) and b (10,), optionally as
    non-contiguous views."""
    generator = torch.Generator().manual_seed(seed)
    if contiguous:
        weight = torch.randn(10, 5, generator=generator, dtype=dtype)
        bias = torch.randn(10, generator=generator, dtype=dtype)
    else:
        weight = torch.randn(10, 5, 2, generator=generator, dtype=dtype)[..., 0]
        bias = torch.randn(10, 2, generator=generator, dtype=dtype)[..., 0]
    x = torch.randn(5, generator=generator, dtype=dtype)
    return Parameter(weight), Parameter(bias), x


def clone_parameters(params: list[torch.Tensor]) -> list[Parameter]:
    return [Parameter(p.detach().clone()) for p in params]


def train_linear(
    make: Callable[[list[Any]], torch.optim.Optimizer],
    weight: torch.Tensor,
    bias: torch.Tensor,
    x: torch.Tensor,
    steps: int = 20,
    schedulers: list[Callable[[Any], LRScheduler]] = (),  # type: ignore[assignment]
) -> tuple[torch.optim.Optimizer, float, float]:
    """Train the linear problem; returns the optimizer and the loss before and after."""
    optimizer = make([weight, bias])
    built = [scheduler(optimizer) for scheduler in schedulers]

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = (weight.mv(x) + bias).pow(2).sum()
        loss.backward()
        return loss

    initial = closure().item()
    for _ in range(steps):
        loss = closure()
        optimizer.step()
        step_schedulers(built, loss)
    return optimizer, initial, closure().item()


def assert_direction(kwargs: dict[str, Any], initial: float, final: float) -> None:
    if kwargs.get("maximize", False):
        assert final > initial
    else:
        assert final < initial


# ---------------------------------------------------------------------------------------------
# test_errors: every error input, its exception type and message regex.


def _error_cases() -> Iterator[Any]:
    for name in BUILT_INS:  # the rule optimizers' error inputs: tests/optim/test_rules.py
        errors = INFOS[name].optim_error_inputs_func(device="cpu", dtype=torch.float32)
        for index, error in enumerate(errors):
            desc = error.optimizer_error_input.desc
            yield pytest.param(name, index, id=f"{name}-{index}-{desc}")


@pytest.mark.parametrize(("name", "index"), list(_error_cases()))
def test_error_input_raises_torchs_exception_and_message(name: str, index: int) -> None:
    messages = []
    for cls in (mine(name), theirs(name)):
        error = INFOS[name].optim_error_inputs_func(device="cpu", dtype=torch.float32)[index]
        params = error.optimizer_error_input.params
        kwargs = error.optimizer_error_input.kwargs
        if params is None:
            params = [torch.randn(2, 2, requires_grad=True)]
        if error.error_on == OptimizerErrorEnum.CONSTRUCTION_ERROR:
            action = functools.partial(cls, params, **kwargs)
        else:
            action = cls(params, **kwargs).step
        if issubclass(error.error_type, Warning):
            with pytest.warns(error.error_type, match=error.error_regex) as record:
                action()
            messages.append(sorted(str(w.message) for w in record))
        else:
            with pytest.raises(error.error_type, match=error.error_regex) as raised:
                action()
            messages.append(str(raised.value))
    assert messages[0] == messages[1]


# ---------------------------------------------------------------------------------------------
# test_forloop_goes_right_direction (contiguous or not, with and without each LR scheduler input)
# and test_param_group_with_lrscheduler_goes_right_direction.


@pytest.mark.parametrize("contiguous", [True, False], ids=["contiguous", "noncontiguous"])
@pytest.mark.parametrize("with_schedulers", [False, True], ids=["", "lr_scheduler"])
@pytest.mark.parametrize("name", NAMES)
def test_forloop_goes_right_direction_and_matches_torch(
    name: str, contiguous: bool, with_schedulers: bool
) -> None:
    scheduler_inputs = INFOS[name].scheduler_inputs if with_schedulers else [[]]
    for schedulers in scheduler_inputs:
        for (desc, kwargs), (_, their_kwargs) in zip(
            plain_inputs(name), plain_inputs(name), strict=True
        ):
            weight, bias, x = linear_problem(torch.float32, contiguous)
            reference = clone_parameters([weight, bias])
            runs = []
            for make, options, params in (
                (mine(name), kwargs, [weight, bias]),
                (theirs(name), their_kwargs, reference),
            ):
                runs.append(
                    train_linear(
                        lambda ps, make=make, options=options: make(
                            ps, **{**options, "foreach": False}
                        ),
                        *params,
                        x,
                        schedulers=schedulers,
                    )
                )
            (_, initial, final), _ = runs
            assert_direction(kwargs, initial, final)
            for a, b in zip([weight, bias], reference, strict=True):
                assert_close(a, b, desc)


@pytest.mark.parametrize("name", NAMES)
def test_param_group_with_lr_scheduler_goes_right_direction_as_torch(name: str) -> None:
    for schedulers in INFOS[name].scheduler_inputs:
        results = []
        for make in (mine(name), theirs(name)):
            weight, bias, x = linear_problem(torch.float32)
            optimizer, initial, final = train_linear(
                lambda ps, make=make: make([{"params": ps[:1]}, {"params": ps[1:], "lr": 0.01}]),
                weight,
                bias,
                x,
                schedulers=schedulers,
            )
            assert final < initial
            results.append((weight, bias, [g["lr"] for g in optimizer.param_groups]))
        (w, b, lrs), (w_ref, b_ref, lrs_ref) = results
        assert_close(w, w_ref)
        assert_close(b, b_ref)
        assert lrs == pytest.approx(lrs_ref, rel=1e-12)


# ---------------------------------------------------------------------------------------------
# test_tensor_lr: a 1-element tensor lr of 0, 1 or 2 dimensions steps as the float lr, or is
# refused with torch's message where torch refuses it.


@pytest.mark.parametrize("num_dim", [0, 1, 2])
@pytest.mark.parametrize("name", NAMES)
def test_tensor_lr_of_any_shape_steps_as_the_float_lr(name: str, num_dim: int) -> None:
    for desc, kwargs in optim_inputs(name, skip=("differentiable",)):
        weight, bias, x = linear_problem(torch.float32)
        with_tensor = clone_parameters([weight, bias])
        kwargs = {**kwargs, "lr": 1e-3}
        float_lr = mine(name)([weight, bias], **kwargs)
        lr = torch.tensor(1e-3).reshape([1] * num_dim)
        refusals = []
        for make, params in (
            (mine(name), with_tensor),
            (theirs(name), clone_parameters(with_tensor)),
        ):
            try:
                optimizer = make(params, **{**kwargs, "lr": lr.clone()})
            except ValueError as error:
                assert re.search("lr as a Tensor is not supported", str(error))
                refusals.append(str(error))
                continue
            refusals.append(None)
            if make is not theirs(name):
                tensor_lr = optimizer
        assert refusals[0] == refusals[1], desc
        if refusals[0] is not None:
            continue
        for _ in range(5):
            for optimizer, (w, b) in ((float_lr, (weight, bias)), (tensor_lr, with_tensor)):
                optimizer.zero_grad()
                (w.mv(x) + b).pow(2).sum().backward()
                optimizer.step()
            # torch's suite holds the tensor-lr run to the float-lr run at float32's defaults.
            torch.testing.assert_close(with_tensor[0], weight, msg=desc)
            torch.testing.assert_close(with_tensor[1], bias, msg=desc)


WITH_BETAS = tuple(name for name in NAMES if "betas" in inspect.signature(theirs(name)).parameters)


@pytest.mark.parametrize("name", WITH_BETAS)
def test_tensor_betas_step_as_torchs_or_are_refused_alike(name: str) -> None:
    # torch's tables give tensor betas only with capturable on CUDA; on the CPU each optim input
    # with betas (and lr) as float64 tensors.
    default = inspect.signature(theirs(name)).parameters["betas"].default
    for desc, kwargs in plain_inputs(name):
        outcomes = []
        for make in (mine(name), theirs(name)):
            betas = kwargs.get("betas", default)
            options = {
                **copy.deepcopy(kwargs),
                "betas": tuple(torch.tensor(b, dtype=torch.float64) for b in betas),
                "lr": torch.tensor(float(kwargs.get("lr", 1e-3)), dtype=torch.float64),
            }
            generator = torch.Generator().manual_seed(0)
            params = [torch.randn(4, 3, generator=generator, dtype=torch.float64) for _ in range(2)]
            try:
                optimizer = make(params, **options)
                for _ in range(3):
                    for p in params:
                        p.grad = torch.randn(p.shape, generator=generator, dtype=torch.float64)
                    optimizer.step()
            except (ValueError, RuntimeError, TypeError) as error:
                outcomes.append((type(error), str(error)))
                continue
            outcomes.append(params)
        mine_, theirs_ = outcomes
        if isinstance(theirs_, tuple):
            assert mine_ == theirs_, desc
            continue
        assert not isinstance(mine_, tuple), (desc, mine_)
        for a, b in zip(mine_, theirs_, strict=True):
            if name == "NAdam":
                # With a float64 tensor beta1 torch multiplies its float32 mu_product by mu in
                # float64 (0-dim type promotion) and rounds once; with a float, as ours does with
                # either, in float32: one float32 ulp of mu_product apart, 4e-11 in the params.
                torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=desc)
            else:
                assert_close(a, b, desc)


# ---------------------------------------------------------------------------------------------
# test_rosenbrock_sparse: sparse gradients (uncoalesced, one coordinate at a time) step as the
# dense ones, and as torch.optim's sparse path.


def _rosenbrock(tensor: torch.Tensor) -> torch.Tensor:
    x, y = tensor
    return (1 - x) ** 2 + 100 * (y - x**2) ** 2


def _sparse_inputs(name: str) -> list[dict[str, Any]]:
    updates, _ = INFOS[name].metadata_for_sparse
    seen, kept = set(), []
    for _, kwargs in optim_inputs(name, torch.float64, skip=("differentiable", "fused")):
        kwargs = {k: v for k, v in kwargs.items() if k not in updates}
        key = tuple(sorted((k, str(v)) for k, v in kwargs.items()))
        if kwargs and key not in seen:
            seen.add(key)
            kept.append({**kwargs, **({"lr": updates["lr"]} if "lr" in updates else {})})
    return kept


@pytest.mark.parametrize("with_schedulers", [False, True], ids=["", "lr_scheduler"])
@pytest.mark.parametrize("name", SPARSE)
def test_sparse_gradients_step_as_dense_ones_and_as_torch(name: str, with_schedulers: bool) -> None:
    _, scheduler_inputs = INFOS[name].metadata_for_sparse
    for kwargs in _sparse_inputs(name):
        runs = []
        for make, sparse in ((mine(name), True), (mine(name), False), (theirs(name), True)):
            param = Parameter(torch.tensor([1.5, 1.5], dtype=torch.float64))
            options = {k: v.clone() if torch.is_tensor(v) else v for k, v in kwargs.items()}
            optimizer = make([param], **options)
            schedulers = [s(optimizer) for s in scheduler_inputs] if with_schedulers else []
            for i in range(100):
                with torch.enable_grad():
                    loss = _rosenbrock(param)
                grad = torch.autograd.grad(loss, param)[0].detach()
                # Cyclic coordinate descent: only x's or only y's gradient, as an uncoalesced
                # sparse tensor of two entries (torch's suite's torture test).
                coordinate = i % 2
                value = grad[coordinate]
                if sparse:
                    indices = torch.tensor([[coordinate, coordinate]])
                    values = torch.stack([value / 4, value - value / 4])
                    param.grad = torch.sparse_coo_tensor(indices, values, (2,))
                else:
                    dense = torch.zeros(2, dtype=torch.float64)
                    dense[coordinate] = value
                    param.grad = dense
                optimizer.step()
                step_schedulers(schedulers, loss.detach())
            runs.append(param.detach())
        sparse_run, dense_run, torch_run = runs
        # torch's suite allows 5e-6 between the sparse and dense paths (x/4 + (x - x/4) != x).
        torch.testing.assert_close(sparse_run, dense_run, rtol=5e-6, atol=5e-6, msg=str(kwargs))
        assert_close(sparse_run, torch_run, str(kwargs))
        start = _rosenbrock(torch.tensor([1.5, 1.5], dtype=torch.float64))
        if kwargs.get("maximize", False):
            assert _rosenbrock(sparse_run) > start
        else:
            assert _rosenbrock(sparse_run) < start


# ---------------------------------------------------------------------------------------------
# test_complex and test_complex_2d: a complex parameter steps as its real view (every
# intermediate step), and as its real and imaginary parts optimized as two real parameters.


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("foreach", [False, True], ids=["forloop", "foreach"])
def test_complex_params_step_as_their_real_views(name: str, foreach: bool) -> None:
    # torch's suite adds foreach=True on CUDA only; here on the CPU too.
    for desc, kwargs in optim_inputs(name, torch.complex64, skip=("differentiable", "fused")):
        kwargs["foreach"] = foreach
        generator = torch.Generator().manual_seed(0)
        complex_params = [
            torch.randn(10, 5, dtype=torch.complex64, generator=generator),
            torch.randn(10, dtype=torch.complex64, generator=generator),
            # A real parameter among the complex ones, as in torch's suite.
            torch.randn(10, 5, dtype=torch.float32, generator=generator),
        ]
        real_params = [
            (torch.view_as_real(p) if p.is_complex() else p).clone().requires_grad_()
            for p in complex_params
        ]
        complex_params = [p.requires_grad_() for p in complex_params]
        options = {k: v.clone() if torch.is_tensor(v) else v for k, v in kwargs.items()}
        complex_optimizer = mine(name)(complex_params, **kwargs)
        real_optimizer = mine(name)(real_params, **options)
        for _ in range(3):
            for c, r in zip(complex_params, real_params, strict=True):
                r.grad = torch.randn(r.shape, generator=generator)
                c.grad = torch.view_as_complex(r.grad) if c.is_complex() else r.grad.clone()
            complex_optimizer.step()
            real_optimizer.step()
            # float32's torch.testing defaults, as torch's suite: a complex add with a real
            # alpha (SGD's lr) rounds differently from the real one, in torch.optim too.
            for c, r in zip(complex_params, real_params, strict=True):
                torch.testing.assert_close(
                    torch.view_as_real(c) if c.is_complex() else c, r, msg=desc
                )


@pytest.mark.parametrize("name", NAMES)
def test_complex_param_steps_as_its_real_and_imaginary_parts(name: str) -> None:
    for desc, kwargs in optim_inputs(name, torch.complex64, skip=("differentiable", "fused")):
        # Started near the valley (|a| < 1): from further out SGD with lr=0.01 diverges on
        # Rosenbrock, and torch.optim's own two runs then drift apart by float32 rounding.
        a = 0.5 * torch.randn(2, dtype=torch.complex64, generator=torch.Generator().manual_seed(1))
        real, imag = a.real.clone().requires_grad_(), a.imag.clone().requires_grad_()
        a.requires_grad_()
        options = {k: v.clone() if torch.is_tensor(v) else v for k, v in kwargs.items()}
        whole = mine(name)([a], **kwargs)
        parts = mine(name)([real, imag], **options)
        for _ in range(3):
            whole.zero_grad()
            parts.zero_grad()
            _rosenbrock(a).abs().backward()
            _rosenbrock(torch.complex(real, imag)).abs().backward()
            torch.testing.assert_close(a.grad.real, real.grad, msg=desc)
            torch.testing.assert_close(a.grad.imag, imag.grad, msg=desc)
            whole.step()
            parts.step()
            # float32 defaults of torch.testing, as torch's suite: the two gradients may round
            # differently through |rosenbrock|.
            torch.testing.assert_close(a.real, real, msg=desc)
            torch.testing.assert_close(a.imag, imag, msg=desc)


# ---------------------------------------------------------------------------------------------
# test_foreach_matches_forloop and test_fused_matches_forloop: the flag changes nothing but the
# speed, over a small network with a 0-dim parameter, a step without gradients and a layer frozen
# for two steps; and each equals torch.optim with the same flag.


def _network_run(
    make: Callable[..., torch.optim.Optimizer], kwargs: dict[str, Any], dtype: torch.dtype
) -> tuple[list[torch.Tensor], list[dict[str, Any]]]:
    torch.manual_seed(1)
    model = torch.nn.Sequential(
        torch.nn.Linear(2, 3), torch.nn.Sigmoid(), torch.nn.Linear(3, 1), torch.nn.Sigmoid()
    ).to(dtype)
    x = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5, 0.6], dtype=dtype).reshape(3, 2)
    # A 0-dim parameter last (torch's #100701), with a seeded value and gradient.
    empty = torch.rand((), dtype=dtype).requires_grad_()
    empty.grad = torch.rand_like(empty)
    params = [*model.parameters(), empty]
    optimizer = make(params, **kwargs)
    for i in range(7):
        optimizer.zero_grad()
        if i == 3:
            model[2].requires_grad_(False)
        if i == 5:
            model[2].requires_grad_(True)
        if i != 2:  # a step with every gradient None
            model(x).sum().backward()
        optimizer.step()
    states = [dict(optimizer.state[p]) for p in params]
    return [p.detach().clone() for p in params], states


def _assert_runs_equal(a: Any, b: Any, message: str, **tolerance: float) -> None:
    (params_a, states_a), (params_b, states_b) = a, b
    for pa, pb, sa, sb in zip(params_a, params_b, states_a, states_b, strict=True):
        torch.testing.assert_close(pa, pb, msg=message, **tolerance)
        assert sa.keys() == sb.keys(), message
        for key in sb:
            torch.testing.assert_close(sa[key], sb[key], msg=f"{message}: {key}", **tolerance)


@pytest.mark.parametrize("name", NAMES)
def test_foreach_matches_forloop_and_torch(name: str) -> None:
    for desc, kwargs in plain_inputs(name):
        runs = {}
        for label, make, foreach in (
            ("ours forloop", mine(name), False),
            ("ours foreach", mine(name), True),
            ("torch foreach", theirs(name), True),
        ):
            options = {k: v.clone() if torch.is_tensor(v) else v for k, v in kwargs.items()}
            runs[label] = _network_run(make, {**options, "foreach": foreach}, torch.float64)
        exact = {"rtol": 0, "atol": 0}
        _assert_runs_equal(runs["ours foreach"], runs["ours forloop"], desc, **exact)
        close = dict(zip(("rtol", "atol"), TOLERANCES[torch.float64], strict=True))
        _assert_runs_equal(runs["ours foreach"], runs["torch foreach"], desc, **close)


FUSED_DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]


@pytest.mark.parametrize("dtype", FUSED_DTYPES, ids=str)
@pytest.mark.parametrize("name", FUSED_ON_CPU)
def test_fused_matches_forloop_and_torch_fused_in_every_float_dtype(
    name: str, dtype: torch.dtype
) -> None:
    for desc, kwargs in plain_inputs(name):
        runs = []
        for make, fused in ((mine(name), False), (mine(name), True), (theirs(name), True)):
            options = {k: v.clone() if torch.is_tensor(v) else v for k, v in kwargs.items()}
            runs.append(_network_run(make, {**options, "fused": fused}, dtype))
        forloop, fused, torch_fused = runs
        _assert_runs_equal(fused, torch_fused, desc, rtol=0, atol=0)
        if dtype in (torch.float64, torch.float32):
            # torch.testing's defaults for the dtype, as torch's suite. In bfloat16 and float16
            # torch.optim's own fused and forloop runs differ beyond them on this run, so there
            # the oracle is torch's fused kernel (above, bit for bit).
            _assert_runs_equal(fused, forloop, desc)


def _fused_refusal(make: Callable[..., Any], params: list[torch.Tensor]) -> str:
    optimizer = make(params, fused=True)
    for p in params:
        p.grad = torch.ones_like(p)
    with pytest.raises(RuntimeError) as raised:
        optimizer.step()
    return str(raised.value)


@pytest.mark.parametrize("name", FUSED_ON_CPU)
def test_fused_refuses_meta_and_complex_params_with_torchs_error(name: str) -> None:
    assert re.match(
        "`fused=True` requires all the params to be floating point Tensors",
        _fused_refusal(mine(name), [torch.zeros(2, device="meta")]),
    )
    for params in ([torch.zeros(2, device="meta")], [torch.zeros(2, dtype=torch.complex64)]):
        assert _fused_refusal(mine(name), params) == _fused_refusal(theirs(name), params)


@pytest.mark.parametrize("name", FUSED_ON_CPU)
def test_fused_steps_as_torch_once_meta_params_are_materialized(name: str) -> None:
    results = []
    for make in (mine(name), theirs(name)):
        with torch.device("meta"):
            model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Linear(3, 1))
        optimizer = make(model.parameters(), fused=True)
        with torch.device("meta"):
            for p in model.parameters():
                p.grad = torch.rand_like(p)
        with pytest.raises(RuntimeError, match="`fused=True` requires all the params"):
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        model.to_empty(device="cpu")
        torch.manual_seed(0)
        for p in model.parameters():
            torch.nn.init.normal_(p)
            p.grad = torch.rand_like(p)
        optimizer.step()
        results.append(list(model.parameters()))
    for a, b in zip(*results, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("name", FUSED_ON_CPU)
def test_fused_does_not_step_when_found_inf_is_set(name: str) -> None:
    for desc, kwargs in plain_inputs(name):
        for grad_scale in (None, torch.ones(1)):
            results = []
            for make in (mine(name), theirs(name)):
                params = [torch.ones(1) for _ in range(3)]
                for p in params:
                    p.grad = torch.ones_like(p)
                options = {k: v.clone() if torch.is_tensor(v) else v for k, v in kwargs.items()}
                optimizer = make(params, fused=True, **options)
                optimizer.grad_scale = grad_scale
                optimizer.found_inf = torch.ones(())
                optimizer.step()
                results.append((params, [dict(optimizer.state[p]) for p in params]))
            # torch's claims: no parameter moves and no step is counted. (torch's fused SGD
            # leaves uninitialized momentum buffers behind; ours creates none.)
            for params, states in results:
                for p, state in zip(params, states, strict=True):
                    assert torch.equal(p, torch.ones(1)), desc
                    if "step" in state:
                        assert state["step"].item() == 0, desc


# ---------------------------------------------------------------------------------------------
# Mixed dtypes in one optimizer (torch's test_mixed_device_dtype needs two GPUs; the CPU part of
# its claim: one optimizer over float64, float32, float16 and bfloat16 parameters).


@pytest.mark.parametrize("name", NAMES)
def test_mixed_dtypes_in_one_optimizer_step_as_one_optimizer_per_dtype(name: str) -> None:
    dtypes = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
    generator = torch.Generator().manual_seed(0)
    base = [torch.rand(2, 3, generator=generator) for _ in dtypes]
    grads = [torch.rand(2, 3, generator=generator) for _ in dtypes]
    impls = ["foreach", "fused"] if name in FUSED_ON_CPU else ["foreach"]
    for desc, kwargs in plain_inputs(name):
        for impl in impls:
            for flag in (False, True):
                together = [b.to(d).requires_grad_() for b, d in zip(base, dtypes, strict=True)]
                apart = [p.detach().clone().requires_grad_() for p in together]
                for p, q, g in zip(together, apart, grads, strict=True):
                    p.grad, q.grad = g.to(p.dtype), g.to(p.dtype)
                options = {k: v.clone() if torch.is_tensor(v) else v for k, v in kwargs.items()}
                one = mine(name)(together, **options, **{impl: flag})
                per_dtype = [mine(name)([q], **kwargs, **{impl: flag}) for q in apart]
                for _ in range(3):
                    one.step()
                    for optimizer in per_dtype:
                        optimizer.step()
                for p, q in zip(together, apart, strict=True):
                    torch.testing.assert_close(p, q, rtol=0, atol=0, msg=f"{desc} {impl}={flag}")


# ---------------------------------------------------------------------------------------------
# test_param_groups_weight_decay and test_param_groups_lr.


@pytest.mark.parametrize("name", NAMES)
def test_param_groups_weight_decay_goes_right_direction_as_torch(name: str) -> None:
    for desc, kwargs in optim_inputs(name, skip=("differentiable",)):

        def run(
            make: Callable[..., Any], options: dict[str, Any]
        ) -> tuple[torch.Tensor, torch.Tensor]:
            weight, bias, x = linear_problem(torch.float32)
            bias_options = {**copy.deepcopy(options), "weight_decay": 0.0}
            _, initial, final = train_linear(
                lambda ps: make(
                    [{"params": ps[:1], **options}, {"params": ps[1:], **bias_options}]
                ),
                weight,
                bias,
                x,
            )
            assert_direction(options, initial, final)
            return weight, bias

        for a, b in zip(*ours_then_torchs(name, kwargs, run), strict=True):
            assert_close(a, b, desc)


@pytest.mark.parametrize("name", NAMES)
def test_param_groups_lr_leaves_a_group_with_tiny_lr_unchanged(name: str) -> None:
    for desc, kwargs in optim_inputs(name, skip=("differentiable",)):
        if "lr" not in kwargs or kwargs["lr"] == 0:
            kwargs["lr"] = 1e-3
        weight, bias, x = linear_problem(torch.float32)
        irrelevant = Parameter(torch.randn(2))
        before = irrelevant.detach().clone()
        optimizer = mine(name)(
            [{"params": [weight, bias], **kwargs}, {"params": [irrelevant]}], lr=1e-28
        )
        initial = (weight.mv(x) + bias).pow(2).sum().item()
        for _ in range(20):
            optimizer.zero_grad()
            loss = (weight.mv(x) + bias).pow(2).sum()
            loss.backward()
            irrelevant.grad = torch.rand_like(irrelevant)
            optimizer.step()
        assert_direction(kwargs, initial, loss.item())
        torch.testing.assert_close(irrelevant, before, msg=desc)


# ---------------------------------------------------------------------------------------------
# test_step_is_noop_when_params_have_no_grad, test_step_is_noop_for_zero_grads,
# test_non_empty_state.


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("name", NAMES)
def test_step_is_noop_when_params_have_no_grad(name: str, backend: str) -> None:
    params = [torch.randn(2, 3) for _ in range(2)]
    before = [p.clone() for p in params]
    for (desc, kwargs), (_, their_kwargs) in zip(
        optim_inputs(name), optim_inputs(name), strict=True
    ):
        optimizer = mine(name, backend)(params, **kwargs)
        loss = optimizer.step(lambda: torch.tensor([1.0]))
        assert loss.item() == 1.0
        for p, b in zip(params, before, strict=True):
            assert torch.equal(p, b), desc
        # The state is torch's: none, or what the constructor creates (Adagrad's sums).
        reference = theirs(name)(params, **their_kwargs)
        reference.step()
        _assert_state_dicts_equal(optimizer.state_dict(), reference.state_dict(), desc)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("name", NAMES)
def test_step_is_noop_for_zero_grads(name: str, backend: str) -> None:
    param = torch.randn(5, 1, requires_grad=True)
    before = param.detach().clone()
    # The Triton backend refuses differentiable=True by design (tests/optim/test_torch_flags.py).
    skip = ("differentiable",) if backend == "triton" else ()
    for desc, kwargs in optim_inputs(name, skip=skip):
        if kwargs.get("weight_decay", 0) != 0:
            continue  # weight decay moves a parameter whatever its gradient (so in torch)
        if name == "AdamW":
            # AdamW decays by its default weight_decay=1e-2 (times lr) with any gradient.
            kwargs["lr"] = torch.tensor(1e-5) if torch.is_tensor(kwargs.get("lr")) else 1e-5
        params = [param.clone()] if kwargs.get("differentiable") else [param]
        optimizer = mine(name, backend)(params, **kwargs)
        params[0].grad = torch.zeros_like(params[0])
        optimizer.step(lambda: torch.tensor([1.0]))
        # torch's suite: equal at float32's default tolerances (AdamW's 1e-5 * 1e-2 decay).
        torch.testing.assert_close(params[0], before, msg=desc)
        if name != "AdamW":
            assert torch.equal(params[0], before), desc


@pytest.mark.parametrize("name", NAMES)
def test_one_step_leaves_every_parameter_with_state(name: str) -> None:
    for desc, kwargs in plain_inputs(name):
        model = torch.nn.Linear(5, 5)
        optimizer = mine(name)(model.parameters(), **kwargs)
        model(torch.rand(2, 5)).sum().backward()
        optimizer.step()
        torch_model = copy.deepcopy(model)
        reference = theirs(name)(torch_model.parameters(), **copy.deepcopy(kwargs))
        for p in torch_model.parameters():
            p.grad = torch.ones_like(p)
        reference.step()
        for p, q in zip(model.parameters(), torch_model.parameters(), strict=True):
            assert len(optimizer.state[p]) > 0 or len(reference.state[q]) == 0, desc
            assert list(optimizer.state[p]) == list(reference.state[q]), desc


# ---------------------------------------------------------------------------------------------
# test_optimizer_can_be_printed, test_deepcopy_copies_all_public_attrs, pickling.


@pytest.mark.parametrize("name", NAMES)
def test_every_optim_input_can_be_printed(name: str) -> None:
    params = [Parameter(torch.randn(2, 3)) for _ in range(2)]
    for desc, kwargs in optim_inputs(name):
        text = repr(mine(name)(params, **kwargs))
        assert text.startswith(f"{name} ("), desc
        for key in kwargs:
            assert f"    {key}: " in text, (desc, key)


def _public_attributes(obj: Any) -> set[str]:
    return {key for key in obj.__dict__ if not key.startswith("_")}


@pytest.mark.parametrize("name", NAMES)
def test_deepcopy_and_pickle_copy_every_public_attribute_and_the_state(name: str) -> None:
    params = [Parameter(torch.randn(2, 3)) for _ in range(2)]
    for p in params:
        p.grad = torch.rand_like(p)
    for desc, kwargs in optim_inputs(name, skip=("differentiable",)):
        optimizer = mine(name)(params, **kwargs)
        for _ in range(3):
            optimizer.step()
        for copied in (copy.deepcopy(optimizer), pickle.loads(pickle.dumps(optimizer))):
            assert _public_attributes(copied) == _public_attributes(optimizer), desc
            assert type(copied) is type(optimizer)
            a, b = copied.state_dict(), optimizer.state_dict()
            assert a["param_groups"] == b["param_groups"], desc
            for index, state in b["state"].items():
                for key, value in state.items():
                    assert torch.equal(a["state"][index][key], value), (desc, key)


# ---------------------------------------------------------------------------------------------
# test_state_dict_deterministic, test_can_load_older_state_dict, test_can_load_from_to_named_
# state_dict, test_save_load_equality_with_weights_only, test_load_nontensor_step.


def _named(params: list[torch.Tensor], named: bool) -> list[Any]:
    return [(f"name{i}", p) for i, p in enumerate(params)] if named else params


def _without_names(state_dict: dict[str, Any]) -> dict[str, Any]:
    state_dict = copy.deepcopy(state_dict)
    for group in state_dict["param_groups"]:
        group.pop("param_names", None)
    return state_dict


def _assert_state_dicts_equal(a: dict[str, Any], b: dict[str, Any], message: str) -> None:
    assert a["param_groups"] == b["param_groups"], message
    assert a["state"].keys() == b["state"].keys(), message
    for index, state in b["state"].items():
        assert a["state"][index].keys() == state.keys(), message
        for key, value in state.items():
            torch.testing.assert_close(
                a["state"][index][key], value, rtol=0, atol=0, msg=f"{message}: {key}"
            )


@pytest.mark.parametrize("named_loaded", [False, True], ids=["", "named_loaded"])
@pytest.mark.parametrize("named_saved", [False, True], ids=["", "named_saved"])
@pytest.mark.parametrize("name", NAMES)
def test_state_dict_round_trip_is_deterministic(
    name: str, named_saved: bool, named_loaded: bool
) -> None:
    for desc, kwargs in optim_inputs(name, skip=("differentiable",)):
        weight, bias, x = linear_problem(torch.float32)
        optimizer = mine(name)(_named([weight, bias], named_saved), **kwargs)

        def closure(opt: Any, w: torch.Tensor, b: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
            opt.zero_grad()
            loss = (w.mv(x) + b).pow(2).sum()
            loss.backward()
            return loss

        for _ in range(10):
            optimizer.step(functools.partial(closure, optimizer, weight, bias, x))
        weight_c, bias_c = clone_parameters([weight, bias])
        options = {k: v.clone() if torch.is_tensor(v) else v for k, v in kwargs.items()}
        loaded = mine(name)(_named([weight_c, bias_c], named_loaded), **options)
        loaded.load_state_dict(copy.deepcopy(optimizer.state_dict()))
        for _ in range(10):
            optimizer.step(functools.partial(closure, optimizer, weight, bias, x))
            loaded.step(functools.partial(closure, loaded, weight_c, bias_c, x))
            assert torch.equal(weight, weight_c) and torch.equal(bias, bias_c), desc
        _assert_state_dicts_equal(
            _without_names(optimizer.state_dict()), _without_names(loaded.state_dict()), desc
        )
        # A param group repeated has the same representation (torch's #36831).
        loaded.param_groups.extend(loaded.param_groups)
        assert (
            _without_names(optimizer.state_dict())["param_groups"][-1]
            == _without_names(loaded.state_dict())["param_groups"][-1]
        ), desc


@pytest.mark.parametrize("direction", ["torch_to_ours", "ours_to_torch"])
@pytest.mark.parametrize("name", NAMES)
def test_state_dict_interchanges_with_torch_on_every_optim_input(name: str, direction: str) -> None:
    for desc, kwargs in optim_inputs(name, torch.float64, skip=("differentiable",)):
        runs = []
        # One run switches class after 3 steps; the oracle stays with torch.optim throughout.
        switch = (theirs(name), mine(name))
        if direction == "ours_to_torch":
            switch = switch[::-1]
        for first, second in (switch, (theirs(name), theirs(name))):
            generator = torch.Generator().manual_seed(0)
            params = [torch.randn(4, 3, generator=generator, dtype=torch.float64) for _ in range(2)]
            options = {k: v.clone() if torch.is_tensor(v) else v for k, v in kwargs.items()}
            before = first(params, **options)
            for step in range(6):
                if step == 3:
                    after = second(params, **copy.deepcopy(options))
                    after.load_state_dict(copy.deepcopy(before.state_dict()))
                    before = after
                for p in params:
                    p.grad = torch.randn(p.shape, generator=generator, dtype=torch.float64)
                before.step()
            runs.append((params, before))
        (params, optimizer), (reference, oracle) = runs
        for a, b in zip(params, reference, strict=True):
            assert_close(a, b, desc)
        assert_same_state(optimizer, oracle)


@pytest.mark.parametrize("name", NAMES)
def test_zero_element_params_step_as_torch(name: str) -> None:
    for desc, kwargs in optim_inputs(name, skip=("differentiable",)):

        def run(
            make: Callable[..., Any], options: dict[str, Any]
        ) -> tuple[list[torch.Tensor], Any]:
            params = [torch.zeros(0), torch.zeros(3, 0), torch.ones(2)]
            for p in params:
                p.grad = torch.ones_like(p)
            optimizer = make(params, **options)
            optimizer.step()
            optimizer.step()
            return params, optimizer

        (params, optimizer), (reference, oracle) = ours_then_torchs(name, kwargs, run)
        for a, b in zip(params, reference, strict=True):
            assert a.shape == b.shape
            assert_close(a, b, desc)
        assert_same_state(optimizer, oracle)


def _conv_batchnorm() -> tuple[torch.nn.Module, torch.Tensor]:
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Conv2d(4, 2, 1, stride=2), torch.nn.BatchNorm2d(2))
    return model, torch.rand(1, 4, 4, 4)


def _forward_backward(optimizer: torch.optim.Optimizer, model: torch.nn.Module, x: Any) -> None:
    optimizer.zero_grad()
    model(x).sum().backward()


@pytest.mark.parametrize("name", NAMES)
def test_loads_a_state_dict_without_newer_flags_as_torch_and_steps_unchanged(name: str) -> None:
    for desc, kwargs in optim_inputs(name, skip=("differentiable",)):
        groups, steps = [], []
        for make in (mine(name), theirs(name)):
            model, x = _conv_batchnorm()
            options = {k: v.clone() if torch.is_tensor(v) else v for k, v in kwargs.items()}
            optimizer = make(model.parameters(), **options)
            for _ in range(3):
                _forward_backward(optimizer, model, x)
                optimizer.step()
            # The original loads its state dict without the flags older torch versions did not
            # save (load fills in their defaults); a copy loads it whole, with those defaults.
            twin_model, twin = copy.deepcopy((model, optimizer))
            saved = copy.deepcopy(optimizer.state_dict())
            old = copy.deepcopy(saved)
            for group in old["param_groups"]:
                for flag in INFOS[name].not_og_supported_flags:
                    group.pop(flag, None)
            optimizer.load_state_dict(old)
            groups.append(optimizer.state_dict()["param_groups"])
            twin.load_state_dict({**saved, "param_groups": copy.deepcopy(groups[-1])})
            for m, opt in ((model, optimizer), (twin_model, twin)):
                _forward_backward(opt, m, x)
                opt.step()
            steps.append((list(model.parameters()), list(twin_model.parameters())))
        assert groups[0] == groups[1], desc
        # Loading without the flags changes nothing but them: the state steps on unchanged.
        for a, b in zip(*steps[0], strict=True):
            assert torch.equal(a, b), desc


@pytest.mark.parametrize("named_loaded", [False, True], ids=["", "named_loaded"])
@pytest.mark.parametrize("named_saved", [False, True], ids=["", "named_saved"])
@pytest.mark.parametrize("name", NAMES)
def test_state_dict_loads_from_and_to_named_parameters(
    name: str, named_saved: bool, named_loaded: bool
) -> None:
    for desc, kwargs in optim_inputs(name, skip=("differentiable",)):
        model, x = _conv_batchnorm()
        saved = model.named_parameters() if named_saved else model.parameters()
        optimizer = mine(name)(saved, **kwargs)
        for _ in range(3):
            _forward_backward(optimizer, model, x)
            optimizer.step()
        state_dict = copy.deepcopy(optimizer.state_dict())
        loaded_params = model.named_parameters() if named_loaded else model.parameters()
        options = {k: v.clone() if torch.is_tensor(v) else v for k, v in kwargs.items()}
        loaded = mine(name)(loaded_params, **options)
        loaded.load_state_dict(state_dict)
        _forward_backward(loaded, model, x)
        loaded.step()
        if named_saved or named_loaded:
            names = loaded.state_dict()["param_groups"][0]["param_names"]
            assert names == ["0.weight", "0.bias", "1.weight", "1.bias"], desc


@pytest.mark.parametrize("named", [False, True], ids=["", "named"])
@pytest.mark.parametrize("name", NAMES)
def test_state_dict_saves_and_loads_with_weights_only(name: str, named: bool) -> None:
    for desc, kwargs in optim_inputs(name, skip=("differentiable",)):
        weight, bias, x = linear_problem(torch.float32)
        optimizer = mine(name)(_named([weight, bias], named), **kwargs)
        for _ in range(3):
            optimizer.zero_grad()
            (weight.mv(x) + bias).pow(2).sum().backward()
            optimizer.step()
        state_dict = optimizer.state_dict()
        for weights_only in (False, True):
            buffer = io.BytesIO()
            torch.save(state_dict, buffer)
            buffer.seek(0)
            loaded = torch.load(buffer, weights_only=weights_only)
            _assert_state_dicts_equal(loaded, state_dict, desc)


@pytest.mark.parametrize("name", NAMES)
def test_loads_python_number_steps_and_steps_as_torch(name: str) -> None:
    for desc, kwargs in optim_inputs(name, skip=("differentiable",)):

        def run(
            make: Callable[..., Any], options: dict[str, Any]
        ) -> tuple[list[torch.Tensor], Any]:
            generator = torch.Generator().manual_seed(0)
            params = [Parameter(torch.randn(2, 3, generator=generator)) for _ in range(2)]
            for p in params:
                p.grad = torch.rand(p.shape, generator=generator)
            optimizer = make(params, **options)
            for _ in range(3):
                optimizer.step()
            state_dict = copy.deepcopy(optimizer.state_dict())
            for p_state in state_dict["state"].values():
                if torch.is_tensor(p_state.get("step")):
                    p_state["step"] = p_state["step"].item()
            optimizer.load_state_dict(state_dict)
            optimizer.step()
            return params, optimizer

        (params, optimizer), (reference, their_optimizer) = ours_then_torchs(name, kwargs, run)
        for a, b in zip(params, reference, strict=True):
            assert_close(a, b, desc)
        assert_same_state(optimizer, their_optimizer)


# ---------------------------------------------------------------------------------------------
# State-dict hooks: test_state_dict_pre_hook, _post_hook, _pre_post_hook; load_state_dict hooks:
# test_load_state_dict_pre_hook_and_prepend, _post_hook, _pre_post_hook.


def _mark_state(optimizer: torch.optim.Optimizer) -> None:
    optimizer.state["test"] = 1


def _report_mark(optimizer: torch.optim.Optimizer, state_dict: dict[str, Any]) -> dict[str, Any]:
    state_dict["ran_state_dict_pre_hook"] = state_dict["state"].pop("test", None) is not None
    return state_dict


def _set_lr(lr: float) -> Callable[[Any, dict[str, Any]], None]:
    def hook(optimizer: torch.optim.Optimizer, state_dict: dict[str, Any]) -> None:
        state_dict["param_groups"][0]["lr"] = lr

    return hook


def _replace_with_lr(lr: float) -> Callable[[Any, dict[str, Any]], dict[str, Any]]:
    def hook(optimizer: torch.optim.Optimizer, state_dict: dict[str, Any]) -> dict[str, Any]:
        replaced = copy.deepcopy(state_dict)
        replaced["param_groups"][0]["lr"] = lr
        return replaced

    return hook


def _record_loaded(optimizer: torch.optim.Optimizer) -> None:
    optimizer.state["loaded_lr"] = optimizer.param_groups[0]["lr"]
    optimizer.state["ran_load_state_dict_post_hook"] = True


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_pre_and_post_hooks_run_as_torchs(name: str) -> None:
    for desc, kwargs in optim_inputs(name):
        param = torch.rand(2, 3, requires_grad=True)
        pre_only = mine(name)([param], **kwargs)
        pre_only.register_state_dict_pre_hook(_mark_state)
        assert pre_only.state_dict()["state"]["test"] == 1, desc

        post_only = mine(name)([param], **kwargs)
        post_only.register_state_dict_post_hook(_report_mark)
        assert post_only.state_dict()["ran_state_dict_pre_hook"] is False, desc

        both = mine(name)([param], **kwargs)
        both.register_state_dict_pre_hook(_mark_state)
        both.register_state_dict_post_hook(_report_mark)
        state_dict = both.state_dict()
        assert "test" not in state_dict["state"], desc
        assert state_dict["ran_state_dict_pre_hook"] is True, desc


@pytest.mark.parametrize("name", NAMES)
def test_load_state_dict_pre_and_post_hooks_run_in_order_as_torchs(name: str) -> None:
    for desc, kwargs in optim_inputs(name):
        param = torch.rand(2, 3, requires_grad=True)
        optimizer = mine(name)([param], **kwargs)
        state_dict = optimizer.state_dict()
        optimizer.register_load_state_dict_pre_hook(_set_lr(0.002))
        optimizer.load_state_dict(state_dict)
        assert optimizer.param_groups[0]["lr"] == 0.002, desc
        # Prepended, the replacing hook runs first and the in-place one then overrides it.
        optimizer.register_load_state_dict_pre_hook(_replace_with_lr(0.003), prepend=True)
        optimizer.load_state_dict(state_dict)
        assert optimizer.param_groups[0]["lr"] == 0.002, desc

        post = mine(name)([param], **kwargs)
        post.register_load_state_dict_post_hook(_record_loaded)
        post.load_state_dict(post.state_dict())
        assert post.state["ran_load_state_dict_post_hook"] is True, desc
        assert post.state["loaded_lr"] != 0.003, desc

        both = mine(name)([param], **kwargs)
        both.register_load_state_dict_pre_hook(_replace_with_lr(0.003))
        both.register_load_state_dict_post_hook(_record_loaded)
        both.load_state_dict(both.state_dict())
        assert both.state["loaded_lr"] == 0.003, desc
        assert both.state["ran_load_state_dict_post_hook"] is True, desc


# ---------------------------------------------------------------------------------------------
# Step hooks: test_step_pre_hook, test_step_post_hook, test_step_all_hooks (global hooks first
# and last, around the optimizer's own).


def _recorder(calls: list[Any], value: Any) -> Callable[..., None]:
    """A step hook appending ``value`` to ``calls``."""
    return lambda optimizer, args, kwargs: calls.append(value)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("name", NAMES)
def test_step_pre_and_post_hooks_fire_until_removed(name: str, backend: str) -> None:
    params = [torch.tensor([1.0, 1.0])]  # no gradient: hooks fire around a no-op step
    for desc, kwargs in optim_inputs(name):
        optimizer = mine(name, backend)(params, **kwargs)
        calls: list[str] = []
        pre = optimizer.register_step_pre_hook(_recorder(calls, "pre"))
        post = optimizer.register_step_post_hook(_recorder(calls, "post"))
        optimizer.step()
        optimizer.step()
        assert calls == ["pre", "post"] * 2, desc
        pre.remove()
        post.remove()
        optimizer.step()
        assert calls == ["pre", "post"] * 2, desc


@pytest.mark.parametrize("name", NAMES)
def test_global_step_hooks_wrap_the_optimizers_own(name: str) -> None:
    params = [torch.tensor([1.0, 1.0])]
    for desc, kwargs in optim_inputs(name):
        optimizer = mine(name)(params, **kwargs)
        other = torch.optim.SGD(params)
        calls: list[int] = []
        handles = [
            register_optimizer_step_pre_hook(_recorder(calls, 0)),
            register_optimizer_step_post_hook(_recorder(calls, 5)),
        ]
        try:
            for opt in (optimizer, other):
                handles.append(opt.register_step_pre_hook(_recorder(calls, 1)))
                handles.append(opt.register_step_post_hook(_recorder(calls, 2)))
            optimizer.step()
            other.step()
            optimizer.step()
            assert calls == [0, 1, 2, 5] * 3, desc
        finally:
            for handle in handles:
                handle.remove()
        optimizer.step()
        other.step()
        assert calls == [0, 1, 2, 5] * 3, desc


# ---------------------------------------------------------------------------------------------
# TestDifferentiableOptimizer (test/optim/test_optim.py, run by test_optim.py): with
# differentiable=True a step is differentiable with respect to the parameter, its gradient and
# its state, for every optim input; and SGD's hyperparameters given as tensors get gradients
# through several steps.


def _one_differentiable_step(
    name: str,
    kwargs: dict[str, Any],
    keys: list[str],
    param: torch.Tensor,
    grad: torch.Tensor,
    *state: torch.Tensor,
) -> tuple[torch.Tensor, ...]:
    param = param.clone()
    param.grad = grad
    optimizer = mine(name)([param], **kwargs, differentiable=True)
    optimizer.state[param].update({k: v.clone() for k, v in zip(keys, state, strict=True)})
    optimizer.step()
    return (param, *(v for v in optimizer.state[param].values() if v.requires_grad))


# State torch.optim's differentiable step fails gradcheck for, as ours (which runs torch's update
# for differentiable=True): NAdam's mu_product gets no gradient, Adadelta's acc_delta a wrong one.
NON_DIFFERENTIABLE_STATE = {("NAdam", "mu_product"), ("Adadelta", "acc_delta")}


@pytest.mark.parametrize("name", NAMES)
def test_differentiable_step_passes_gradcheck_for_every_optim_input(name: str) -> None:
    for desc, kwargs in plain_inputs(name):
        kwargs.pop("capturable", None)
        if torch.is_tensor(kwargs.get("lr")):
            kwargs["lr"] = kwargs["lr"].double()
        generator = torch.Generator().manual_seed(0)
        primed = torch.rand(4, dtype=torch.float64, generator=generator)
        primed.grad = torch.rand(4, dtype=torch.float64, generator=generator)
        warmup = mine(name)([primed], **copy.deepcopy(kwargs))
        warmup.step()
        state = warmup.state[primed]
        # torch's suite differentiates with respect to the parameter and its gradient; here the
        # float state (not ``step``) is differentiated too, where torch.optim's own
        # differentiable step passes the same check (NON_DIFFERENTIABLE_STATE: it does not).
        inputs = [
            v.detach()
            .clone()
            .requires_grad_(
                k != "step" and v.is_floating_point() and (name, k) not in NON_DIFFERENTIABLE_STATE
            )
            for k, v in state.items()
        ]
        param = torch.rand(4, dtype=torch.float64, generator=generator, requires_grad=True)
        grad = torch.rand(4, dtype=torch.float64, generator=generator, requires_grad=True)
        assert torch.autograd.gradcheck(
            functools.partial(_one_differentiable_step, name, kwargs, list(state)),
            (param, grad, *inputs),
        ), desc


def _sgd_after_two_steps(
    param: torch.Tensor, grad: torch.Tensor, buffer: torch.Tensor, **hyper: torch.Tensor
) -> torch.Tensor:
    """The loss after two differentiable steps on ``(x * sum(p) - y)^2`` (torch's suite's
    meta-learning problem), from ``param`` with a first gradient ``grad`` added in."""
    param = param.clone()
    param.grad = grad
    optimizer = mine("SGD")([param], differentiable=True, **hyper)
    optimizer.state[param]["momentum_buffer"] = buffer.clone()
    x, y = torch.tensor([1.0], dtype=torch.float64), torch.tensor([2.0], dtype=torch.float64)
    for _ in range(2):
        loss = torch.nn.functional.mse_loss(x * param.sum(), y)
        loss.backward(inputs=(param,), create_graph=True)
        optimizer.step()
        optimizer.zero_grad()
    return loss


@pytest.mark.parametrize(
    "hyper", [("lr",), ("weight_decay",), ("lr", "weight_decay")], ids="-".join
)
def test_sgd_hyperparameter_tensors_get_gradients_through_steps(hyper: tuple[str, ...]) -> None:
    generator = torch.Generator().manual_seed(0)
    param, grad, buffer = (
        torch.rand(10, dtype=torch.float64, generator=generator, requires_grad=True)
        for _ in range(3)
    )
    values = {"lr": 0.001, "weight_decay": 0.9}
    tensors = [torch.tensor(values[k], dtype=torch.float64, requires_grad=True) for k in hyper]

    def run(param, grad, buffer, *tensors):
        return _sgd_after_two_steps(param, grad, buffer, **dict(zip(hyper, tensors, strict=True)))

    assert torch.autograd.gradcheck(run, (param, grad, buffer, *tensors))


# ---------------------------------------------------------------------------------------------
# Beyond test_optim.py's tables, the Optimizer API it relies on: add_param_group, zero_grad,
# step-count dtype, GradScaler's contract, profiler naming, LR schedulers over each optimizer.


@pytest.mark.parametrize("name", NAMES)
def test_add_param_group_takes_defaults_and_refuses_as_torch(name: str) -> None:
    def outcome(cls: Callable[..., Any], action: str) -> Any:
        a, b = torch.zeros(2, requires_grad=True), torch.zeros(3, requires_grad=True)
        optimizer = cls([a], lr=0.5)
        group: Any = {
            "added": {"params": [b], "weight_decay": 0.25},
            "repeated": {"params": [a]},
            "set": {"params": {b}},
            "non_leaf": {"params": [b * 2]},
            "not_a_dict": [b],
        }[action]
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                optimizer.add_param_group(group)
            except Exception as error:
                return type(error), str(error)
        groups = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
        return groups, [str(w.message) for w in caught]

    for action in ("added", "repeated", "set", "non_leaf", "not_a_dict"):
        assert outcome(mine(name), action) == outcome(theirs(name), action), action


@pytest.mark.parametrize("name", NAMES)
def test_zero_grad_sets_to_none_or_zeroes_as_asked(name: str) -> None:
    params = [torch.randn(3, requires_grad=True) for _ in range(2)]
    optimizer = mine(name)(params)
    for p in params:
        p.grad = torch.ones_like(p)
    optimizer.zero_grad(set_to_none=False)
    assert all(torch.equal(p.grad, torch.zeros(3)) for p in params)
    optimizer.zero_grad()
    assert all(p.grad is None for p in params)


@pytest.mark.parametrize("name", NAMES)
def test_step_count_dtype_and_device_match_torch(name: str) -> None:
    def run(make: Callable[..., Any], options: dict[str, Any]) -> Any:
        param = torch.randn(3, requires_grad=True)
        param.grad = torch.ones(3)
        optimizer = make([param], **options)
        optimizer.step()
        optimizer.step()
        step = optimizer.state[param].get("step")
        return None if step is None else (step.dtype, step.device, step.shape, step.item())

    for desc, kwargs in plain_inputs(name):
        ours, torchs = ours_then_torchs(name, kwargs, run)
        assert ours == torchs, desc


@pytest.mark.parametrize("name", NAMES)
def test_step_supports_amp_scaling_where_torch_does(name: str) -> None:
    def run(make: Callable[..., Any], options: dict[str, Any]) -> bool:
        optimizer = make([torch.zeros(2, requires_grad=True)], **options)
        return bool(getattr(optimizer, "_step_supports_amp_scaling", False))

    for desc, kwargs in optim_inputs(name):
        ours, torchs = ours_then_torchs(name, kwargs, run)
        assert ours == torchs, desc


@pytest.mark.parametrize("name", FUSED_ON_CPU)
def test_grad_scaler_steps_fused_as_torch_and_skips_an_infinite_step(name: str) -> None:
    for desc, kwargs in plain_inputs(name):
        results = []
        for make in (mine(name), theirs(name)):
            generator = torch.Generator().manual_seed(0)
            params = [torch.randn(4, 3, generator=generator).requires_grad_() for _ in range(2)]
            options = {k: v.clone() if torch.is_tensor(v) else v for k, v in kwargs.items()}
            optimizer = make(params, fused=True, **options)
            scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=2)
            for step in range(4):
                optimizer.zero_grad()
                scaler.scale(sum((p**2).sum() for p in params)).backward()
                if step == 1:
                    params[0].grad[0, 0] = float("inf")  # this step is skipped, the scale halved
                scaler.step(optimizer)
                scaler.update()
            results.append((params, scaler.get_scale()))
        (params, scale), (reference, their_scale) = results
        assert scale == their_scale, desc
        for a, b in zip(params, reference, strict=True):
            assert torch.equal(a, b), desc


@pytest.mark.parametrize("name", NAMES)
def test_profiler_names_the_step_as_torch(name: str) -> None:
    param = torch.randn(3, requires_grad=True)
    param.grad = torch.ones(3)
    optimizer = mine(name)([param])
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        optimizer.step()
    names = {event.name for event in profile.events()}
    assert f"Optimizer.step#{name}.step" in names


# ---------------------------------------------------------------------------------------------
# test_optim.py also runs TestLRScheduler and TestSWAUtils (schedulers over torch.optim.SGD): the
# parts that depend on the optimizer, over each of ours.


def _scheduled_trace(
    optimizer: torch.optim.Optimizer, params: list[torch.Tensor], scheduler: Any, steps: int = 8
) -> list[Any]:
    trace = []
    for _ in range(steps):
        optimizer.zero_grad()
        sum((p * p).sum() + p.sin().sum() for p in params).backward()
        optimizer.step()
        scheduler.step()
        trace.append([(g["lr"], g.get("betas"), g.get("momentum")) for g in optimizer.param_groups])
    return trace


SCHEDULED = {
    # Cycles betas[0] or momentum where the optimizer has one, as torch.optim's.
    "OneCycleLR": lambda opt: torch.optim.lr_scheduler.OneCycleLR(
        opt,
        max_lr=0.05,
        total_steps=8,
        cycle_momentum="momentum" in opt.defaults or "betas" in opt.defaults,
    ),
    "SWALR": lambda opt: torch.optim.swa_utils.SWALR(opt, swa_lr=0.05, anneal_epochs=3),
    "CyclicLR": lambda opt: torch.optim.lr_scheduler.CyclicLR(
        opt, base_lr=0.01, max_lr=0.1, step_size_up=3, cycle_momentum="momentum" in opt.defaults
    ),
}


@pytest.mark.parametrize("scheduler", SCHEDULED)
@pytest.mark.parametrize("name", NAMES)
def test_schedulers_cycling_lr_and_momentum_drive_ours_as_torch(name: str, scheduler: str) -> None:
    traces, runs = [], []
    for make in (mine(name), theirs(name)):
        generator = torch.Generator().manual_seed(0)
        params = [torch.randn(3, 2, generator=generator, dtype=torch.float64).requires_grad_()]
        optimizer = make(params, **({"momentum": 0.9} if name in ("SGD", "RMSprop") else {}))
        traces.append(_scheduled_trace(optimizer, params, SCHEDULED[scheduler](optimizer)))
        runs.append(params)
    assert traces[0] == traces[1]
    for a, b in zip(*runs, strict=True):
        assert_close(a, b)


@pytest.mark.parametrize("name", NAMES)
def test_scheduler_stepped_before_the_optimizer_warns_as_torch(name: str) -> None:
    messages = []
    for make in (mine(name), theirs(name)):
        param = torch.zeros(2, requires_grad=True)
        optimizer = make([param])
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            scheduler.step()  # before any optimizer.step(): torch warns
            param.grad = torch.ones(2)
            optimizer.step()
            scheduler.step()  # in order: no warning
        messages.append([str(w.message) for w in caught])
    assert messages[0] == messages[1]
    assert len(messages[0]) == 1 and "lr_scheduler.step()" in messages[0][0]


# ---------------------------------------------------------------------------------------------
# The Triton backend (interpreter on the CPU; tiny tensors): each optimizer's OptimizerInfo
# inputs on the small network match the torch backend.


@pytest.mark.parametrize("name", NAMES)
def test_triton_backend_matches_torch_backend_on_the_network(name: str) -> None:
    desc, kwargs = plain_inputs(name)[-1]
    runs = []
    for backend in ("torch", "triton"):
        options = {k: v.clone() if torch.is_tensor(v) else v for k, v in kwargs.items()}
        runs.append(_network_run(mine(name, backend), options, torch.float32))
    _assert_runs_equal(runs[1], runs[0], desc, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", NAMES)
def test_triton_backend_state_dict_interchanges_with_torch(name: str) -> None:
    desc, kwargs = plain_inputs(name)[-1]
    runs = []
    for second in (mine(name, "triton"), theirs(name)):
        generator = torch.Generator().manual_seed(0)
        params = [torch.randn(3, 2, generator=generator) for _ in range(2)]
        before = theirs(name)(params, **copy.deepcopy(kwargs))
        for step in range(4):
            if step == 2:
                after = second(params, **copy.deepcopy(kwargs))
                after.load_state_dict(copy.deepcopy(before.state_dict()))
                before = after
            for p in params:
                p.grad = torch.randn(p.shape, generator=generator)
            before.step()
        runs.append((params, before))
    (params, optimizer), (reference, oracle) = runs
    for a, b in zip(params, reference, strict=True):
        assert_close(a, b, desc)
    assert_same_state(optimizer, oracle)
