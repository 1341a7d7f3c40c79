"""The hypergradient experiment's mechanism: a learning rate given as a tensor to a
``differentiable=True`` step gets, from autograd, the derivative of the next loss with respect to
it, which equals the closed form of Baydin et al. (2018) and torch.optim's own differentiable
step's. Float64 throughout; the closed-form bound is float64 rounding of a dot product."""

from __future__ import annotations

import contextlib
import importlib
import sys
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

EXPERIMENTS = Path(__file__).resolve().parents[2] / "experiments"
STEPS = 12
# |h_autograd - h_closed| / (|g_t| |u_t-1|): a float64 dot product's rounding, with margin.
ROUNDING = 1e-12


@pytest.fixture
def hypergradient(monkeypatch):
    """The experiment module, imported as its script does (experiments/ first on sys.path), and
    forgotten afterwards with its ``common``, as test_experiments.py's fixture expects."""
    monkeypatch.syspath_prepend(str(EXPERIMENTS))
    yield importlib.import_module("hypergradient")
    sys.modules.pop("hypergradient", None)
    sys.modules.pop("common", None)


class _NoLogging:
    def step(self, loss):
        return contextlib.nullcontext()

    def log_scalars(self, scalars, step=None):
        pass

    def finish(self, metrics):
        pass


def _small_problem(hypergradient):
    from torchopt_lab.data import load_digits_split

    data = load_digits_split(seed=0, dtype=torch.float64)
    torch.manual_seed(0)
    model = hypergradient.build((8,)).to(torch.float64)
    order = torch.Generator().manual_seed(0)
    batches = [
        torch.randperm(data.train_inputs.shape[0], generator=order)[:32] for _ in range(STEPS)
    ]
    return model, batches, data


# The paper's beta for each optimizer, large enough here that a wrong h_t changes the trajectory.
BETA = {"sgd": 1e-3, "adam": 1e-7}
LR0 = {"sgd": 0.05, "adam": 1e-3}


@pytest.mark.parametrize("name", ["sgd", "adam"])
def test_autograd_hypergradient_through_a_differentiable_step_equals_the_closed_form(
    name, hypergradient
) -> None:
    model, batches, data = _small_problem(hypergradient)
    run = hypergradient.Run(name, LR0[name], hyper=True)
    hypergradient.train(run, model, batches, data, BETA[name], lambda named, opt: _NoLogging())
    assert len(run.hypergradients) == STEPS - 1
    assert all(h != 0 for h in run.hypergradients)
    assert run.closed_form_gap <= ROUNDING, run.closed_form_gap
    assert run.lrs[-1] != LR0[name]  # the learned rate moved


@pytest.mark.parametrize("name", ["sgd", "adam"])
def test_differentiable_step_gives_torch_optims_hypergradient(name, hypergradient) -> None:
    """Our optimizer's differentiable step and torch.optim's, each learning its rate by
    hypergradient descent from the same weights and minibatches, agree step by step."""
    torch_class = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam}[name]
    runs = {}
    for source, factory in (
        ("ours", hypergradient.make_optimizer),
        ("torch", lambda _, params, lr, hyper: torch_class(params, lr=lr, differentiable=hyper)),
    ):
        model, batches, data = _small_problem(hypergradient)
        run = hypergradient.Run(name, LR0[name], hyper=True)
        runs[source] = hypergradient.train(
            run, model, batches, data, BETA[name], lambda named, opt: _NoLogging(), factory
        )
    ours, theirs = runs["ours"], runs["torch"]
    for field in ("hypergradients", "lrs", "losses"):
        torch.testing.assert_close(
            torch.tensor(getattr(ours, field)),
            torch.tensor(getattr(theirs, field)),
            rtol=1e-12,
            atol=0,
            msg=lambda message, field=field: f"{field}: {message}",
        )


def test_hypergradient_runs_log_the_learned_lr_and_the_hypergradient(
    hypergradient, tmp_path
) -> None:
    from torchopt_lab.tracking import TrainingLogger

    model, batches, data = _small_problem(hypergradient)
    run = hypergradient.Run("sgd", LR0["sgd"], hyper=True)
    hypergradient.train(
        run,
        model,
        batches,
        data,
        BETA["sgd"],
        lambda named, opt: TrainingLogger(tmp_path, named, opt, histogram_every=0),
    )
    accumulator = EventAccumulator(str(tmp_path), size_guidance={"scalars": 0})
    accumulator.Reload()
    lrs = [event.value for event in accumulator.Scalars("lr/group_0")]
    hypergradients = [event.value for event in accumulator.Scalars("hypergradient/lr")]
    torch.testing.assert_close(torch.tensor(lrs), torch.tensor(run.lrs, dtype=torch.float32))
    torch.testing.assert_close(
        torch.tensor(hypergradients), torch.tensor(run.hypergradients, dtype=torch.float32)
    )
    assert len(accumulator.Scalars("train/loss")) == STEPS
