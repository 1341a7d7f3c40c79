"""``@torch.compile def step(): opt.step()`` works for every optimizer and matches the eager step.

A compiled step traces the torch reference update (the Triton kernels are opaque to Dynamo) and
records that in ``backend_info()``. Tolerance: float32 to rtol/atol 1e-6 (Inductor may fuse and
reorder the update's float32 arithmetic).
"""

from __future__ import annotations

import pytest
import torch

import torchopt_lab
import torchopt_lab.optim as ours

CONFIGS = [
    (ours.SGD, {"lr": 0.1, "momentum": 0.9, "dampening": 0.1, "weight_decay": 0.01}),
    (ours.Momentum, {"lr": 0.05, "momentum": 0.8, "nesterov": True}),
    (ours.Adagrad, {"lr": 0.1, "lr_decay": 0.01, "weight_decay": 0.01}),
    (ours.RMSprop, {"lr": 0.01, "momentum": 0.5, "centered": True}),
    (ours.Adam, {"lr": 0.01, "amsgrad": True, "weight_decay": 0.1}),
    (ours.AdamW, {"lr": 0.01, "maximize": True}),
]
STEPS = 3


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    # Each test compiles its own step; without a reset, Dynamo's recompile limit (8 per code
    # object) would make later tests run eagerly and pass without compiling anything.
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _train(cls, options, compiled: bool, **extra):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 2))
    optimizer = cls(model.parameters(), **options, **extra)

    def step():
        optimizer.step()

    run = torch.compile(step, fullgraph=False) if compiled else step
    for index in range(STEPS):
        torch.manual_seed(index)
        model(torch.randn(4, 6)).pow(2).sum().backward()
        run()
        optimizer.zero_grad()
    return [p.detach().clone() for p in model.parameters()], optimizer


@pytest.mark.parametrize(("cls", "options"), CONFIGS, ids=[c.__name__ for c, _ in CONFIGS])
def test_compiled_step_matches_eager(cls, options):
    eager, _ = _train(cls, options, compiled=False, backend="torch")
    torch._dynamo.utils.counters.clear()
    compiled, _ = _train(cls, options, compiled=True, backend="torch")
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0  # it did compile
    for a, b in zip(compiled, eager, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_compiled_step_with_clipping_traces_the_torch_path_and_says_so():
    options = {"lr": 0.01, "max_grad_norm": 0.05}
    eager, _ = _train(ours.Adam, options, compiled=False, backend="torch")
    compiled, _ = _train(ours.Adam, options, compiled=True, backend="triton")
    for a, b in zip(compiled, eager, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    decision = torchopt_lab.backend_info()["decisions"]["optim.Adam"]
    assert decision["backend"] == "torch"
    assert "torch.compile" in decision["reason"]
