"""Bad input raises what torch.optim raises, with the bad value in the message."""

from __future__ import annotations

import math

import pytest
import torch

import torchopt_lab.optim as ours


def params() -> list[torch.Tensor]:
    return [torch.zeros(3, requires_grad=True)]


# (our class, torch's class or None when the argument is ours alone, kwargs, exception, message)
ERROR_INPUTS = [
    (ours.SGD, torch.optim.SGD, {"lr": -0.1}, ValueError, "Invalid learning rate: -0.1"),
    (ours.SGD, torch.optim.SGD, {"momentum": -0.5}, ValueError, "Invalid momentum value: -0.5"),
    (ours.SGD, torch.optim.SGD, {"weight_decay": -1e-3}, ValueError, "weight_decay value: -0.001"),
    (ours.SGD, torch.optim.SGD, {"nesterov": True}, ValueError, "Nesterov momentum requires"),
    (
        ours.SGD,
        torch.optim.SGD,
        {"nesterov": True, "momentum": 0.9, "dampening": 0.1},
        ValueError,
        "zero dampening",
    ),
    (ours.SGD, torch.optim.SGD, {"lr": torch.ones(2)}, ValueError, "Tensor lr must be 1-element"),
    (
        ours.SGD,
        torch.optim.SGD,
        {"fused": True, "foreach": True},
        RuntimeError,
        "`fused` and `foreach` cannot be `True` together",
    ),
    (ours.Momentum, None, {"momentum": 0.0}, ValueError, "Invalid momentum value: 0.0"),
    (ours.Momentum, None, {"momentum": -0.9}, ValueError, "Invalid momentum value: -0.9"),
    (ours.Adam, torch.optim.Adam, {"lr": -1.0}, ValueError, "Invalid learning rate: -1.0"),
    (ours.Adam, torch.optim.Adam, {"eps": -1e-8}, ValueError, "Invalid epsilon value: -1e-08"),
    (ours.Adam, torch.optim.Adam, {"betas": (1.0, 0.999)}, ValueError, "index 0: 1.0"),
    (ours.Adam, torch.optim.Adam, {"betas": (-0.1, 0.999)}, ValueError, "index 0: -0.1"),
    (ours.Adam, torch.optim.Adam, {"betas": (0.9, 1.5)}, ValueError, "index 1: 1.5"),
    (ours.Adam, torch.optim.Adam, {"weight_decay": -0.1}, ValueError, "weight_decay value: -0.1"),
    (
        ours.Adam,
        torch.optim.Adam,
        {"betas": (0.9, torch.tensor(0.99))},
        ValueError,
        "betas must be either both floats or both Tensors",
    ),
    (
        ours.Adam,
        torch.optim.Adam,
        {"lr": torch.tensor(0.01), "foreach": True},
        ValueError,
        "lr as a Tensor is not supported for capturable=False and foreach=True",
    ),
    (ours.AdamW, torch.optim.AdamW, {"betas": (0.9, -0.5)}, ValueError, "index 1: -0.5"),
    (ours.AdamW, torch.optim.AdamW, {"lr": -3.0}, ValueError, "Invalid learning rate: -3.0"),
    (ours.Adagrad, torch.optim.Adagrad, {"lr_decay": -0.5}, ValueError, "lr_decay value: -0.5"),
    (
        ours.Adagrad,
        torch.optim.Adagrad,
        {"initial_accumulator_value": -1.0},
        ValueError,
        "initial_accumulator_value value: -1.0",
    ),
    (ours.Adagrad, torch.optim.Adagrad, {"eps": -1.0}, ValueError, "Invalid epsilon value: -1.0"),
    (ours.RMSprop, torch.optim.RMSprop, {"alpha": -0.9}, ValueError, "Invalid alpha value: -0.9"),
    (ours.RMSprop, torch.optim.RMSprop, {"momentum": -1.0}, ValueError, "momentum value: -1.0"),
    (ours.RMSprop, torch.optim.RMSprop, {"eps": -1e-3}, ValueError, "epsilon value: -0.001"),
    (ours.Adam, None, {"backend": "cuda"}, ValueError, "Invalid backend: 'cuda'"),
    (ours.SGD, None, {"max_grad_norm": -1.0}, ValueError, "Invalid max_grad_norm value: -1.0"),
    (ours.Adam, None, {"max_grad_norm": 0.0}, ValueError, "Invalid max_grad_norm value: 0.0"),
    (ours.RMSprop, None, {"max_grad_norm": math.inf}, ValueError, "max_grad_norm value: inf"),
    (ours.Adagrad, None, {"max_grad_norm": math.nan}, ValueError, "max_grad_norm value: nan"),
    (ours.AdamW, None, {"max_grad_norm": "1"}, ValueError, "max_grad_norm value: '1'"),
]


@pytest.mark.parametrize(
    ("mine", "theirs", "kwargs", "error", "message"),
    ERROR_INPUTS,
    ids=[
        f"{row[0].__name__}-{next(iter(row[2]))}-{index}" for index, row in enumerate(ERROR_INPUTS)
    ],
)
def test_bad_argument_raises_what_torch_raises(mine, theirs, kwargs, error, message) -> None:
    with pytest.raises(error) as raised:
        mine(params(), **kwargs)
    assert message in str(raised.value)
    if theirs is not None:
        with pytest.raises(error) as expected:
            theirs(params(), **kwargs)
        assert str(raised.value) == str(expected.value)


BAD_PARAMS = [
    pytest.param(lambda: torch.zeros(3, requires_grad=True), TypeError, id="a bare tensor"),
    pytest.param(lambda: [1.0, 2.0], TypeError, id="not tensors"),
    pytest.param(lambda: [torch.zeros(3, requires_grad=True) * 2], ValueError, id="non-leaf"),
    pytest.param(
        lambda: [{"params": {torch.zeros(3, requires_grad=True)}}], TypeError, id="a set in a group"
    ),
    pytest.param(lambda: 42, TypeError, id="not iterable"),
]


@pytest.mark.parametrize("cls", [ours.SGD, ours.Adam, ours.RMSprop, ours.Adagrad])
@pytest.mark.parametrize(("bad", "error"), BAD_PARAMS)
def test_bad_params_raise_what_torch_raises(cls, bad, error) -> None:
    theirs = getattr(torch.optim, "SGD" if cls is ours.SGD else cls.__name__)
    with pytest.raises(error) as raised:
        cls(bad())
    with pytest.raises(error) as expected:
        theirs(bad())
    assert str(raised.value) == str(expected.value)
