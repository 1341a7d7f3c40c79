"""``fused``, ``differentiable`` and ``capturable`` on the built-in optimizers, as torch.optim has
them, driven from torch's own table of optimizers (``optim_db``): every CPU optim input of SGD,
Adagrad, RMSprop, Adam and AdamW with each flag their OptimizerInfo supports.

On the torch path a flag hands the update to torch.optim's own update with that flag (its fused
CPU kernels, its differentiable single-tensor update), so results equal torch's bit for bit in
float64 (stated tolerance 0) and errors are torch's own.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch.testing._internal.common_optimizers import optim_db

import torchopt_lab
import torchopt_lab.optim as ours

NAMES = ("SGD", "Adagrad", "RMSprop", "Adam", "AdamW")
INFOS = {info.optim_cls.__name__: info for info in optim_db}


def _cases(flag: str) -> list[Any]:
    cases = []
    for name in NAMES:
        info = INFOS[name]
        if flag not in info.supported_impls:
            continue
        for index, optim_input in enumerate(info.optim_inputs_func(device="cpu")):
            kwargs = dict(optim_input.kwargs)
            if flag == "fused" and (kwargs.get("differentiable") or kwargs.get("foreach")):
                continue
            if kwargs.get("capturable"):
                continue  # capturable needs a device torch supports it on (not the CPU)
            cases.append(pytest.param(name, kwargs, id=f"{name}-{index}-{optim_input.desc}"))
    return cases


def _params(requires_grad: bool = True) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return [
        torch.randn(4, 3, dtype=torch.float64, generator=generator).requires_grad_(requires_grad),
        torch.randn(5, dtype=torch.float64, generator=generator).requires_grad_(requires_grad),
    ]


def _grads(step: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(100 + step)
    return [
        torch.randn(4, 3, dtype=torch.float64, generator=generator),
        torch.randn(5, dtype=torch.float64, generator=generator),
    ]


def _run_fused(cls: type, kwargs: dict[str, Any]) -> list[torch.Tensor]:
    params = _params()
    optimizer = cls(params, **kwargs, fused=True)
    for step in range(3):
        for param, grad in zip(params, _grads(step), strict=True):
            param.grad = grad
        optimizer.step()
    return [param.detach() for param in params]


@pytest.mark.parametrize(("name", "kwargs"), _cases("fused"))
def test_fused_true_on_cpu_runs_and_matches_torch_fused(name, kwargs):
    theirs = _run_fused(getattr(torch.optim, name), kwargs)
    mine = _run_fused(getattr(ours, name), {**kwargs, "backend": "torch"})
    for a, b in zip(mine, theirs, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def _run_differentiable(cls: type, kwargs: dict[str, Any]) -> tuple[torch.Tensor, ...]:
    """Gradients of the parameters after two steps, with respect to the parameters before them
    (and to a tensor lr when the input has one)."""
    leaves = _params()
    params = [leaf.clone() for leaf in leaves]  # non-leaf, as torch's differentiable tests do
    optimizer = cls(params, **kwargs, differentiable=True)
    for step in range(2):
        for param, grad in zip(params, _grads(step), strict=True):
            param.grad = grad
        optimizer.step()
    inputs = list(leaves)
    if torch.is_tensor(kwargs.get("lr")) and kwargs["lr"].requires_grad:
        inputs.append(kwargs["lr"])
    loss = sum((param * param).sum() for param in params)
    return (*(param.detach() for param in params), *torch.autograd.grad(loss, inputs))


@pytest.mark.parametrize(("name", "kwargs"), _cases("differentiable"))
def test_differentiable_true_lets_gradients_flow_through_the_step_as_torch(name, kwargs):
    def run(module, extra):
        options = dict(kwargs)
        if torch.is_tensor(options.get("lr")):
            options["lr"] = options["lr"].detach().double().clone().requires_grad_()
        try:
            return _run_differentiable(getattr(module, name), {**options, **extra})
        except Exception as error:  # torch's own update may refuse; ours must refuse alike
            return type(error)

    theirs = run(torch.optim, {})
    mine = run(ours, {"backend": "auto"})
    if isinstance(theirs, type):
        assert mine is theirs
        return
    assert not isinstance(mine, type), mine
    for a, b in zip(mine, theirs, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_hypergradient_of_the_learning_rate_flows_through_sgd():
    lr = torch.tensor(0.1, dtype=torch.float64, requires_grad=True)
    param = torch.tensor([1.0, -2.0], dtype=torch.float64, requires_grad=True).clone()
    optimizer = ours.SGD([param], lr=lr, differentiable=True)
    param.grad = torch.tensor([0.5, 0.5], dtype=torch.float64)
    optimizer.step()
    (hypergradient,) = torch.autograd.grad(param.sum(), lr)
    assert hypergradient.item() == pytest.approx(-1.0)  # d/dlr sum(p - lr * g) = -sum(g)


def test_differentiable_step_takes_the_torch_path_and_says_so():
    params = [param.clone() for param in _params()]
    optimizer = ours.Adam(params, lr=0.01, differentiable=True, backend="auto")
    for param, grad in zip(params, _grads(0), strict=True):
        param.grad = grad
    optimizer.step()
    info = torchopt_lab.backend_info()["decisions"]
    assert any(
        "differentiable" in key and value["backend"] == "torch" for key, value in info.items()
    )


def test_differentiable_with_backend_triton_is_refused_naming_it():
    params = [param.clone() for param in _params()]
    optimizer = ours.Adam(params, lr=0.01, differentiable=True, backend="triton")
    for param, grad in zip(params, _grads(0), strict=True):
        param.grad = grad
    with pytest.raises(RuntimeError, match="differentiable"):
        optimizer.step()


@pytest.mark.parametrize("name", ["Adam", "AdamW", "RMSprop"])
def test_capturable_on_cpu_raises_torchs_own_error(name):
    def error_of(module, extra):
        params = _params()
        optimizer = getattr(module, name)(params, lr=0.01, capturable=True, **extra)
        for param, grad in zip(params, _grads(0), strict=True):
            param.grad = grad
        try:
            optimizer.step()
        except Exception as error:
            return type(error), str(error)
        return None

    theirs = error_of(torch.optim, {})
    assert theirs is not None
    assert error_of(ours, {"backend": "torch"}) == theirs
