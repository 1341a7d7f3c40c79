"""Experiment 6: optimizer paths on 2-D test functions.

Claim: plain gradient descent is slow where the curvature differs a lot between directions (the
narrow curved valley of Rosenbrock's function, the plateaus and walls of Beale's, an
ill-conditioned quadratic): with each optimizer's learning rate tuned per function (the best
final value over a log-spaced grid, diverged runs excluded) and the same number of steps,

1. Momentum and Adam end lower than SGD on all three functions;
2. on the quadratic f = (x^2 + kappa y^2) / 2 (kappa = 100), where SGD's stable learning rate
   (< 2 / kappa) makes it crawl along x, every other optimizer ends at least 100x lower than SGD.

Functions (minimum value 0):

    rosenbrock(x, y) = (1 - x)^2 + 100 (y - x^2)^2                    minimum at (1, 1)
    beale(x, y) = (1.5 - x + xy)^2 + (2.25 - x + xy^2)^2 + (2.625 - x + xy^3)^2   at (3, 0.5)
    quadratic(x, y) = (x^2 + kappa y^2) / 2                             minimum at (0, 0)

    python experiments/optimizer_paths.py            # full run
    python experiments/optimizer_paths.py --smoke    # small budget
"""

from __future__ import annotations

import dataclasses
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass

import common
import numpy as np
import torch

from torchopt_lab import optim
from torchopt_lab.tracking import TrainingLogger

NAME = "optimizer_paths"
CLAIM = (
    "with learning rates tuned per function, Momentum and Adam end lower than SGD on Rosenbrock, "
    "Beale and an ill-conditioned quadratic, where every other optimizer ends >= 100x below SGD"
)
OPTIMIZERS: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "sgd": lambda params, lr: optim.SGD(params, lr=lr),
    "momentum": lambda params, lr: optim.Momentum(params, lr=lr),
    "adagrad": lambda params, lr: optim.Adagrad(params, lr=lr),
    "rmsprop": lambda params, lr: optim.RMSprop(params, lr=lr),
    "adam": lambda params, lr: optim.Adam(params, lr=lr),
}


@dataclass
class Config:
    steps: int = 200  # optimizer steps from the start point, for every optimizer
    kappa: float = 100.0  # condition number of the quadratic
    lr_min: float = 1e-4  # smallest learning rate of the grid
    lr_max: float = 10.0  # largest learning rate of the grid
    per_decade: int = 3  # grid points per decade between lr_min and lr_max
    quadratic_margin: float = 100.0  # claim 2: others end this many times below SGD
    out: str = ""  # output directory (default: runs/experiments/optimizer_paths)


SMOKE = {"steps": 20, "per_decade": 1}


def rosenbrock(point: torch.Tensor) -> torch.Tensor:
    x, y = point[0], point[1]
    return (1 - x) ** 2 + 100 * (y - x**2) ** 2


def beale(point: torch.Tensor) -> torch.Tensor:
    x, y = point[0], point[1]
    return (1.5 - x + x * y) ** 2 + (2.25 - x + x * y**2) ** 2 + (2.625 - x + x * y**3) ** 2


def functions(config: Config) -> dict[str, tuple[Callable, tuple[float, float], tuple, tuple]]:
    """name -> (function, start, minimum, plot window (x0, x1, y0, y1))."""

    def quadratic(point: torch.Tensor) -> torch.Tensor:
        return 0.5 * (point[0] ** 2 + config.kappa * point[1] ** 2)

    return {
        "rosenbrock": (rosenbrock, (-1.2, 1.0), (1.0, 1.0), (-2.0, 2.0, -1.0, 3.0)),
        "beale": (beale, (1.0, 1.5), (3.0, 0.5), (-1.0, 4.0, -1.5, 2.0)),
        "quadratic": (quadratic, (-4.5, 1.0), (0.0, 0.0), (-5.0, 5.0, -1.5, 1.5)),
    }


def descend(
    function, start, name: str, lr: float, steps: int, log_dir=None, run_config=None
) -> list:
    """The path of optimizer ``name`` from ``start``: ``steps + 1`` points (float64); logged
    to TensorBoard in ``log_dir`` if given."""
    point = torch.tensor(start, dtype=torch.float64, requires_grad=True)
    optimizer = OPTIMIZERS[name]([point], lr)
    logger = None
    if log_dir is not None:
        logger = TrainingLogger(
            log_dir, [("xy", point)], optimizer, histogram_every=0, config=run_config
        )
    path = [point.detach().clone()]
    for _ in range(steps):
        optimizer.zero_grad()
        value = function(point)
        value.backward()
        if logger is None:
            optimizer.step()
        else:
            with logger.step(value):
                optimizer.step()
        path.append(point.detach().clone())
    if logger is not None:
        logger.finish({"final_value": function(point).item()})
    return path


