"""Experiment 4: vanishing gradients in a 10-layer MLP.

Claim (the textbook account): backpropagation multiplies the gradient by each layer's Jacobian,
W^T diag(f'(z)); with the sigmoid, f' <= 1/4, so in a plain deep net the gradient shrinks
geometrically toward the input:

1. in a plain 10-layer sigmoid MLP the first layer's weight gradient is more than 1000x smaller
   than the last layer's at initialisation (ratio < ``vanish_ratio``), and the net barely trains;
2. tanh (f'(0) = 1) and ReLU (f' in {0, 1}) lose far less: their ratio is >= 100x sigmoid's;
3. a residual connection (h <- h + f(W h + b)) gives the gradient a path around every layer:
   it raises the first/last ratio of every activation and lets all three train (final loss below
   half the initial one);
4. normalisation (LayerNorm before each activation) keeps tanh and ReLU's ratio >= 0.1.

"Ratio" is ||dL/dW_1|| / ||dL/dW_10|| (Frobenius norms) on a fixed batch of 512 training digits;
the per-layer norms at initialisation and during training are in the figure and, for every step,
in TensorBoard (``grad_norm/layers.<i>.weight``). Layers from ``torchopt_lab.nn`` with PyTorch's
default initialisation, trained with ``torchopt_lab.optim.SGD``.

    python experiments/vanishing_gradients.py            # full run
    python experiments/vanishing_gradients.py --smoke    # small budget
"""

from __future__ import annotations

import dataclasses
import itertools
import sys
from dataclasses import dataclass

import common
import torch

from torchopt_lab import nn, optim
from torchopt_lab.data import load_digits_split
from torchopt_lab.tracking import TrainingLogger

NAME = "vanishing_gradients"
CLAIM = (
    "in a plain 10-layer sigmoid MLP the gradient vanishes toward the input (first/last layer "
    "gradient ratio < 1e-3) and it barely trains; tanh and ReLU lose >= 100x less; a residual "
    "connection raises the ratio and lets all three train; LayerNorm keeps tanh/ReLU's ratio >= 0.1"
)
ACTIVATIONS = {"sigmoid": nn.Sigmoid, "tanh": nn.Tanh, "relu": nn.ReLU}
ARCHITECTURES = ("plain", "residual", "layernorm")


@dataclass
class Config:
    depth: int = 10  # Linear layers: 64 -> width, (depth - 2) x width -> width, width -> 10
    width: int = 64  # units of every hidden layer
    steps: int = 600  # SGD steps per variant
    batch_size: int = 32  # minibatch size (sampled with replacement)
    lr: float = 0.1  # SGD learning rate, the same for every variant
    probe_every: int = 50  # measure the per-layer gradient norms on the probe batch every k steps
    vanish_ratio: float = 1e-3  # claim 1: the plain sigmoid net's first/last ratio is below this
    seed: int = 0  # seeds the initial weights (the same draw for every variant) and the batches
    out: str = ""  # output directory (default: runs/experiments/vanishing_gradients)


SMOKE = {"steps": 30, "probe_every": 10}
# Knobs whose bounds differ from "> 0 like their default" (see common.parse_config).
BOUNDS = {"depth": ">=2"}


class DeepMLP(torch.nn.Module):
    """``depth`` Linear layers with ``activation`` after each but the last; ``architecture``:
    "plain", "residual" (hidden layers 2..depth-1 add their input back) or "layernorm"
    (LayerNorm between each hidden Linear and its activation)."""

    def __init__(self, activation: type, architecture: str, depth: int, width: int) -> None:
        super().__init__()
        sizes = [64] + [width] * (depth - 1) + [10]
        self.layers = torch.nn.ModuleList(
            nn.Linear(fan_in, fan_out) for fan_in, fan_out in itertools.pairwise(sizes)
        )
        self.norms = torch.nn.ModuleList(
            nn.LayerNorm(width) for _ in range(depth - 1) if architecture == "layernorm"
        )
        self.activation = activation()
        self.residual = architecture == "residual"

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        hidden = inputs
        for index, layer in enumerate(self.layers[:-1]):
            pre_activation = layer(hidden)
            if len(self.norms):
                pre_activation = self.norms[index](pre_activation)
            activated = self.activation(pre_activation)
            hidden = hidden + activated if self.residual and index > 0 else activated
        return self.layers[-1](hidden)


def layer_norms(model: DeepMLP, loss_fn, inputs, labels) -> list[float]:
    """||dL/dW_l|| of every Linear layer on the probe batch (gradients are zeroed after)."""
    model.zero_grad()
    loss_fn(model(inputs), labels).backward()
    norms = [layer.weight.grad.norm().item() for layer in model.layers]
    model.zero_grad()
    return norms


