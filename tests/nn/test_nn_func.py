"""``torch.func`` transforms through ``torchopt_lab.nn`` match the same transforms through
``torch.nn`` in float64: ``grad``, ``vmap`` (per-sample gradients) and ``jacrev`` on both paths
(the Triton path under the interpreter), ``jvp``/``jacfwd`` and ``hessian`` on the torch path; the
Triton path, first-order, refuses forward mode and a second derivative with an error naming the
op and the torch path. Tolerances: float64 with the same formulas up to rounding, 1e-10."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
import torch.nn.functional as TF
from torch.func import functional_call, grad, hessian, jacfwd, jacrev, jvp, vjp, vmap

import torchopt_lab.nn as nn
import torchopt_lab.nn.functional as F
from torchopt_lab import backend

TOLERANCE = {"rtol": 1e-10, "atol": 1e-10}
PATHS = ["torch", "triton"]


@pytest.fixture(autouse=True)
def _torch_path(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv(backend.ENV_VAR, "torch")
    yield


def _use(monkeypatch: pytest.MonkeyPatch, path: str) -> None:
    monkeypatch.setenv(backend.ENV_VAR, path)


def x64(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, dtype=torch.float64)


# (name, function of one float64 tensor built from the namesake in `module`)
OPS: list[tuple[str, Callable[[Any, torch.Tensor], torch.Tensor], Callable[[], torch.Tensor]]] = [
    ("linear", lambda m, x: m.linear(x, W, B), lambda: x64(3, 4)),
    ("conv2d", lambda m, x: m.conv2d(x, K, KB, padding="same"), lambda: x64(2, 2, 4, 4)),
    ("relu", lambda m, x: m.relu(x), lambda: x64(3, 4)),
    ("leaky_relu", lambda m, x: m.leaky_relu(x, 0.2), lambda: x64(3, 4)),
    ("sigmoid", lambda m, x: m.sigmoid(x), lambda: x64(3, 4)),
    ("tanh", lambda m, x: m.tanh(x), lambda: x64(3, 4)),
    ("gelu", lambda m, x: m.gelu(x), lambda: x64(3, 4)),
    ("gelu_tanh", lambda m, x: m.gelu(x, approximate="tanh"), lambda: x64(3, 4)),
    ("softmax", lambda m, x: m.softmax(x, dim=1), lambda: x64(3, 4)),
    ("log_softmax", lambda m, x: m.log_softmax(x, dim=1), lambda: x64(3, 4)),
    ("layer_norm", lambda m, x: m.layer_norm(x, [4], LW, LB), lambda: x64(3, 4)),
    (
        "batch_norm",
        lambda m, x: m.batch_norm(x, None, None, BW, BB, training=True),
        lambda: x64(3, 4),
    ),
    (
        "batch_norm_eval",
        lambda m, x: m.batch_norm(x, RM, RV, BW, BB, training=False),
        lambda: x64(3, 4),
    ),
    ("mse_loss", lambda m, x: m.mse_loss(x, T, weight=MW), lambda: x64(3, 4)),
    (
        "cross_entropy",
        lambda m, x: m.cross_entropy(x, LABELS, weight=CW, label_smoothing=0.1),
        lambda: x64(3, 4),
    ),
    (
        "cross_entropy_probabilities",
        lambda m, x: m.cross_entropy(x, PROBS, label_smoothing=0.1),
        lambda: x64(3, 4),
    ),
]
torch.manual_seed(0)
W, B = x64(5, 4), x64(5)
K, KB = x64(3, 2, 3, 3), x64(3)
LW, LB, BW, BB, RM, RV = x64(4), x64(4), x64(4), x64(4), x64(4), x64(4).exp()
T, MW, CW = x64(3, 4), x64(3, 4).exp(), x64(4).exp()
LABELS, PROBS = torch.tensor([0, 3, -100]), torch.softmax(x64(3, 4), 1)
IDS = [op[0] for op in OPS]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("op", OPS, ids=IDS)
def test_jacrev_matches_torch(op, path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    _use(monkeypatch, path)
    _, fn, make = op
    x = make()
    torch.testing.assert_close(
        jacrev(lambda x: fn(F, x))(x), jacrev(lambda x: fn(TF, x))(x), **TOLERANCE
    )


@pytest.mark.parametrize("op", OPS, ids=IDS)
def test_jvp_and_jacfwd_match_torch(op) -> None:
    _, fn, make = op
    x, tangent = make(), make()
    ours, theirs = (
        jvp(lambda x: fn(F, x), (x,), (tangent,)),
        jvp(lambda x: fn(TF, x), (x,), (tangent,)),
    )
    torch.testing.assert_close(ours, theirs, **TOLERANCE)
    torch.testing.assert_close(
        jacfwd(lambda x: fn(F, x))(x), jacfwd(lambda x: fn(TF, x))(x), **TOLERANCE
    )


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("op", OPS, ids=IDS)
def test_vmap_matches_torch(op, path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    _use(monkeypatch, path)
    _, fn, make = op
    xs = torch.stack([make(), make()])
    torch.testing.assert_close(
        vmap(lambda x: fn(F, x))(xs), vmap(lambda x: fn(TF, x))(xs), **TOLERANCE
    )


def _models(
    build: Callable[[Any], torch.nn.Module],
) -> tuple[torch.nn.Module, torch.nn.Module]:
    torch.manual_seed(1)
    theirs = build(torch.nn).double()
    ours = build(nn).double()
    ours.load_state_dict(theirs.state_dict())
    return ours.eval(), theirs.eval()


def _mlp(module: Any) -> torch.nn.Module:
    return module.Sequential(
        module.Linear(4, 6),
        module.GELU(),
        module.LayerNorm(6),
        module.Linear(6, 6),
        module.Tanh(),
        module.Linear(6, 3),
    )


def _cnn(module: Any) -> torch.nn.Module:
    return module.Sequential(
        module.Conv2d(2, 3, 3, padding=1),
        module.BatchNorm2d(3),
        module.ReLU(),
        module.Conv2d(3, 2, 3),
    )


def _loss(model: torch.nn.Module, functional: Any) -> Callable[..., torch.Tensor]:
    def loss(params: dict[str, torch.Tensor], x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        output = functional_call(model, params, (x,))
        if output.dim() > 2:
            return functional.mse_loss(output, t)
        return functional.cross_entropy(output, t)

    return loss


MODELS = {
    "mlp": (_mlp, lambda: (x64(5, 4), torch.tensor([0, 1, 2, 1, 0]))),
    "cnn": (_cnn, lambda: (x64(5, 2, 4, 4), x64(5, 2, 2, 2))),
}


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("name", MODELS)
def test_grad_and_per_sample_gradients_match_torch_nn(
    name: str, path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    _use(monkeypatch, path)
    build, data = MODELS[name]
    ours, theirs = _models(build)
    x, t = data()
    params = {k: v.detach() for k, v in theirs.named_parameters()}
    losses = _loss(ours, F), _loss(theirs, TF)
    torch.testing.assert_close(
        grad(losses[0])(params, x, t), grad(losses[1])(params, x, t), **TOLERANCE
    )

    def per_sample(loss: Callable[..., torch.Tensor]) -> dict[str, torch.Tensor]:
        one = lambda p, x, t: loss(p, x.unsqueeze(0), t.unsqueeze(0))  # noqa: E731
        return vmap(grad(one), in_dims=(None, 0, 0))(params, x, t)

    ours_per_sample, theirs_per_sample = per_sample(losses[0]), per_sample(losses[1])
    torch.testing.assert_close(ours_per_sample, theirs_per_sample, **TOLERANCE)
    # per-sample gradients average to the batch gradient (the losses are means over samples)
    if name == "mlp":
        batch = grad(losses[0])(params, x, t)
        mean = {k: v.mean(0) for k, v in ours_per_sample.items()}
        torch.testing.assert_close(mean, batch, **TOLERANCE)


def test_hessian_of_a_model_matches_torch_nn() -> None:
    ours, theirs = _models(_mlp)
    x, t = MODELS["mlp"][1]()
    x = x[:2]
    losses = _loss(ours, F), _loss(theirs, TF)
    params = {k: v.detach() for k, v in theirs.named_parameters()}
    hessians = [hessian(lambda x, loss=loss: loss(params, x, t[:2]))(x) for loss in losses]
    torch.testing.assert_close(hessians[0], hessians[1], **TOLERANCE)
    weight = params["5.weight"]

    def by_weight(loss: Callable[..., torch.Tensor]) -> torch.Tensor:
        return hessian(lambda w: loss({**params, "5.weight": w}, x, t[:2]))(weight)

    torch.testing.assert_close(by_weight(losses[0]), by_weight(losses[1]), **TOLERANCE)


@pytest.mark.parametrize("bad", [4, -5])
def test_vmapped_cross_entropy_refuses_an_out_of_range_target(bad: int) -> None:
    targets = torch.tensor([[0, 1, 2], [0, bad, 1]])
    with pytest.raises(RuntimeError, match="out of bounds"):
        vmap(lambda x, t: F.cross_entropy(x, t))(x64(2, 3, 4), targets)


@pytest.mark.parametrize(
    "op", [op for op in OPS if op[0] not in ("linear", "conv2d", "mse_loss")], ids=lambda op: op[0]
)
def test_triton_path_refuses_forward_mode_naming_the_op_and_the_torch_path(
    op, monkeypatch: pytest.MonkeyPatch
) -> None:
    _use(monkeypatch, "triton")
    name, fn, make = op
    x = make()
    op_name = name.removesuffix("_eval").removesuffix("_tanh").removesuffix("_probabilities")
    message = rf"nn\.{op_name}: the Triton path is first-order.*{backend.ENV_VAR}=torch"
    with pytest.raises(RuntimeError, match=message):
        jvp(lambda x: fn(F, x), (x,), (make(),))
    with pytest.raises(RuntimeError, match=message):
        jacfwd(lambda x: fn(F, x))(x)
    with pytest.raises(RuntimeError, match=message):
        hessian(lambda x: fn(F, x).sum())(x)


def test_triton_path_refuses_a_second_reverse_derivative(monkeypatch: pytest.MonkeyPatch) -> None:
    _use(monkeypatch, "triton")
    x = x64(3, 4)
    # grad of grad: the inner backward would run under a second differentiating level
    with pytest.raises(RuntimeError, match=f"differentiable once.*{backend.ENV_VAR}=torch"):
        grad(lambda x: grad(lambda x: F.gelu(x).sum())(x).sum())(x)


FIRST_ORDER_OPS = [op for op in OPS if op[0] not in ("linear", "conv2d", "mse_loss")]


@pytest.mark.parametrize("op", FIRST_ORDER_OPS, ids=lambda op: op[0])
def test_triton_path_vjp_matches_torch_and_grad_of_vjp_is_refused(
    op, monkeypatch: pytest.MonkeyPatch
) -> None:
    # torch.func differentiates with create_graph=True: one vjp level is first order (exact);
    # a vjp under grad differentiates the pullback again, which the Triton backward cannot.
    _, fn, make = op
    torch.manual_seed(0)
    x = make()
    cotangent = torch.randn_like(fn(F, x))
    pulled = {}
    for path in PATHS:
        _use(monkeypatch, path)
        _, pullback = vjp(lambda x: fn(F, x), x)
        (pulled[path],) = pullback(cotangent)
    torch.testing.assert_close(pulled["triton"], pulled["torch"], **TOLERANCE)

    def vjp_sum(x: torch.Tensor) -> torch.Tensor:
        return vjp(lambda x: fn(F, x), x)[1](cotangent)[0].sum()

    _use(monkeypatch, "torch")
    grad(vjp_sum)(x)  # the torch path is twice differentiable
    _use(monkeypatch, "triton")
    with pytest.raises(RuntimeError, match=f"differentiable once.*{backend.ENV_VAR}=torch"):
        grad(vjp_sum)(x)


@pytest.mark.parametrize("path", PATHS)
def test_dropout_under_vmap_follows_torchs_randomness_rules(
    path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    _use(monkeypatch, path)
    x = torch.ones(4, 64, dtype=torch.float64)
    for module in (F, TF):
        with pytest.raises(RuntimeError, match="randomness error mode"):
            vmap(lambda x, module=module: module.dropout(x, 0.5))(x)
    same = vmap(lambda x: F.dropout(x, 0.5), randomness="same")(x)
    different = vmap(lambda x: F.dropout(x, 0.5), randomness="different")(x)
    for output in (same, different):
        assert set(output.unique().tolist()) <= {0.0, 2.0}
    # one mask for every slice, or one per slice (equal by chance with probability 2^-64 each)
    assert (same == same[0]).all()
    assert not (different == different[0]).all(dim=1)[1:].any()
    # per-sample gradients through dropout: each slice's gradient is its own mask / (1 - p)
    per_sample = vmap(grad(lambda x: F.dropout(x, 0.5).sum()), randomness="different")(x)
    assert set(per_sample.unique().tolist()) <= {0.0, 2.0}
    assert not (per_sample == per_sample[0]).all(dim=1)[1:].any()
