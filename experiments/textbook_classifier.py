"""Experiment 2: the textbook classifier, ours against PyTorch's.

Claim: the classifier of every introductory course, input -> Dense 10 ReLU -> Dense 10 softmax,
trained with cross-entropy and Adam, follows the same trajectory when built from
``torchopt_lab.nn`` + ``torchopt_lab.optim`` as when built from ``torch.nn`` + ``torch.optim``,
started from the same initial weights and fed the same minibatches: every step's loss and the
final weights agree to ``tolerance`` (relative, float64), and it learns the 8x8 digits (validation
accuracy >= ``min_accuracy``).

The softmax and the cross-entropy are fused in ``CrossEntropyLoss`` (log-softmax + negative log
likelihood, as in every library, for numerical stability); the softmax layer ``Softmax(dim=1)``
turns the logits into the class probabilities at evaluation, and those are compared too.

    python experiments/textbook_classifier.py            # full run
    python experiments/textbook_classifier.py --smoke    # small budget
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass

import common
import torch

from torchopt_lab import nn, optim
from torchopt_lab.data import load_digits_split
from torchopt_lab.tracking import TrainingLogger

NAME = "textbook_classifier"
CLAIM = (
    "input -> Dense 10 ReLU -> Dense 10 softmax with cross-entropy and Adam follows the same "
    "trajectory in torchopt_lab.nn + torchopt_lab.optim as in torch.nn + torch.optim from the "
    "same initial weights, and learns the digits"
)


@dataclass
class Config:
    hidden: int = 10  # units of the hidden Dense + ReLU layer
    epochs: int = 30  # passes over the training split
    batch_size: int = 32  # minibatch size (the last, smaller batch of an epoch is dropped)
    lr: float = 0.01  # Adam's learning rate (betas, eps: torch's defaults)
    dtype: str = "float64"  # float64 makes any difference in the math visible above rounding
    tolerance: float = 1e-12  # max relative difference of losses and final weights allowed
    min_accuracy: float = 0.9  # validation accuracy the classifier must reach
    seed: int = 0  # seeds the split, the initial weights and the minibatch order
    out: str = ""  # output directory (default: runs/experiments/textbook_classifier)


SMOKE = {"epochs": 2, "min_accuracy": 0.5}
# Knobs whose bounds differ from "> 0 like their default" (see common.parse_config).
BOUNDS = {"min_accuracy": "(0,1]"}


def build(layers, hidden: int, softmax: bool = False):
    """``Linear(64, hidden) -> ReLU -> Linear(hidden, 10)`` (-> ``Softmax``) from ``layers``."""
    modules = [layers.Linear(64, hidden), layers.ReLU(), layers.Linear(hidden, 10)]
    return (
        layers.Sequential(*modules, layers.Softmax(dim=1))
        if softmax
        else layers.Sequential(*modules)
    )


def main(argv: list[str] | None = None) -> int:
    config, smoke = common.parse_config(Config, argv, SMOKE, __doc__, BOUNDS)
    out = common.start(NAME, CLAIM, config)
    common.seed_everything(config.seed)
    dtype = getattr(torch, config.dtype)
    data = load_digits_split(seed=config.seed, dtype=dtype)

    reference = build(torch.nn, config.hidden).to(dtype)
    ours = build(nn, config.hidden).to(dtype)
    ours.load_state_dict(reference.state_dict())
    runs = {
        "ours": (ours, nn.CrossEntropyLoss(), optim.Adam(ours.parameters(), lr=config.lr)),
        "torch": (
            reference,
            torch.nn.CrossEntropyLoss(),
            torch.optim.Adam(reference.parameters(), lr=config.lr),
        ),
    }
    loggers = {
        name: TrainingLogger(
            out / name, model, optimizer, config={**dataclasses.asdict(config), "layers": name}
        )
        for name, (model, _, optimizer) in runs.items()
    }
    losses: dict[str, list[float]] = {"ours": [], "torch": []}
    order = torch.Generator().manual_seed(config.seed)
    samples = data.train_inputs.shape[0]
    batches = samples // config.batch_size
    for _ in range(config.epochs):
        permutation = torch.randperm(samples, generator=order)
        for batch in range(batches):
            index = permutation[batch * config.batch_size : (batch + 1) * config.batch_size]
            for name, (model, loss_fn, optimizer) in runs.items():
                optimizer.zero_grad()
                loss = loss_fn(model(data.train_inputs[index]), data.train_labels[index])
                loss.backward()
                with loggers[name].step(loss):
                    optimizer.step()
                losses[name].append(loss.item())

    loss_gap = max(
        abs(a - b) / abs(b) for a, b in zip(losses["ours"], losses["torch"], strict=True)
    )
    weight_gap = max(
        ((a - b).abs().max() / b.abs().max()).item()
        for a, b in zip(ours.parameters(), reference.parameters(), strict=True)
    )
    probabilities = {}
    accuracy = {}
    with torch.no_grad():
        for name, layers, model in (("ours", nn, ours), ("torch", torch.nn, reference)):
            probabilities[name] = layers.Softmax(dim=1)(model(data.val_inputs))
            accuracy[name] = (
                (probabilities[name].argmax(dim=1) == data.val_labels).double().mean().item()
            )
    probability_gap = (probabilities["ours"] - probabilities["torch"]).abs().max().item()
    for name in runs:
        loggers[name].finish({"val_accuracy": accuracy[name], "final_loss": losses[name][-1]})

    pyplot = common.pyplot()
    figure, (loss_axes, gap_axes) = pyplot.subplots(1, 2, figsize=(10, 4))
    loss_axes.plot(
        losses["torch"], color="C0", linewidth=3, alpha=0.4, label="torch.nn + torch.optim"
    )
    loss_axes.plot(losses["ours"], color="C3", linewidth=0.8, label="torchopt_lab")
    loss_axes.set(
        xlabel="step", ylabel="minibatch cross-entropy", yscale="log", title="training loss"
    )
    loss_axes.legend()
    gaps = [
        abs(a - b) / abs(b) + 1e-300 for a, b in zip(losses["ours"], losses["torch"], strict=True)
    ]
    gap_axes.plot(gaps, color="C2")
    gap_axes.axhline(config.tolerance, color="grey", linestyle=":", label="tolerance")
    gap_axes.set(
        xlabel="step", ylabel="|loss ours - loss torch| / loss torch", yscale="log", title="gap"
    )
    gap_axes.legend()
    figure_path = out / f"{NAME}.png"
    common.save_figure(figure, figure_path)

    same = max(loss_gap, weight_gap, probability_gap) <= config.tolerance
    learned = min(accuracy.values()) >= config.min_accuracy
    return common.verdict(
        same and learned,
        [
            f"{len(losses['ours'])} Adam steps, {config.dtype}",
            f"max relative loss difference over all steps: {loss_gap:.1e} "
            f"(tolerance {config.tolerance:.0e})",
            f"max relative difference of the final weights: {weight_gap:.1e}",
            f"max difference of the softmax probabilities on validation: {probability_gap:.1e}",
            f"validation accuracy: ours {accuracy['ours']:.4f}, torch {accuracy['torch']:.4f} "
            f"(required >= {config.min_accuracy})",
        ],
        out,
        figure_path,
        smoke=smoke,
    )


if __name__ == "__main__":
    sys.exit(main())