def main(argv: list[str] | None = None) -> int:
    config, smoke = common.parse_config(Config, argv, SMOKE, __doc__, BOUNDS)
    out = common.start(NAME, CLAIM, config)
    data = load_digits_split(seed=config.seed)
    probe_inputs, probe_labels = data.train_inputs[:512], data.train_labels[:512]
    loss_fn = nn.CrossEntropyLoss()
    results = {}
    for activation_name, activation in ACTIVATIONS.items():
        for architecture in ARCHITECTURES:
            common.seed_everything(config.seed)
            model = DeepMLP(activation, architecture, config.depth, config.width)
            optimizer = optim.SGD(model.parameters(), lr=config.lr)
            run = f"{activation_name}-{architecture}"
            logger = TrainingLogger(
                out / run,
                model,
                optimizer,
                log_every=5,
                histogram_every=0,
                config={
                    **dataclasses.asdict(config),
                    "activation": activation_name,
                    "architecture": architecture,
                },
            )
            batches = torch.Generator().manual_seed(config.seed)
            initial_loss = loss_fn(model(data.train_inputs), data.train_labels).item()
            probes = {0: layer_norms(model, loss_fn, probe_inputs, probe_labels)}
            losses = []
            for step in range(1, config.steps + 1):
                index = torch.randint(
                    0, data.train_inputs.shape[0], (config.batch_size,), generator=batches
                )
                optimizer.zero_grad()
                loss = loss_fn(model(data.train_inputs[index]), data.train_labels[index])
                loss.backward()
                with logger.step(loss):
                    optimizer.step()
                losses.append(loss.item())
                if step % config.probe_every == 0:
                    probes[step] = layer_norms(model, loss_fn, probe_inputs, probe_labels)
                    logger.log_scalars(
                        {"probe/first_over_last": probes[step][0] / probes[step][-1]}
                    )
            with torch.no_grad():
                final_loss = loss_fn(model(data.train_inputs), data.train_labels).item()
            ratio = probes[0][0] / probes[0][-1]
            logger.finish({"init_first_over_last": ratio, "final_train_loss": final_loss})
            results[activation_name, architecture] = {
                "ratio": ratio,
                "probes": probes,
                "losses": losses,
                "initial_loss": initial_loss,
                "final_loss": final_loss,
            }
            print(
                f"  {run:18s} first/last at init {ratio:.1e}, after training "
                f"{probes[max(probes)][0] / probes[max(probes)][-1]:.1e}; train loss "
                f"{initial_loss:.3f} -> {final_loss:.3f}"
            )

    pyplot = common.pyplot()
    figure, axes = pyplot.subplots(2, 3, figsize=(13, 7.5))
    for column, activation_name in enumerate(ACTIVATIONS):
        for index, architecture in enumerate(ARCHITECTURES):
            result = results[activation_name, architecture]
            layers = range(1, config.depth + 1)
            axes[0, column].plot(
                layers, result["probes"][0], "o-", color=f"C{index}", label=architecture
            )
            last = max(result["probes"])
            axes[0, column].plot(layers, result["probes"][last], "x:", color=f"C{index}", alpha=0.6)
            window = max(1, len(result["losses"]) // 30)
            smooth = [
                sum(result["losses"][i : i + window]) / window
                for i in range(0, len(result["losses"]) - window + 1, window)
            ]
            axes[1, column].plot(
                [window * (i + 1) for i in range(len(smooth))],
                smooth,
                color=f"C{index}",
                label=architecture,
            )
        axes[0, column].set(
            yscale="log",
            xlabel="layer (1 = input side)",
            ylabel="||dL/dW||",
            title=f"{activation_name}: gradient norm per layer (o init, x end)",
        )
        axes[1, column].set(
            xlabel="step",
            ylabel="train loss (minibatch, smoothed)",
            yscale="log",
            title=f"{activation_name}: training",
        )
        axes[0, column].legend(fontsize="small")
        axes[1, column].legend(fontsize="small")
    figure_path = out / f"{NAME}.png"
    common.save_figure(figure, figure_path)

    def ratio(activation_name: str, architecture: str) -> float:
        return results[activation_name, architecture]["ratio"]

    def trained(activation_name: str, architecture: str) -> bool:
        result = results[activation_name, architecture]
        return result["final_loss"] < 0.5 * result["initial_loss"]

    sigmoid = results["sigmoid", "plain"]
    claims = {
        "1 sigmoid plain vanishes and barely trains": ratio("sigmoid", "plain")
        < config.vanish_ratio
        and sigmoid["final_loss"] > 0.9 * sigmoid["initial_loss"],
        "2 tanh, relu >= 100x sigmoid": all(
            ratio(name, "plain") >= 100 * ratio("sigmoid", "plain") for name in ("tanh", "relu")
        ),
        "3 residual raises the ratio and trains": all(
            ratio(name, "residual") > ratio(name, "plain") and trained(name, "residual")
            for name in ACTIVATIONS
        ),
        "4 layernorm: tanh, relu ratio >= 0.1": all(
            ratio(name, "layernorm") >= 0.1 for name in ("tanh", "relu")
        ),
    }
    evidence = [
        "first/last gradient-norm ratio at init: "
        + "; ".join(
            f"{a}: " + ", ".join(f"{arch} {ratio(a, arch):.1e}" for arch in ARCHITECTURES)
            for a in ACTIVATIONS
        ),
        "train loss initial -> final: "
        + "; ".join(
            f"{a}-{arch} {result['initial_loss']:.2f}->{result['final_loss']:.3f}"
            for (a, arch), result in results.items()
        ),
        f"sigmoid + layernorm ratio {ratio('sigmoid', 'layernorm'):.1e}: normalising the "
        "pre-activation does not lift sigmoid's f' <= 1/4 per layer",
        *(f"claim {name}: {'yes' if ok else 'no'}" for name, ok in claims.items()),
    ]
    return common.verdict(all(claims.values()), evidence, out, figure_path, smoke=smoke)


if __name__ == "__main__":
    sys.exit(main())
