"""Experiment 5: exploding gradients, and clipping.

Claim: in a deep ReLU network whose initial weights are too large (``gain`` times the He scale
sqrt(2 / fan_in)), each layer multiplies both the forward signal and the backward signal by
about ``gain``: the logits, the loss and every layer's weight gradient (backward signal times
forward activation) come out about gain^depth too large. Then, with the same SGD learning rate:

1. without clipping, training diverges (the loss becomes non-finite);
2. with ``torchopt_lab.optim.clip_grad_norm_`` (rescale the whole gradient to norm <= max_norm),
3. and with ``torchopt_lab.optim.clip_grad_value_`` (clamp each component to [-c, c]),
   the run stays finite and cuts the training loss at least ``min_improvement`` times.

The pre-clip gradient norm of every step is in TensorBoard (``grad/global_norm``: the logger
measures it before the clipping inside its ``step`` block).

    python experiments/exploding_gradients.py            # full run
    python experiments/exploding_gradients.py --smoke    # small budget
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import sys
from dataclasses import dataclass

import common
import torch

from torchopt_lab import nn, optim
from torchopt_lab.data import load_digits_split
from torchopt_lab.tracking import TrainingLogger

NAME = "exploding_gradients"
CLAIM = (
    "a deep ReLU net with too-large initial weights diverges under SGD without clipping, and "
    "trains (finite, loss cut >= 10x) with clip_grad_norm_ or with clip_grad_value_"
)
MODES = ("none", "clip_grad_norm_", "clip_grad_value_")


@dataclass
class Config:
    depth: int = 10  # Linear layers, ReLU between them
    width: int = 64  # units of every hidden layer
    gain: float = 2.0  # initial weights ~ N(0, (gain * sqrt(2 / fan_in))^2), biases 0
    lr: float = 0.05  # SGD learning rate, the same for the three runs
    steps: int = 400  # SGD steps per run
    batch_size: int = 32  # minibatch size (sampled with replacement)
    max_norm: float = 1.0  # clip_grad_norm_'s max_norm
    clip_value: float = 0.1  # clip_grad_value_'s clip_value
    min_improvement: float = 10.0  # a clipped run must end with loss <= initial / this
    seed: int = 0  # seeds the initial weights (the same for all runs) and the batches
    out: str = ""  # output directory (default: runs/experiments/exploding_gradients)


SMOKE = {"steps": 40}


def build(config: Config) -> nn.Sequential:
    sizes = [64] + [config.width] * (config.depth - 1) + [10]
    layers: list[torch.nn.Module] = []
    for fan_in, fan_out in itertools.pairwise(sizes):
        linear = nn.Linear(fan_in, fan_out)
        torch.nn.init.normal_(linear.weight, 0.0, config.gain * math.sqrt(2.0 / fan_in))
        torch.nn.init.zeros_(linear.bias)
        layers += [linear, nn.ReLU()]
    return nn.Sequential(*layers[:-1])


def main(argv: list[str] | None = None) -> int:
    config, smoke = common.parse_config(Config, argv, SMOKE, __doc__)
    out = common.start(NAME, CLAIM, config)
    data = load_digits_split(seed=config.seed)
    loss_fn = nn.CrossEntropyLoss()
    results = {}
    for mode in MODES:
        common.seed_everything(config.seed)
        model = build(config)
        optimizer = optim.SGD(model.parameters(), lr=config.lr)
        logger = TrainingLogger(
            out / mode,
            model,
            optimizer,
            histogram_every=0,
            config={**dataclasses.asdict(config), "clipping": mode},
        )
        with torch.no_grad():
            initial_loss = loss_fn(model(data.train_inputs), data.train_labels).item()
        batches = torch.Generator().manual_seed(config.seed)
        losses, norms, layer_norms = [], [], None
        for _ in range(config.steps):
            index = torch.randint(
                0, data.train_inputs.shape[0], (config.batch_size,), generator=batches
            )
            optimizer.zero_grad()
            loss = loss_fn(model(data.train_inputs[index]), data.train_labels[index])
            loss.backward()
            if layer_norms is None:
                layer_norms = [p.grad.norm().item() for p in model.parameters() if p.dim() == 2]
            with logger.step(loss):
                if mode == "clip_grad_norm_":
                    norm = optim.clip_grad_norm_(model.parameters(), max_norm=config.max_norm)
                else:
                    norm = torch.linalg.vector_norm(
                        torch.stack([p.grad.norm() for p in model.parameters()])
                    )
                    if mode == "clip_grad_value_":
                        optim.clip_grad_value_(model.parameters(), clip_value=config.clip_value)
                optimizer.step()
            losses.append(loss.item())
            norms.append(norm.item())
        with torch.no_grad():
            logits = model(data.train_inputs)
            final_loss = loss_fn(logits, data.train_labels).item()
            accuracy = (model(data.val_inputs).argmax(1) == data.val_labels).float().mean().item()
        logger.finish(
            {"final_train_loss": final_loss, "val_accuracy": accuracy},
        )
        results[mode] = {
            "initial_loss": initial_loss,
            "final_loss": final_loss,
            "accuracy": accuracy,
            "losses": losses,
            "norms": norms,
            "layer_norms": layer_norms,
            "first_nonfinite": next(
                (step for step, value in enumerate(losses) if not math.isfinite(value)), None
            ),
        }

    pyplot = common.pyplot()
    figure, (loss_axes, norm_axes, layer_axes) = pyplot.subplots(1, 3, figsize=(14, 4))
    for index, (mode, result) in enumerate(results.items()):
        loss_axes.plot(result["losses"], color=f"C{index}", label=mode)
        norm_axes.plot(result["norms"], color=f"C{index}", label=mode)
        if result["first_nonfinite"] is not None:
            loss_axes.axvline(result["first_nonfinite"], color=f"C{index}", linestyle=":")
    layer_norms = results["none"]["layer_norms"]
    layer_axes.plot(range(1, len(layer_norms) + 1), layer_norms, "o-", color="C0")
    loss_axes.set(yscale="log", xlabel="step", ylabel="minibatch cross-entropy", title="loss")
    norm_axes.set(yscale="log", xlabel="step", ylabel="||g|| before clipping", title="gradient")
    layer_axes.set(
        yscale="log",
        xlabel="layer (1 = input side)",
        ylabel="||dL/dW|| at the first step",
        title=f"per layer at init (gain {config.gain})",
    )
    loss_axes.legend()
    norm_axes.legend()
    figure_path = out / f"{NAME}.png"
    common.save_figure(figure, figure_path)

    def trained(result: dict) -> bool:
        final = result["final_loss"]
        return math.isfinite(final) and final <= result["initial_loss"] / config.min_improvement

    unclipped = results["none"]
    diverged = unclipped["first_nonfinite"] is not None or not math.isfinite(
        unclipped["final_loss"]
    )
    supported = (
        diverged and trained(results["clip_grad_norm_"]) and trained(results["clip_grad_value_"])
    )
    evidence = [
        f"gradient norm at the first step {unclipped['norms'][0]:.3g} "
        f"(max_norm {config.max_norm}); per-layer first/last "
        f"{layer_norms[0] / layer_norms[-1]:.3g}",
        f"no clipping: first non-finite loss at step {unclipped['first_nonfinite']}, "
        f"final train loss {unclipped['final_loss']:.4g}",
        *(
            f"{mode}: train loss {results[mode]['initial_loss']:.4g} -> "
            f"{results[mode]['final_loss']:.4g} (needs <= initial / {config.min_improvement:g}), "
            f"val accuracy {results[mode]['accuracy']:.3f}"
            for mode in MODES[1:]
        ),
    ]
    return common.verdict(supported, evidence, out, figure_path, smoke=smoke)


if __name__ == "__main__":
    sys.exit(main())
