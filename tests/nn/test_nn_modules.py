"""``torchopt_lab.nn`` modules interchange with ``torch.nn``: same initialisation, state_dict keys
and repr; a torch model's state_dict loads into ours and both train identically."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn as tnn

import torchopt_lab.nn as onn
import torchopt_lab.nn.functional as F

# (name, constructor arguments) for every module
MODULES: list[tuple[str, tuple, dict]] = [
    ("Linear", (4, 3), {}),
    ("Linear", (4, 3), {"bias": False}),
    ("Conv2d", (2, 4, 3), {"stride": 2, "padding": 1}),
    ("Conv2d", (4, 4, (3, 2)), {"padding": "same", "groups": 2, "bias": False}),
    ("Conv2d", (2, 3, 3), {"padding": 1, "padding_mode": "reflect"}),
    ("ReLU", (), {"inplace": True}),
    ("LeakyReLU", (0.2,), {}),
    ("Sigmoid", (), {}),
    ("Tanh", (), {}),
    ("GELU", (), {"approximate": "tanh"}),
    ("Softmax", (), {"dim": 1}),
    ("LogSoftmax", (), {"dim": -1}),
    ("MSELoss", (), {"reduction": "sum"}),
    ("CrossEntropyLoss", (), {"label_smoothing": 0.1, "ignore_index": 2}),
    ("LayerNorm", ((3, 4),), {"eps": 1e-3}),
    ("LayerNorm", (4,), {"elementwise_affine": False}),
    ("BatchNorm1d", (3,), {"momentum": None}),
    ("BatchNorm2d", (3,), {"affine": False, "track_running_stats": False}),
    ("Dropout", (0.2,), {}),
]


@pytest.mark.parametrize(
    ("name", "args", "kwargs"), MODULES, ids=[f"{m[0]}-{i}" for i, m in enumerate(MODULES)]
)
def test_module_initialises_like_torch_nn(name: str, args: tuple, kwargs: dict) -> None:
    torch.manual_seed(0)
    ours = getattr(onn, name)(*args, **kwargs)
    torch.manual_seed(0)
    theirs = getattr(tnn, name)(*args, **kwargs)
    assert isinstance(ours, getattr(tnn, name))
    assert repr(ours) == repr(theirs)
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    for key, value in theirs.state_dict().items():
        torch.testing.assert_close(ours.state_dict()[key], value, rtol=0, atol=0)


def _inputs(*shape: int) -> Callable[[], tuple[torch.Tensor, ...]]:
    return lambda: (torch.randn(shape, requires_grad=True),)


# (name, constructor arguments, example inputs) for every module's forward and backward
CALLS: list[tuple[str, tuple, dict, Callable[[], tuple[torch.Tensor, ...]]]] = [
    ("Linear", (4, 3), {}, _inputs(2, 5, 4)),
    ("Conv2d", (2, 4, 3), {"stride": 2, "padding": 1}, _inputs(2, 2, 6, 6)),
    ("Conv2d", (4, 4, (3, 2)), {"padding": "same", "groups": 2}, _inputs(1, 4, 5, 5)),
    ("Conv2d", (2, 3, 3), {"padding": 1, "padding_mode": "reflect"}, _inputs(1, 2, 5, 5)),
    ("Conv2d", (2, 3, 3), {"padding": (1, 2), "padding_mode": "circular"}, _inputs(2, 5, 5)),
    ("LeakyReLU", (0.2,), {}, _inputs(3, 4)),
    ("Sigmoid", (), {}, _inputs(3, 4)),
    ("Tanh", (), {}, _inputs(3, 4)),
    ("GELU", (), {"approximate": "tanh"}, _inputs(3, 4)),
    ("Softmax", (), {"dim": 1}, _inputs(3, 4)),
    ("LogSoftmax", (), {"dim": -1}, _inputs(3, 4)),
    (
        "MSELoss",
        (),
        {"reduction": "sum"},
        lambda: (torch.randn(3, 4, requires_grad=True), torch.randn(3, 4)),
    ),
    (
        "CrossEntropyLoss",
        (),
        {"label_smoothing": 0.1, "ignore_index": 2, "weight": torch.rand(4) + 0.5},
        lambda: (torch.randn(5, 4, requires_grad=True), torch.tensor([0, 1, 2, 3, 2])),
    ),
    ("LayerNorm", ((3, 4),), {"eps": 1e-3}, _inputs(2, 3, 4)),
    ("BatchNorm1d", (3,), {"momentum": None}, _inputs(4, 3, 2)),
    ("BatchNorm2d", (3,), {"affine": False, "track_running_stats": False}, _inputs(2, 3, 2, 2)),
    ("Dropout", (0.2,), {}, _inputs(4, 5)),
]


@pytest.mark.parametrize(
    ("name", "args", "kwargs", "inputs"), CALLS, ids=[f"{c[0]}-{i}" for i, c in enumerate(CALLS)]
)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
# torch.nn, the oracle, warns about its own implementation of padding="same" with an even kernel.
@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel lengths:UserWarning")
def test_module_forward_and_backward_match_torch_nn(
    name: str, args: tuple, kwargs: dict, inputs: Callable, training: bool
) -> None:
    torch.manual_seed(0)
    ours = getattr(onn, name)(*args, **kwargs).train(training)
    theirs = getattr(tnn, name)(*args, **kwargs).train(training)
    theirs.load_state_dict(ours.state_dict())
    results = []
    for module in (ours, theirs):
        torch.manual_seed(1)
        arguments = inputs()
        torch.manual_seed(2)
        output = module(*arguments)
        grads = torch.autograd.grad(
            (output * torch.linspace(-1, 1, output.numel()).view(output.shape)).sum(),
            [arguments[0], *module.parameters()],
        )
        results.append((output, grads, module.state_dict()))
    torch.testing.assert_close(results[0], results[1], rtol=1e-5, atol=1e-6)


def mlp(nn) -> tnn.Module:
    return nn.Sequential(
        nn.Linear(6, 16),
        nn.LayerNorm(16),
        nn.GELU(),
        nn.Dropout(0.2),
        nn.Linear(16, 16),
        nn.BatchNorm1d(16, momentum=None),
        nn.Tanh(),
        nn.Linear(16, 8),
        nn.LeakyReLU(0.1),
        nn.Linear(8, 5),
    )


def cnn(nn) -> tnn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1),
        nn.BatchNorm2d(6),
        nn.ReLU(inplace=True),
        nn.Conv2d(6, 4, 3, stride=2, padding=1, groups=2),
        nn.Sigmoid(),
        tnn.Flatten(),
        nn.Linear(4 * 4 * 4, 5),
    )


def _train(
    model: tnn.Module, loss_fn: tnn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]]
) -> list[torch.Tensor]:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    losses = []
    for step, (data, target) in enumerate(batches):
        torch.manual_seed(100 + step)
        optimizer.zero_grad()
        loss = loss_fn(model(data), target)
        loss.backward()
        optimizer.step()
        losses.append(loss.detach())
    return losses


@pytest.mark.parametrize(
    ("build", "shape", "loss"),
    [
        (mlp, (8, 6), "CrossEntropyLoss"),
        (cnn, (4, 3, 8, 8), "CrossEntropyLoss"),
        (mlp, (8, 6), "MSELoss"),
    ],
    ids=["mlp-cross_entropy", "cnn-cross_entropy", "mlp-mse"],
)
def test_torch_state_dict_loads_and_models_train_identically(
    build: Callable, shape: tuple[int, ...], loss: str
) -> None:
    torch.manual_seed(0)
    theirs = build(tnn)
    ours = build(onn)
    ours.load_state_dict(theirs.state_dict())
    generator = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(4):
        data = torch.randn(shape, generator=generator)
        if loss == "CrossEntropyLoss":
            target = torch.randint(0, 5, (shape[0],), generator=generator)
        else:
            target = torch.randn(shape[0], 5, generator=generator)
        batches.append((data, target))
    their_losses = _train(theirs, getattr(tnn, loss)(), batches)
    our_losses = _train(ours, getattr(onn, loss)(), batches)
    torch.testing.assert_close(our_losses, their_losses, rtol=1e-5, atol=1e-6)
    for key, value in theirs.state_dict().items():
        torch.testing.assert_close(ours.state_dict()[key], value, rtol=1e-5, atol=1e-6)
    theirs.eval()
    ours.eval()
    torch.testing.assert_close(ours(batches[0][0]), theirs(batches[0][0]), rtol=1e-5, atol=1e-6)


def test_hessian_vector_product_matches_torch() -> None:
    torch.manual_seed(0)
    theirs = torch.nn.Sequential(tnn.Linear(5, 7), tnn.LayerNorm(7), tnn.Tanh(), tnn.Linear(7, 4))
    ours = onn.Sequential(onn.Linear(5, 7), onn.LayerNorm(7), onn.Tanh(), onn.Linear(7, 4))
    ours.load_state_dict(theirs.state_dict())
    data, target = torch.randn(6, 5), torch.tensor([0, 1, 2, 3, 1, 2])
    direction = [torch.randn_like(p) for p in theirs.parameters()]

    def hvp(model: tnn.Module, loss_fn: Callable) -> list[torch.Tensor]:
        params = list(model.parameters())
        grads = torch.autograd.grad(loss_fn(model(data), target), params, create_graph=True)
        dot = sum((g * v).sum() for g, v in zip(grads, direction, strict=True))
        return list(torch.autograd.grad(dot, params))

    torch.testing.assert_close(
        hvp(ours, F.cross_entropy), hvp(theirs, tnn.functional.cross_entropy), rtol=1e-5, atol=1e-6
    )


@pytest.mark.parametrize(
    ("ours", "theirs"),
    [
        (lambda t: F.relu(t, inplace=True), lambda t: tnn.functional.relu(t, inplace=True)),
        (
            lambda t: F.leaky_relu(t, 0.3, inplace=True),
            lambda t: tnn.functional.leaky_relu(t, 0.3, inplace=True),
        ),
        (
            lambda t: F.dropout(t, 0.4, inplace=True),
            lambda t: tnn.functional.dropout(t, 0.4, inplace=True),
        ),
    ],
    ids=["relu", "leaky_relu", "dropout"],
)
def test_inplace_functions_modify_their_input_and_match_torch(
    ours: Callable, theirs: Callable
) -> None:
    leaf = torch.randn(4, 5, requires_grad=True)
    grads, outputs = [], []
    for fn in (ours, theirs):
        torch.manual_seed(0)
        input = leaf * 1
        output = fn(input)
        assert output.data_ptr() == input.data_ptr()
        outputs.append(output.detach().clone())
        (grad,) = torch.autograd.grad((output * torch.arange(20.0).view(4, 5)).sum(), leaf)
        grads.append(grad)
    torch.testing.assert_close(outputs[0], outputs[1], rtol=0, atol=0)
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=0)


@pytest.mark.parametrize("momentum", [0.1, None])
def test_batch_norm_running_statistics_follow_torch(momentum: float | None) -> None:
    ours, theirs = onn.BatchNorm2d(3, momentum=momentum), tnn.BatchNorm2d(3, momentum=momentum)
    for step in range(3):
        data = torch.randn(4, 3, 2, 2) * (step + 1) + step
        ours(data)
        theirs(data)
    for key, value in theirs.state_dict().items():
        torch.testing.assert_close(ours.state_dict()[key], value, rtol=1e-6, atol=1e-7)
    assert int(ours.num_batches_tracked) == 3


def _pickled_model() -> tuple[tnn.Module, bytes]:
    torch.manual_seed(0)
    model = onn.Sequential(onn.Linear(3, 4), onn.ReLU(), onn.LayerNorm(4), onn.Linear(4, 2))
    import pickle

    return model, pickle.dumps(model, protocol=2)  # torch.save's protocol


def test_a_pickled_model_names_the_public_module_of_its_layers() -> None:
    _, data = _pickled_model()
    assert b"ctorchopt_lab.nn\nLinear\n" in data and b"torchopt_lab.nn._" not in data


def test_a_model_pickled_when_the_layers_lived_in_nn_modules_still_loads() -> None:
    import pickle

    model, data = _pickled_model()
    old = data.replace(b"ctorchopt_lab.nn\n", b"ctorchopt_lab.nn.modules\n")
    assert old != data
    loaded = pickle.loads(old)
    x = torch.randn(5, 3)
    assert type(loaded[0]) is onn.Linear
    torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
