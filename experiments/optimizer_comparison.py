"""Experiment 3: the optimizer comparison (the main job, ``torchopt-lab compare``, through its API).

Claim: on the 8x8 digits, from the same initial weights with the same minibatches and budget,
each optimizer at its tuned learning rate (``torchopt_lab.compare.DEFAULT_LR``) reaches
``min_accuracy`` validation accuracy, and the adaptive methods (Adagrad, RMSprop, Adam), which
scale each coordinate's step by its gradient history, reach the target training loss in fewer
steps than plain SGD.

    python experiments/optimizer_comparison.py            # full run (the default compare run)
    python experiments/optimizer_comparison.py --smoke    # small budget
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import common

from torchopt_lab.compare import CompareConfig, format_table, run_comparison

NAME = "optimizer_comparison"
CLAIM = (
    "every optimizer reaches the accuracy bar at its tuned lr under the same budget, and Adagrad, "
    "RMSprop and Adam reach the target training loss in fewer steps than SGD"
)
ADAPTIVE = ("adagrad", "rmsprop", "adam")


@dataclass
class Config:
    epochs: int = 20  # passes over the training split, for every optimizer
    batch_size: int = 32  # minibatch size
    target_loss: float = 0.1  # training loss whose first crossing is counted in steps
    min_accuracy: float = 0.95  # validation accuracy every optimizer must reach
    seed: int = 0  # seeds the split, the initial weights and the minibatch order
    device: str = "cpu"  # where to train
    out: str = ""  # output directory (default: runs/experiments/optimizer_comparison)


SMOKE = {"epochs": 1, "batch_size": 64}
# Knobs whose bounds differ from "> 0 like their default" (see common.parse_config).
BOUNDS = {"min_accuracy": "(0,1]"}


def main(argv: list[str] | None = None) -> int:
    config, smoke = common.parse_config(Config, argv, SMOKE, __doc__, BOUNDS)
    out = common.start(NAME, CLAIM, config)
    comparison = run_comparison(
        CompareConfig(
            epochs=config.epochs,
            batch_size=config.batch_size,
            target_loss=config.target_loss,
            seed=config.seed,
            device=config.device,
            logdir=str(out),
            progress=False,
        )
    )
    results = comparison.results
    print(format_table(results, config.target_loss))

    def steps(name: str) -> float:
        reached = results[name].steps_to_target
        return float("inf") if reached is None else reached

    accurate = {name: r.val_accuracy >= config.min_accuracy for name, r in results.items()}
    faster = {name: steps(name) < steps("sgd") for name in ADAPTIVE}
    return common.verdict(
        all(accurate.values()) and all(faster.values()),
        [
            "validation accuracy: "
            + ", ".join(f"{n} {r.val_accuracy:.4f}" for n, r in results.items())
            + f" (bar {config.min_accuracy})",
            f"steps to train loss <= {config.target_loss}: "
            + ", ".join(f"{n} {steps(n):g}" for n in results)
            + " (inf: not reached)",
            "adaptive faster than SGD: " + ", ".join(f"{n} {ok}" for n, ok in faster.items()),
        ],
        comparison.run_dir,
        comparison.plot_path,
        smoke=smoke,
    )


if __name__ == "__main__":
    sys.exit(main())
