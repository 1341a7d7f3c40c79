"""Experiment 1: linear regression by gradient descent.

Claim: full-batch gradient descent on the mean squared error of y = 3x + 2 + noise, with
``torchopt_lab.nn.Linear`` + ``torchopt_lab.nn.MSELoss`` + ``torchopt_lab.optim.SGD``, drives
w and b to 3 and 2 (to the least-squares solution, which the noise moves slightly away from 3
and 2), and the gradients our layers' hand-written backward passes produce equal the closed form

    L = 1/n sum_i (w x_i + b - y_i)^2
    dL/dw = 2/n sum_i (w x_i + b - y_i) x_i
    dL/db = 2/n sum_i (w x_i + b - y_i)

at every step, in float64, to 1e-12 relative to the sum of the magnitudes of the terms
(2/n sum |r_i x_i| and 2/n sum |r_i|): near convergence the gradient itself goes to 0 while
its terms do not, so that is the scale at which rounding in a sum shows.

    python experiments/linear_regression.py            # full run
    python experiments/linear_regression.py --smoke    # small budget
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass

import common
import numpy as np
import torch

from torchopt_lab import nn, optim
from torchopt_lab.tracking import TrainingLogger

NAME = "linear_regression"
CLAIM = (
    "gradient descent on y = 3x + 2 + noise with our Linear + MSELoss + SGD drives w, b to 3, 2, "
    "and our layers' gradients equal the closed form 2/n sum r x, 2/n sum r (r = y_hat - y)"
)
GRADIENT_TOLERANCE = 1e-12  # float64, relative to the summed magnitudes of the terms


@dataclass
class Config:
    samples: int = 200  # number of points, x ~ Uniform(-1, 1)
    true_weight: float = 3.0  # y = true_weight * x + true_bias + noise
    true_bias: float = 2.0  # intercept of the line the data come from
    noise: float = 0.1  # standard deviation of the Gaussian noise added to y
    lr: float = 0.1  # step size of full-batch gradient descent
    steps: int = 500  # number of gradient-descent steps
    tolerance: float = 0.05  # |w - 3| and |b - 2| must end below this
    seed: int = 0  # seeds the data and the initial weights
    out: str = ""  # output directory (default: runs/experiments/linear_regression)


SMOKE = {"steps": 150}
# Knobs whose bounds differ from "> 0 like their default" (see common.parse_config).
BOUNDS = {"true_weight": "any", "true_bias": "any", "noise": ">=0"}


def main(argv: list[str] | None = None) -> int:
    config, smoke = common.parse_config(Config, argv, SMOKE, __doc__, BOUNDS)
    out = common.start(NAME, CLAIM, config)
    common.seed_everything(config.seed)

    x = torch.rand(config.samples, 1, dtype=torch.float64) * 2 - 1
    noise = config.noise * torch.randn(config.samples, 1, dtype=torch.float64)
    y = config.true_weight * x + config.true_bias + noise
    model = nn.Linear(1, 1).to(torch.float64)
    loss_fn = nn.MSELoss()
    optimizer = optim.SGD(model.parameters(), lr=config.lr)
    logger = TrainingLogger(
        out / "tensorboard", model, optimizer, config=dataclasses.asdict(config)
    )

    weights, biases, worst_error = [], [], 0.0
    for _ in range(config.steps):
        optimizer.zero_grad()
        prediction = model(x)
        loss = loss_fn(prediction, y)
        loss.backward()
        with torch.no_grad():
            residual = prediction - y
            closed_form = torch.stack([2 * (residual * x).mean(), 2 * residual.mean()])
            scale = torch.stack([2 * (residual * x).abs().mean(), 2 * residual.abs().mean()])
            ours = torch.stack([model.weight.grad.reshape(()), model.bias.grad.reshape(())])
            error = ((ours - closed_form).abs() / scale).max().item()
        worst_error = max(worst_error, error)
        with logger.step(loss):
            optimizer.step()
        weights.append(model.weight.item())
        biases.append(model.bias.item())
        logger.log_scalars(
            {"params/weight": weights[-1], "params/bias": biases[-1], "check/grad_rel_error": error}
        )

    design = np.hstack([x.numpy(), np.ones_like(x.numpy())])
    (least_squares_w, least_squares_b), *_ = np.linalg.lstsq(design, y.numpy()[:, 0], rcond=None)
    w, b = weights[-1], biases[-1]
    final_loss = loss_fn(model(x), y).item()
    logger.finish({"weight": w, "bias": b, "loss": final_loss, "grad_rel_error": worst_error})

    pyplot = common.pyplot()
    figure, (data_axes, path_axes) = pyplot.subplots(1, 2, figsize=(10, 4))
    data_axes.scatter(x[:, 0], y[:, 0], s=8, alpha=0.5, label="data")
    grid = np.linspace(-1, 1, 2)
    data_axes.plot(grid, config.true_weight * grid + config.true_bias, "k--", label="y = 3x + 2")
    data_axes.plot(grid, w * grid + b, "C3", label=f"fit: y = {w:.3f}x + {b:.3f}")
    data_axes.set(xlabel="x", ylabel="y", title="data and fitted line")
    data_axes.legend()
    path_axes.plot(weights, label="w")
    path_axes.plot(biases, label="b")
    for target in (config.true_weight, config.true_bias):
        path_axes.axhline(target, color="grey", linestyle=":")
    path_axes.set(xlabel="step", ylabel="value", title=f"gradient descent, lr={config.lr}")
    path_axes.legend()
    figure_path = out / f"{NAME}.png"
    common.save_figure(figure, figure_path)

    converged = (
        abs(w - config.true_weight) < config.tolerance
        and abs(b - config.true_bias) < config.tolerance
    )
    supported = converged and worst_error <= GRADIENT_TOLERANCE
    return common.verdict(
        supported,
        [
            f"w = {w:.6f} (target {config.true_weight}, |w - 3| = {abs(w - 3):.2e}), "
            f"b = {b:.6f} (target {config.true_bias}, |b - 2| = {abs(b - 2):.2e}), "
            f"tolerance {config.tolerance}",
            f"least squares: w = {least_squares_w:.6f}, b = {least_squares_b:.6f}; "
            f"distance from GD: {abs(w - least_squares_w):.1e}, {abs(b - least_squares_b):.1e}",
            f"final MSE {final_loss:.5f} (noise variance {config.noise**2:.5f})",
            f"max relative error of our gradients vs the closed form over {config.steps} steps: "
            f"{worst_error:.1e} (bound {GRADIENT_TOLERANCE:.0e})",
        ],
        out,
        figure_path,
        smoke=smoke,
    )


if __name__ == "__main__":
    sys.exit(main())
