"""The fused (Triton) optimizer path against torch.optim where probing found it wrong: non-finite
values, zero hyperparameters, GradScaler with tensors on the torch path, skipped steps, resized and
aliased parameters, gradients laid out differently from their parameters, checkpoints.

Tolerances: float32 1e-6 relative and 1e-5 absolute (one fused multiply-add moves a value by an
ulp), NaN and infinities compared as values (``equal_nan``)."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch

import torchopt_lab.optim as ours
from torchopt_lab import backend

RTOL, ATOL = 1e-6, 1e-5

# Every fused kernel (SGD with and without momentum, Adagrad, RMSprop plain and centered, Adam,
# AdamW), each with torch.optim's class of the same name as the oracle.
OPTIMIZERS: list[tuple[str, dict[str, Any]]] = [
    ("SGD", {}),
    ("SGD", {"momentum": 0.9}),
    ("SGD", {"momentum": 0.9, "nesterov": True}),
    ("Adagrad", {}),
    ("RMSprop", {}),
    ("RMSprop", {"centered": True, "momentum": 0.5}),
    ("Adam", {}),
    ("Adam", {"amsgrad": True}),
    ("AdamW", {}),
]
IDS = [f"{name}{options}" for name, options in OPTIMIZERS]


def _pair(name: str, options: dict[str, Any], values: torch.Tensor, **extra: Any):
    """Our optimizer (backend="triton") and torch's, each over its own copy of ``values``."""
    mine = torch.nn.Parameter(values.clone())
    theirs = torch.nn.Parameter(values.clone())
    return (
        mine,
        getattr(ours, name)([mine], **options, backend="triton", **extra),
        theirs,
        getattr(torch.optim, name)([theirs], **options),
    )


def _close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(
        actual.detach(), expected.detach(), rtol=RTOL, atol=ATOL, equal_nan=True
    )


ZERO_TERMS = [{"weight_decay": 0.0}, {"lr": float("inf"), "weight_decay": 0.0}]


@pytest.mark.parametrize(("name", "options"), OPTIMIZERS, ids=IDS)
@pytest.mark.parametrize("hyperparameters", ZERO_TERMS, ids=str)
def test_zero_weight_decay_and_infinite_lr_keep_infinite_params_as_torch_does(
    name: str, options: dict[str, Any], hyperparameters: dict[str, float]
) -> None:
    values = torch.tensor([float("-inf"), 1.0, 2.0, float("inf")])
    mine, ours_opt, theirs, their_opt = _pair(name, {**options, **hyperparameters}, values)
    for _ in range(2):
        for param, optimizer in ((mine, ours_opt), (theirs, their_opt)):
            param.grad = torch.tensor([0.5, -1.0, 0.25, 2.0])
            optimizer.step()
    _close(mine, theirs)
    for key, value in their_opt.state[theirs].items():
        _close(ours_opt.state[mine][key], value)


def test_centered_rmsprop_with_alpha_zero_rounds_like_torch_addcmul() -> None:
    # v - m^2 with v = m^2 rounded: torch's addcmul rounds once, so sqrt sees -ulp (NaN) or +ulp.
    torch.manual_seed(0)
    mine, ours_opt, theirs, their_opt = _pair(
        "RMSprop", {"centered": True, "alpha": 0.0}, torch.zeros(64)
    )
    gradient = torch.randn(64)
    for param, optimizer in ((mine, ours_opt), (theirs, their_opt)):
        param.grad = gradient.clone()
        optimizer.step()
    assert theirs.isnan().any()
    _close(mine, theirs)


