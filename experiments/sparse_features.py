"""Experiment 7: Adagrad and RMSprop against SGD on sparse, rarely active features.

Claim: in a linear model where a few features are active in half of the samples and most are
active in only 0.5% of them (binary indicators, as words in documents), SGD's learning rate is
capped by the frequent features (they set the largest curvature), so a rare feature's weight,
updated only when the feature shows up, moves by lr * its rare gradient and learns slowly.
Adagrad (step / sqrt(sum of squared gradients)) and RMSprop (step / sqrt(moving average of
squared gradients)) scale each coordinate by its own history: a rare feature's small history
gives it large steps. So, each at its best learning rate (log grid, best test loss) after the same
number of steps, Adagrad and RMSprop both end with a relative error on the rare features'
weights, and a test loss, at least ``margin`` times lower than SGD's.

    y = x . w* + noise,  x_j ~ Bernoulli(p_j),  w*_j ~ N(0, 1)
    relative error = ||w_rare - w*_rare|| / ||w*_rare||   (weights start at 0: error 1)

    python experiments/sparse_features.py            # full run
    python experiments/sparse_features.py --smoke    # small budget
"""

from __future__ import annotations

import dataclasses
import math
import sys
from dataclasses import dataclass

import common
import torch

from torchopt_lab import nn, optim
from torchopt_lab.tracking import TrainingLogger

NAME = "sparse_features"
CLAIM = (
    "with rarely active features, Adagrad and RMSprop learn the rare features' weights faster "
    "than SGD: at tuned lrs, rare-weight error and test loss >= 3x lower than SGD's"
)
OPTIMIZERS = {
    "sgd": lambda params, lr: optim.SGD(params, lr=lr),
    "adagrad": lambda params, lr: optim.Adagrad(params, lr=lr),
    "rmsprop": lambda params, lr: optim.RMSprop(params, lr=lr),
}


@dataclass
class Config:
    frequent: int = 50  # features active in a sample with probability p_frequent
    rare: int = 450  # features active with probability p_rare
    p_frequent: float = 0.5  # activation probability of a frequent feature
    p_rare: float = 0.005  # activation probability of a rare feature
    noise: float = 0.1  # standard deviation of the noise on y
    steps: int = 1000  # minibatch steps (fresh samples each step), for every optimizer
    batch_size: int = 32  # samples per step
    test_samples: int = 5000  # held-out samples for the test loss
    lr_min: float = 1e-3  # smallest learning rate of the grid
    lr_max: float = 1.0  # largest learning rate of the grid
    per_decade: int = 3  # grid points per decade
    margin: float = 3.0  # Adagrad and RMSprop must beat SGD by this factor
    seed: int = 0  # seeds w*, the training stream and the test set
    out: str = ""  # output directory (default: runs/experiments/sparse_features)


SMOKE = {"steps": 50, "per_decade": 1}
# Knobs whose bounds differ from "> 0 like their default" (see common.parse_config).
BOUNDS = {"noise": ">=0", "p_frequent": "(0,1]", "p_rare": "(0,1]"}