def main(argv: list[str] | None = None) -> int:
    config, smoke = common.parse_config(Config, argv, SMOKE, __doc__)
    out = common.start(NAME, CLAIM, config)
    exponents = range(
        round(math.log10(config.lr_min) * config.per_decade),
        round(math.log10(config.lr_max) * config.per_decade) + 1,
    )
    grid = [10 ** (exponent / config.per_decade) for exponent in exponents]
    best: dict[tuple[str, str], tuple[float, float]] = {}
    paths = {}
    for function_name, (function, start, _, _) in functions(config).items():
        start_value = function(torch.tensor(start, dtype=torch.float64)).item()
        for name in OPTIMIZERS:
            final = {}
            for lr in grid:
                value = function(descend(function, start, name, lr, config.steps)[-1]).item()
                if math.isfinite(value) and value < start_value:
                    final[lr] = value
            lr = min(final, key=final.get) if final else grid[0]
            best[function_name, name] = (lr, final.get(lr, math.inf))

            run_config = {
                **dataclasses.asdict(config),
                "function": function_name,
                "optimizer": name,
                "lr": lr,
            }
            paths[function_name, name] = torch.stack(
                descend(
                    function, start, name, lr, config.steps, out / function_name / name, run_config
                )
            ).numpy()
        print(
            f"  {function_name:10s} f(start) = {start_value:.4g}; final: "
            + ", ".join(
                f"{name} {best[function_name, name][1]:.2e} (lr {best[function_name, name][0]:.2g})"
                for name in OPTIMIZERS
            )
        )

    pyplot = common.pyplot()
    figure, axes = pyplot.subplots(1, 3, figsize=(15, 4.8))
    for axis, (function_name, (function, start, minimum, window)) in zip(
        axes, functions(config).items(), strict=True
    ):
        x0, x1, y0, y1 = window
        xs, ys = np.meshgrid(np.linspace(x0, x1, 300), np.linspace(y0, y1, 300))
        values = function(torch.from_numpy(np.stack([xs, ys]))).numpy()
        axis.contour(xs, ys, np.log10(values + 1e-3), levels=25, cmap="Greys", linewidths=0.6)
        for index, name in enumerate(OPTIMIZERS):
            path = paths[function_name, name]
            lr, final = best[function_name, name]
            axis.plot(
                path[:, 0],
                path[:, 1],
                ".-",
                color=f"C{index}",
                markersize=2,
                linewidth=1,
                label=f"{name} lr={lr:.2g}: {final:.1e}",
            )
        axis.plot(*start, "ko", markersize=6)
        axis.plot(*minimum, "r*", markersize=12)
        axis.set(xlim=(x0, x1), ylim=(y0, y1), title=f"{function_name}, {config.steps} steps")
        axis.legend(fontsize="x-small", loc="lower right")
    figure_path = out / f"{NAME}.png"
    common.save_figure(figure, figure_path)

    def final(function_name: str, name: str) -> float:
        return best[function_name, name][1]

    claim_1 = all(
        final(function_name, name) < final(function_name, "sgd")
        for function_name in functions(config)
        for name in ("momentum", "adam")
    )
    claim_2 = all(
        final("quadratic", name) * config.quadratic_margin <= final("quadratic", "sgd")
        for name in OPTIMIZERS
        if name != "sgd"
    )
    evidence = [
        f"{function_name}: "
        + ", ".join(f"{name} {final(function_name, name):.2e}" for name in OPTIMIZERS)
        for function_name in functions(config)
    ]
    evidence += [
        f"claim 1 (Momentum and Adam below SGD everywhere): {'yes' if claim_1 else 'no'}",
        f"claim 2 (quadratic: all >= {config.quadratic_margin:g}x below SGD): "
        + ("yes" if claim_2 else "no"),
    ]
    return common.verdict(claim_1 and claim_2, evidence, out, figure_path, smoke=smoke)


if __name__ == "__main__":
    sys.exit(main())