def _steps(optimizer: torch.optim.Optimizer, param: torch.Tensor, grads: list[torch.Tensor]):
    for grad in grads:
        param.grad = grad.clone()
        optimizer.step()


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_a_parameter_resized_at_the_same_address_is_updated_at_its_new_size(momentum) -> None:
    # p.data = p.data[:n] keeps data_ptr(): the cached tables must see the new element count.
    torch.manual_seed(0)
    mine, ours_opt, theirs, their_opt = _pair(
        "SGD", {"lr": 0.1, "momentum": momentum}, torch.randn(4096)
    )
    backing = mine.data
    for param, optimizer in ((mine, ours_opt), (theirs, their_opt)):
        _steps(optimizer, param, [torch.ones(4096)] * 2)
    if momentum:
        for optimizer, param in ((ours_opt, mine), (their_opt, theirs)):
            optimizer.state[param]["momentum_buffer"] = optimizer.state[param]["momentum_buffer"][
                :2048
            ]
    mine.data, theirs.data = mine.data[:2048], theirs.data[:2048]
    tail = backing[2048:].clone()
    for param, optimizer in ((mine, ours_opt), (theirs, their_opt)):
        _steps(optimizer, param, [torch.full((2048,), 2.0)] * 2)
    _close(mine, theirs)
    torch.testing.assert_close(backing[2048:], tail, rtol=0, atol=0)  # nothing written past it


def test_a_state_of_the_wrong_shape_raises_runtime_error_as_torch_does() -> None:
    for backend_name in ("triton", "torch-oracle"):
        param = torch.nn.Parameter(torch.randn(8))
        if backend_name == "triton":
            optimizer = ours.Adam([param], backend="triton")
        else:
            optimizer = torch.optim.Adam([param])
        _steps(optimizer, param, [torch.ones(8)])
        optimizer.state[param]["exp_avg"] = torch.zeros(4)
        with pytest.raises(RuntimeError):
            _steps(optimizer, param, [torch.ones(8)])


def test_a_vanished_launch_group_leaves_no_stale_square_norm() -> None:
    # Four launch groups (float32/float64 x two option sets), then one loses its gradients: the
    # clip must use the norm of the three left, and its old inf must not skip later steps.
    torch.manual_seed(0)
    values = [torch.randn(5, dtype=dtype) for dtype in (torch.float32, torch.float64) for _ in "ab"]
    mine = [torch.nn.Parameter(v.clone()) for v in values]
    theirs = [torch.nn.Parameter(v.clone()) for v in values]

    def groups(params):
        return [
            {"params": [params[0], params[2]]},
            {"params": [params[1], params[3]], "maximize": True},
        ]

    ours_opt = ours.SGD(
        groups(mine), lr=0.1, backend="triton", max_grad_norm=1.0, skip_nonfinite=True
    )
    their_opt = torch.optim.SGD(groups(theirs), lr=0.1)
    for step in range(3):
        for params, optimizer in ((mine, ours_opt), (theirs, their_opt)):
            optimizer.zero_grad()
            for index, p in enumerate(params):
                if step == 0 or index != 3:  # params[3] (a whole launch group) goes quiet
                    p.grad = torch.full_like(p, 2.0 if step else float("inf") * (index == 3))
        if step:  # torch.optim: clip, then step; the inf step is skipped
            torch.nn.utils.clip_grad_norm_(theirs[:3], 1.0)
            their_opt.step()
        ours_opt.step()
    for a, b in zip(mine, theirs, strict=True):
        _close(a, b)
    assert ours_opt.skipped_steps == 1


def test_a_skipped_step_counts_once_across_launches() -> None:
    params = [
        torch.nn.Parameter(torch.ones(3, dtype=dtype)) for dtype in (torch.float32, torch.float64)
    ]
    optimizer = ours.Adam(params, backend="triton", max_grad_norm=1.0, skip_nonfinite=True)
    for p in params:
        p.grad = torch.full_like(p, float("nan"))
    optimizer.step()
    assert optimizer.skipped_steps == 1