class Problem:
    """The data distribution: ``sample(n, generator)`` returns (x, y) of shapes [n, d], [n, 1]."""

    def __init__(self, config: Config) -> None:
        generator = torch.Generator().manual_seed(config.seed)
        self.config = config
        self.probability = torch.tensor(
            [config.p_frequent] * config.frequent + [config.p_rare] * config.rare
        )
        self.weights = torch.randn(config.frequent + config.rare, generator=generator)

    def sample(self, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        x = (
            torch.rand(n, self.probability.numel(), generator=generator) < self.probability
        ).float()
        noise = self.config.noise * torch.randn(n, generator=generator)
        return x, (x @ self.weights + noise)[:, None]

    def errors(self, model: nn.Linear) -> tuple[float, float]:
        """Relative weight error on the frequent and on the rare features."""
        weight, split = model.weight.detach()[0], self.config.frequent
        parts = ((weight[:split], self.weights[:split]), (weight[split:], self.weights[split:]))
        return tuple(((w - true).norm() / true.norm()).item() for w, true in parts)


def train(problem: Problem, name: str, lr: float, config: Config, log_dir=None) -> dict:
    model = nn.Linear(config.frequent + config.rare, 1)
    torch.nn.init.zeros_(model.weight)
    torch.nn.init.zeros_(model.bias)
    optimizer = OPTIMIZERS[name](model.parameters(), lr)
    loss_fn = nn.MSELoss()
    logger = None
    if log_dir is not None:
        run_config = {**dataclasses.asdict(config), "optimizer": name, "lr": lr}
        logger = TrainingLogger(log_dir, model, optimizer, histogram_every=0, config=run_config)
    stream = torch.Generator().manual_seed(config.seed + 1)
    test_x, test_y = problem.sample(
        config.test_samples, torch.Generator().manual_seed(config.seed + 2)
    )
    history = {"step": [], "frequent_error": [], "rare_error": []}
    for step in range(config.steps + 1):
        if step % max(1, config.steps // 50) == 0 or step == config.steps:
            frequent_error, rare_error = problem.errors(model)
            for key, value in zip(history, (step, frequent_error, rare_error), strict=True):
                history[key].append(value)
            if logger is not None:
                logger.log_scalars(
                    {"weights/frequent_error": frequent_error, "weights/rare_error": rare_error},
                    step,
                )
        if step == config.steps:
            break
        x, y = problem.sample(config.batch_size, stream)
        optimizer.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        if logger is None:
            optimizer.step()
        else:
            with logger.step(loss):
                optimizer.step()
    with torch.no_grad():
        test_loss = loss_fn(model(test_x), test_y).item()
    if logger is not None:
        logger.finish({"test_loss": test_loss, "rare_error": history["rare_error"][-1]})
    return {"lr": lr, "test_loss": test_loss, "history": history, "model": model}


def main(argv: list[str] | None = None) -> int:
    config, smoke = common.parse_config(Config, argv, SMOKE, __doc__, BOUNDS)
    out = common.start(NAME, CLAIM, config)
    problem = Problem(config)
    exponents = range(
        round(math.log10(config.lr_min) * config.per_decade),
        round(math.log10(config.lr_max) * config.per_decade) + 1,
    )
    grid = [10 ** (exponent / config.per_decade) for exponent in exponents]
    results = {}
    for name in OPTIMIZERS:
        losses = {lr: train(problem, name, lr, config)["test_loss"] for lr in grid}
        finite = {lr: loss for lr, loss in losses.items() if math.isfinite(loss)}
        lr = min(finite, key=finite.get) if finite else grid[0]
        results[name] = train(problem, name, lr, config, out / name)
        history = results[name]["history"]
        print(
            f"  {name:8s} best lr {lr:.3g}: test loss {results[name]['test_loss']:.4f}, "
            f"weight error frequent {history['frequent_error'][-1]:.3f}, "
            f"rare {history['rare_error'][-1]:.3f}"
        )

    pyplot = common.pyplot()
    figure, (error_axes, scatter_axes) = pyplot.subplots(1, 2, figsize=(11, 4.2))
    rare = slice(config.frequent, None)
    for index, (name, result) in enumerate(results.items()):
        history = result["history"]
        label = f"{name} (lr {result['lr']:.2g})"
        error_axes.plot(history["step"], history["rare_error"], color=f"C{index}", label=label)
        error_axes.plot(
            history["step"], history["frequent_error"], color=f"C{index}", linestyle="--"
        )
        learned = result["model"].weight.detach()[0, rare]
        scatter_axes.scatter(
            problem.weights[rare], learned, s=6, color=f"C{index}", alpha=0.6, label=name
        )
    error_axes.plot([], [], color="black", label="rare features (solid)")
    error_axes.plot([], [], color="black", linestyle="--", label="frequent features (dashed)")
    error_axes.set(yscale="log", xlabel="step", ylabel="relative weight error", title="learning")
    error_axes.legend(fontsize="small")
    scatter_axes.plot([-3, 3], [-3, 3], color="grey", linewidth=0.8)
    scatter_axes.set(
        xlabel="true weight w*", ylabel="learned weight", title="rare features after training"
    )
    scatter_axes.legend(fontsize="small")
    figure_path = out / f"{NAME}.png"
    common.save_figure(figure, figure_path)

    def rare_error(name: str) -> float:
        return results[name]["history"]["rare_error"][-1]

    def beats_sgd(name: str) -> bool:
        return (
            rare_error(name) * config.margin <= rare_error("sgd")
            and results[name]["test_loss"] * config.margin <= results["sgd"]["test_loss"]
        )

    evidence = [
        f"{name}: lr {result['lr']:.3g}, rare-weight error {rare_error(name):.4f}, "
        f"test loss {result['test_loss']:.4f}"
        for name, result in results.items()
    ]
    evidence += [
        f"SGD / {name}: rare-weight error x{rare_error('sgd') / rare_error(name):.1f}, "
        f"test loss x{results['sgd']['test_loss'] / results[name]['test_loss']:.1f} "
        f"(needs >= {config.margin:g})"
        for name in ("adagrad", "rmsprop")
    ]
    supported = beats_sgd("adagrad") and beats_sgd("rmsprop")
    return common.verdict(supported, evidence, out, figure_path, smoke=smoke)


if __name__ == "__main__":
    sys.exit(main())