@pytest.mark.parametrize("skip", ["found_inf", "skip_nonfinite"])
def test_sgd_dampening_first_step_is_not_spent_on_a_skipped_step(skip) -> None:
    mine, ours_opt, theirs, their_opt = _pair(
        "SGD",
        {"lr": 1.0, "momentum": 0.9, "dampening": 0.5},
        torch.zeros(3),
        **({"max_grad_norm": 1e9, "skip_nonfinite": True} if skip == "skip_nonfinite" else {}),
    )
    mine.grad = torch.full((3,), float("inf"))
    if skip == "found_inf":  # what GradScaler.step hands a fused optimizer
        ours_opt.grad_scale, ours_opt.found_inf = torch.ones(1), torch.ones(1)
    ours_opt.step()
    assert mine.eq(0).all() and not ours_opt.state[mine]  # torch.optim never stepped
    if skip == "found_inf":
        del ours_opt.grad_scale, ours_opt.found_inf
    for param, optimizer in ((mine, ours_opt), (theirs, their_opt)):
        param.grad = torch.ones(3)
        optimizer.step()
    _close(mine, theirs)  # -1.0: the first real step's buffer is the gradient, undamped
    _close(ours_opt.state[mine]["momentum_buffer"], their_opt.state[theirs]["momentum_buffer"])


def test_norm_diagnostics_of_a_skipped_step_say_inf_gradient_and_no_update() -> None:
    params = [torch.nn.Parameter(torch.ones(4)), torch.nn.Parameter(torch.full((3,), 2.0))]
    optimizer = ours.SGD(
        params, lr=0.1, backend="triton", max_grad_norm=10.0, skip_nonfinite=True, record_norms=True
    )
    for p in params:
        p.grad = torch.ones_like(p)
    optimizer.step()
    first = optimizer.norm_diagnostics()
    saved = {p: value.clone() for p, value in first.items()}
    params[0].grad = torch.full((4,), float("inf"))
    optimizer.step()
    skipped = optimizer.norm_diagnostics()
    assert skipped[params[0]][0] == float("inf") and skipped[params[0]][1] == 0
    expected = torch.stack(
        [torch.tensor(3.0), torch.tensor(0.0), params[1].detach().square().sum()]
    )
    torch.testing.assert_close(skipped[params[1]], expected)
    for p in params:  # the dict returned earlier is not overwritten by later steps
        torch.testing.assert_close(first[p], saved[p], rtol=0, atol=0)


# Every way a parameter of a fused optimizer takes the torch path: (make its tensor, set its
# gradient from a dense one of its shape).
def _sparse_grad(p: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
    return dense.to_sparse()


TORCH_PATH = {
    "sparse gradient": (lambda: torch.randn(6, 4), _sparse_grad),
    "complex": (lambda: torch.randn(3, 2, dtype=torch.complex64), lambda p, g: g),
    "gaps in memory": (lambda: torch.randn(4, 6)[:, ::2], lambda p, g: g.contiguous()),
    "transposed gradient": (lambda: torch.randn(3, 4), lambda p, g: g.t().contiguous().t()),
}


def _mixed(make: Callable[[], torch.Tensor]) -> list[torch.Tensor]:
    torch.manual_seed(0)
    return [make(), torch.randn(5)]


SCALER_CASES = [
    (name, reason)
    for name in ("SGD", "Adam")
    for reason in TORCH_PATH
    if (name, reason) != ("Adam", "sparse gradient")  # torch.optim.Adam refuses sparse grads
]


@pytest.mark.parametrize(("name", "reason"), SCALER_CASES)
def test_grad_scale_and_found_inf_are_honoured_by_parameters_on_the_torch_path(
    monkeypatch, name, reason
):
    """GradScaler.step hands a fused optimizer ``grad_scale`` and ``found_inf`` instead of
    unscaling; the oracle is torch.optim on the unscaled gradients, skipping the overflow step
    (GradScaler's own unscale_ has no complex kernel on the CPU, so it cannot be the oracle
    here). Duplicate parameters, the other way onto the torch path, are tested below."""
    monkeypatch.setenv(backend.ENV_VAR, "triton")  # "auto" means Triton even on the CPU
    make, set_grad = TORCH_PATH[reason]
    options = {"lr": 0.1, **({"momentum": 0.9} if name == "SGD" else {})}
    scale = 1024.0
    runs = []
    for optimizer_class in (getattr(ours, name), getattr(torch.optim, name)):
        mine = optimizer_class is getattr(ours, name)
        params = [torch.nn.Parameter(v) for v in _mixed(make)]  # not clones: they drop gaps
        optimizer = optimizer_class(params, **options)
        assert not mine or optimizer._step_supports_amp_scaling
        for step in range(3):
            overflow = step == 1
            for index, p in enumerate(params):
                dense = torch.full_like(p, (index + 1.0) * (scale if mine else 1.0))
                if overflow and index == 0:
                    dense = dense * float("inf")
                p.grad = set_grad(p, dense) if index == 0 else dense
            if mine:
                optimizer.grad_scale = torch.tensor(scale)
                optimizer.found_inf = torch.tensor(float(overflow))
                optimizer.step()
            elif not overflow:
                optimizer.step()
        runs.append(params)
    for a, b in zip(*runs, strict=True):
        _close(a, b)


def test_grad_scaler_skips_and_unscales_a_sparse_embedding_in_a_fused_optimizer(monkeypatch):
    # The repro: the embedding row moved 39.7 (torch: 0.039), and -inf on a skipped step.
    monkeypatch.setenv(backend.ENV_VAR, "triton")
    runs = []
    for optimizer_class in (ours.SGD, torch.optim.SGD):
        torch.manual_seed(0)
        embedding, linear = torch.nn.Embedding(10, 4, sparse=True), torch.nn.Linear(4, 1)
        optimizer = optimizer_class([*embedding.parameters(), *linear.parameters()], lr=0.1)
        scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
        for step in range(3):
            optimizer.zero_grad()
            loss = linear(embedding(torch.tensor([1, 2]))).sum()
            scaler.scale(loss * (float("inf") if step == 1 else 1.0)).backward()
            scaler.step(optimizer)
            scaler.update()
        runs.append([embedding.weight, linear.weight, linear.bias])
    for a, b in zip(*runs, strict=True):
        _close(a, b)


def _aliased_pair() -> list[torch.Tensor]:
    storage = torch.zeros(8)
    return [torch.nn.Parameter(storage[:6]), torch.nn.Parameter(storage[2:])]


# Parameters sharing memory within one launch: the same parameter twice in a group, or two
# views of one storage that overlap. One launch would update that memory from two programs.
SHARING = {
    "duplicate": lambda: (lambda p: [p, p, torch.nn.Parameter(torch.ones(3))])(
        torch.nn.Parameter(torch.ones(4))
    ),
    "overlapping views": _aliased_pair,
}


@pytest.mark.parametrize("sharing", list(SHARING))
def test_parameters_sharing_memory_take_the_torch_path_under_auto_and_triton_refuses(
    monkeypatch, sharing
) -> None:
    monkeypatch.setenv(backend.ENV_VAR, "triton")  # "auto" means Triton even on the CPU
    runs = []
    for optimizer_class in (ours.SGD, torch.optim.SGD):
        params = SHARING[sharing]()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch warns about a duplicate, and updates twice
            optimizer = optimizer_class(params, lr=0.1)
        for _ in range(2):
            for p in params:
                p.grad = torch.ones_like(p)
            optimizer.step()
        runs.append(params)
    for a, b in zip(*runs, strict=True):
        _close(a, b)
    decision = backend.backend_info()["decisions"]["optim.SGD (tensors the kernels cannot update)"]
    assert decision["backend"] == "torch" and "shares memory" in decision["reason"]
    params = SHARING[sharing]()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        optimizer = ours.SGD(params, lr=0.1, backend="triton")
    for p in params:
        p.grad = torch.ones_like(p)
    with pytest.raises(RuntimeError, match="shares memory with another parameter"):
        optimizer.step()


# Gradients laid out differently from their parameters: (parameter, gradient).
LAYOUTS = {
    "transposed gradient": lambda: (torch.randn(3, 4), torch.randn(4, 3).t()),
    "expanded gradient": lambda: (torch.randn(3, 4), torch.randn(1, 4).expand(3, 4)),
    "transposed parameter, contiguous gradient": lambda: (
        torch.randn(4, 3).t(),
        torch.randn(3, 4),
    ),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("name", ["SGD", "Adam"])
def test_a_gradient_laid_out_unlike_its_parameter_takes_the_torch_path_or_triton_refuses(
    monkeypatch, layout, name
) -> None:
    monkeypatch.setenv(backend.ENV_VAR, "triton")
    torch.manual_seed(0)
    value, grad = LAYOUTS[layout]()
    mine, theirs = torch.nn.Parameter(value.clone()), torch.nn.Parameter(value.clone())
    if not value.is_contiguous():  # keep the parameter's transposed layout
        mine = torch.nn.Parameter(value.t().clone().t())
        theirs = torch.nn.Parameter(value.t().clone().t())
    ours_opt = getattr(ours, name)([mine], lr=0.1)
    their_opt = getattr(torch.optim, name)([theirs], lr=0.1)
    for param, optimizer in ((mine, ours_opt), (theirs, their_opt)):
        param.grad = grad
        optimizer.step()
    _close(mine, theirs)
    decision = backend.backend_info()["decisions"][
        f"optim.{name} (tensors the kernels cannot update)"
    ]
    assert decision["backend"] == "torch" and "laid out differently" in decision["reason"]
    strict = getattr(ours, name)([mine], lr=0.1, backend="triton")
    with pytest.raises(RuntimeError, match="laid out differently"):
        strict.step()


def test_float32_state_survives_a_checkpoint() -> None:
    torch.manual_seed(0)
    values = torch.randn(64).to(torch.bfloat16)
    grads = [torch.randn(64).to(torch.bfloat16) for _ in range(6)]

    def run(param, optimizer, steps):
        for grad in steps:
            param.grad = grad.clone()
            optimizer.step()

    straight = torch.nn.Parameter(values.clone())
    optimizer = ours.Adam([straight], lr=0.01, backend="triton", float32_state=True)
    run(straight, optimizer, grads)
    resumed = torch.nn.Parameter(values.clone())
    first = ours.Adam([resumed], lr=0.01, backend="triton", float32_state=True)
    run(resumed, first, grads[:3])
    second = ours.Adam([resumed], lr=0.01, backend="triton", float32_state=True)
    second.load_state_dict(first.state_dict())
    assert second.state[resumed]["exp_avg"].dtype == torch.float32
    run(resumed, second, grads[3:])
    torch.testing.assert_close(resumed, straight, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["SGD", "Adam", "NAdam"])
def test_a_negative_bit_gradient_takes_the_torch_path_or_triton_refuses(monkeypatch, name) -> None:
    # torch._neg_view(-g) is g held as -g in memory with the negative bit set: the kernels read
    # memory, so they ran the update with -g (built-ins and rule kernels alike) before.
    from torchopt_lab.optim.rules import REGISTRY

    monkeypatch.setenv(backend.ENV_VAR, "triton")
    cls = REGISTRY[name]
    torch.manual_seed(0)
    value, grad = torch.randn(3, 4), torch.randn(3, 4)
    mine, theirs = torch.nn.Parameter(value.clone()), torch.nn.Parameter(value.clone())
    ours_opt, their_opt = cls([mine], lr=0.1), cls([theirs], lr=0.1, backend="torch")
    mine.grad, theirs.grad = torch._neg_view(grad.neg()), grad
    ours_opt.step()
    component = f"optim.{name}" + (
        "" if name == "NAdam" else " (tensors the kernels cannot update)"
    )
    decision = backend.backend_info()["decisions"][component]
    assert decision["backend"] == "torch" and "negative bit" in decision["reason"]
    their_opt.step()
    _close(mine, theirs)
    strict = cls([mine], lr=0.1, backend="triton")
    with pytest.raises(RuntimeError, match="negative bit"):
        strict.step()
