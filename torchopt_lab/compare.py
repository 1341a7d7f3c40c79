"""``torchopt-lab compare``: one network, every optimizer, the same start, the same budget.

Trains an MLP built from :mod:`torchopt_lab.nn` on scikit-learn's bundled 8x8 digits with SGD,
Momentum, Adagrad, RMSprop, Adam and the optimizers of ``torchopt_lab.optim.REGISTRY`` (NAdam,
RAdam, Adamax, Adadelta, Lion). Every optimizer starts from the same initial weights (the model
is built once and deep-copied), sees the same minibatches in the same order (one seeded generator
each) and gets the same number of steps. Writes, under one timestamped directory in
``--logdir``: a TensorBoard run per optimizer (tags: see :mod:`torchopt_lab.tracking`, plus
``eval/{train,val}_{loss,accuracy}``), ``compare.png`` (train and validation loss and accuracy
of all optimizers) and ``results.json``; prints a table.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from torchopt_lab import nn, optim
from torchopt_lab._arguments import UsageError, check_device
from torchopt_lab._files import write_atomically, write_text_atomically
from torchopt_lab.backend import backend_info
from torchopt_lab.data import DigitsSplit, load_digits_split
from torchopt_lab.tracking import TrainingLogger

__all__ = [
    "DEFAULT_LR",
    "OPTIMIZERS",
    "CompareConfig",
    "Comparison",
    "OptimizerResult",
    "add_arguments",
    "format_table",
    "run",
    "run_comparison",
]

# name -> how to build it from (params, lr). Momentum is heavy-ball SGD (momentum=0.9 default).
# record_norms: on the Triton path the update kernel hands the logger its norms (no extra pass).
OPTIMIZERS: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "sgd": lambda params, lr: optim.SGD(params, lr=lr, record_norms=True),
    "momentum": lambda params, lr: optim.Momentum(params, lr=lr, record_norms=True),
    "adagrad": lambda params, lr: optim.Adagrad(params, lr=lr, record_norms=True),
    "rmsprop": lambda params, lr: optim.RMSprop(params, lr=lr, record_norms=True),
    "adam": lambda params, lr: optim.Adam(params, lr=lr, record_norms=True),
}


def _from_registry(cls: type[torch.optim.Optimizer]) -> Callable[..., torch.optim.Optimizer]:
    return lambda params, lr: cls(params, lr=lr)


# The optimizers declared as rules (torchopt_lab.optim.rules) join from their registry, under
# their lowercase names; the built-ins (rule.reference set) are listed by hand above instead,
# with record_norms and a learning rate swept on this task (AdamW has none: not compared).
OPTIMIZERS.update(
    (name.lower(), _from_registry(cls))
    for name, cls in optim.REGISTRY.items()
    if cls.rule.reference is None
)

# Tuned on this task (default model, batch size and budget): the best of a log-spaced sweep
# (3 values per decade) of final validation loss, per optimizer.
DEFAULT_LR: dict[str, float] = {
    "sgd": 0.1,
    "momentum": 0.01,
    "adagrad": 0.03,
    "rmsprop": 1e-3,
    "adam": 1e-3,
    # The rule-declared optimizers, swept over 1, 2, 5 per decade (final validation loss 0.114,
    # 0.111, 0.111, 0.117, 0.180).
    "nadam": 1e-3,
    "radam": 2e-3,
    "adamax": 1e-2,
    "adadelta": 1.0,
    "lion": 1e-4,
}


@dataclass
class CompareConfig:
    """Everything that defines a comparison; kept whole in results.json and each run's config."""

    optimizers: tuple[str, ...] = tuple(OPTIMIZERS)  # which optimizers, in table order
    lr: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_LR))  # per optimizer
    epochs: int = 20  # passes over the training split, the same for every optimizer
    batch_size: int = 32  # minibatch size; the last, smaller batch of an epoch is dropped
    hidden: tuple[int, ...] = (128, 64)  # widths of the hidden layers (ReLU after each)
    seed: int = 0  # seeds the split, the initial weights and the minibatch order
    val_fraction: float = 0.2  # held-out share of the 1797 digits (stratified)
    target_loss: float = 0.1  # "steps to target": first evaluation with train loss <= this
    eval_every: int = 10  # evaluate on the whole train and validation splits every k steps
    histogram_every: int = 100  # weight and gradient histograms every k steps (0: off)
    device: str = "cpu"  # where the model and data live ("cpu", "cuda", "cuda:1", ...)
    threads: int = 1  # torch intra-op CPU threads while training (restored afterwards)
    logdir: str = "runs"  # parent of the timestamped directory this comparison writes
    progress: bool = True  # tqdm progress bar per optimizer, on stderr

    def __post_init__(self) -> None:
        unknown = [name for name in self.optimizers if name not in OPTIMIZERS]
        if unknown or not self.optimizers:
            raise ValueError(
                f"Invalid optimizers: {list(self.optimizers)}; choose from {list(OPTIMIZERS)}"
            )
        for name in self.optimizers:
            lr = self.lr.get(name, DEFAULT_LR[name])
            if not (isinstance(lr, int | float) and math.isfinite(lr) and lr > 0):
                raise ValueError(f"Invalid learning rate for {name}: {lr!r}; expected > 0")
        for knob in ("epochs", "batch_size", "eval_every", "threads"):
            value = getattr(self, knob)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"Invalid {knob}: {value!r}; expected an int >= 1")
        for knob in ("seed", "histogram_every"):
            value = getattr(self, knob)
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"Invalid {knob}: {value!r}; expected an int >= 0")
        if not (isinstance(self.target_loss, int | float) and 0 < self.target_loss < math.inf):
            raise ValueError(
                f"Invalid target_loss: {self.target_loss!r}; expected a finite number > 0"
            )
        if not (isinstance(self.val_fraction, float) and 0 < self.val_fraction < 1):
            raise ValueError(f"Invalid val_fraction: {self.val_fraction!r}; expected 0 < it < 1")
        if not all(isinstance(width, int) and width > 0 for width in self.hidden):
            raise ValueError(f"Invalid hidden widths: {self.hidden!r}; expected positive ints")

    def lr_of(self, name: str) -> float:
        return float(self.lr.get(name, DEFAULT_LR[name]))


@dataclass
class OptimizerResult:
    """One optimizer's run: final metrics and the evaluation history behind the plot."""

    name: str
    lr: float
    train_loss: float
    train_accuracy: float
    val_loss: float
    val_accuracy: float
    steps: int
    steps_to_target: int | None  # None: the target train loss was never reached
    ms_per_step: float  # forward + backward + optimizer step, logging and evaluation excluded
    ms_per_update: float  # optimizer.step() alone
    norm_source: str | None  # where the logged norms came from (see torchopt_lab.tracking)
    history: dict[str, list[float]]  # step, train_loss, train_accuracy, val_loss, val_accuracy


@dataclass
class Comparison:
    config: CompareConfig
    run_dir: Path
    results: dict[str, OptimizerResult]
    json_path: Path
    plot_path: Path


def build_model(in_features: int, hidden: Sequence[int], classes: int) -> nn.Sequential:
    """``Linear -> ReLU`` per hidden width, then a ``Linear`` to the class logits."""
    layers: list[torch.nn.Module] = []
    width = in_features
    for size in hidden:
        layers += [nn.Linear(width, size), nn.ReLU()]
        width = size
    layers.append(nn.Linear(width, classes))
    return nn.Sequential(*layers)


@torch.no_grad()
def evaluate(
    model: torch.nn.Module, loss_fn: torch.nn.Module, inputs: torch.Tensor, labels: torch.Tensor
) -> tuple[float, float]:
    """Mean loss and accuracy over the whole split."""
    model.eval()
    logits = model(inputs)
    loss = loss_fn(logits, labels).item()
    accuracy = (logits.argmax(dim=1) == labels).float().mean().item()
    model.train()
    return loss, accuracy


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_one(
    name: str,
    initial_model: torch.nn.Module,
    data: DigitsSplit,
    config: CompareConfig,
    run_dir: Path,
) -> OptimizerResult:
    """Train a deep copy of ``initial_model`` with optimizer ``name``, logging to ``run_dir``."""
    from tqdm.auto import tqdm

    device = data.train_inputs.device
    model = copy.deepcopy(initial_model)
    lr = config.lr_of(name)
    optimizer = OPTIMIZERS[name](model.parameters(), lr)
    loss_fn = nn.CrossEntropyLoss()
    run_config = {**asdict(config), "optimizer": name, "lr": lr}
    run_config.pop("progress")
    logger = TrainingLogger(
        run_dir / name,
        model,
        optimizer,
        histogram_every=config.histogram_every,
        config=run_config,
    )
    order = torch.Generator().manual_seed(config.seed)
    samples = data.train_inputs.shape[0]
    batches = samples // config.batch_size
    total = config.epochs * batches
    history: dict[str, list[float]] = {
        key: [] for key in ("step", "train_loss", "train_accuracy", "val_loss", "val_accuracy")
    }
    steps_to_target = None
    step_seconds = update_seconds = 0.0

    def record(step: int) -> None:
        nonlocal steps_to_target
        train_loss, train_accuracy = evaluate(model, loss_fn, data.train_inputs, data.train_labels)
        val_loss, val_accuracy = evaluate(model, loss_fn, data.val_inputs, data.val_labels)
        values = (step, train_loss, train_accuracy, val_loss, val_accuracy)
        for key, value in zip(history, values, strict=True):
            history[key].append(value)
        logger.log_scalars(
            {
                "eval/train_loss": train_loss,
                "eval/train_accuracy": train_accuracy,
                "eval/val_loss": val_loss,
                "eval/val_accuracy": val_accuracy,
            },
            step,
        )
        if steps_to_target is None and train_loss <= config.target_loss:
            steps_to_target = step

    record(0)
    bar = tqdm(total=total, desc=f"{name:>8}", disable=not config.progress, leave=True)
    step = 0
    for _ in range(config.epochs):
        permutation = torch.randperm(samples, generator=order).to(device)
        for batch in range(batches):
            index = permutation[batch * config.batch_size : (batch + 1) * config.batch_size]
            _synchronize(device)
            started = time.perf_counter()
            optimizer.zero_grad()
            loss = loss_fn(model(data.train_inputs[index]), data.train_labels[index])
            loss.backward()
            _synchronize(device)
            step_seconds += time.perf_counter() - started
            with logger.step(loss):
                started = time.perf_counter()
                optimizer.step()
                _synchronize(device)
                update_seconds += time.perf_counter() - started
            step += 1
            if step % config.eval_every == 0 or step == total:
                record(step)
                bar.set_postfix(val_loss=f"{history['val_loss'][-1]:.3f}")
            bar.update()
    bar.close()
    step_seconds += update_seconds
    result = OptimizerResult(
        name=name,
        lr=lr,
        train_loss=history["train_loss"][-1],
        train_accuracy=history["train_accuracy"][-1],
        val_loss=history["val_loss"][-1],
        val_accuracy=history["val_accuracy"][-1],
        steps=total,
        steps_to_target=steps_to_target,
        ms_per_step=1e3 * step_seconds / max(total, 1),
        ms_per_update=1e3 * update_seconds / max(total, 1),
        norm_source=logger.norm_source,
        history=history,
    )
    metrics = {
        key: getattr(result, key)
        for key in ("train_loss", "train_accuracy", "val_loss", "val_accuracy", "ms_per_step")
    }
    if steps_to_target is not None:
        metrics["steps_to_target"] = steps_to_target
    logger.finish(metrics)
    return result


# One marker per optimizer: optimizers with near-identical curves (SGD at lr 0.1 and Momentum at
# lr 0.01 take about the same effective step) would otherwise hide each other. Enough for every
# optimizer of OPTIMIZERS, the registry's included (a test holds it).
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "h", "<", ">", "p", "d", "8")


def figure_of(results: dict[str, OptimizerResult], target_loss: float) -> Any:
    """Loss (log scale) and accuracy against steps: solid train, dashed validation, a color and a
    marker per optimizer. Markers are staggered between optimizers (``markevery`` with a
    different offset each), so a curve under another still shows its own markers. Returns the
    matplotlib figure (Agg backend); close it with ``pyplot.close``."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    figure, (loss_axes, accuracy_axes) = pyplot.subplots(1, 2, figsize=(11, 4.2))
    count = max(len(results), 1)
    for index, result in enumerate(results.values()):
        steps = result.history["step"]
        every = max(len(steps) // 8, count)  # >= count: every optimizer its own offset
        style = {
            "color": f"C{index}",
            "marker": MARKERS[index % len(MARKERS)],
            "markevery": (index * every // count, every),
            "markersize": 5,
            "markerfacecolor": "none",
        }
        label = f"{result.name} (lr={result.lr:g})"
        loss_axes.plot(steps, result.history["train_loss"], **style)
        loss_axes.plot(steps, result.history["val_loss"], linestyle="--", **style)
        accuracy_axes.plot(steps, result.history["train_accuracy"], label=label, **style)
        accuracy_axes.plot(steps, result.history["val_accuracy"], linestyle="--", **style)
    loss_axes.axhline(
        target_loss,
        color="grey",
        linewidth=0.8,
        linestyle=":",
        label=f"target train loss {target_loss:g}",
    )
    loss_axes.set(yscale="log", xlabel="step", ylabel="cross-entropy", title="loss")
    # Every optimizer passes 80% early; the differences worth seeing are above it.
    accuracy_axes.set(xlabel="step", ylabel="accuracy", title="accuracy", ylim=(0.8, 1.005))
    accuracy_axes.legend(loc="lower right", fontsize="small")
    loss_axes.plot([], [], color="black", label="train (solid)")
    loss_axes.plot([], [], color="black", linestyle="--", label="validation (dashed)")
    loss_axes.legend(fontsize="small")
    for axes in (loss_axes, accuracy_axes):
        axes.grid(alpha=0.3)
    figure.suptitle("torchopt-lab compare: 8x8 digits, same initial weights and minibatches")
    figure.tight_layout()
    return figure


def plot(results: dict[str, OptimizerResult], path: Path, target_loss: float) -> None:
    """Write :func:`figure_of` as a PNG to ``path``, atomically."""
    from matplotlib import pyplot

    figure = figure_of(results, target_loss)
    try:
        write_atomically(path, lambda temporary: figure.savefig(temporary, dpi=90, format="png"))
    finally:
        pyplot.close(figure)


def format_table(results: dict[str, OptimizerResult], target_loss: float) -> str:
    """A fixed-width table of the final metrics, one row per optimizer."""
    header = (
        "optimizer",
        "lr",
        "train loss",
        "train acc",
        "val loss",
        "val acc",
        f"steps to loss<={target_loss:g}",
        "ms/step",
        "ms/update",
    )
    rows = [
        (
            r.name,
            f"{r.lr:g}",
            f"{r.train_loss:.4f}",
            f"{r.train_accuracy:.4f}",
            f"{r.val_loss:.4f}",
            f"{r.val_accuracy:.4f}",
            "not reached" if r.steps_to_target is None else str(r.steps_to_target),
            f"{r.ms_per_step:.3f}",
            f"{r.ms_per_update:.3f}",
        )
        for r in results.values()
    ]
    widths = [max(len(row[i]) for row in (header, *rows)) for i in range(len(header))]
    lines = [
        "  ".join(cell.rjust(width) for cell, width in zip(row, widths, strict=True))
        for row in (header, *rows)
    ]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def _new_run_dir(logdir: Path) -> Path:
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    run_dir = logdir / f"compare-{stamp}"
    suffix = 1
    while run_dir.exists():
        run_dir = logdir / f"compare-{stamp}-{suffix}"
        suffix += 1
    run_dir.mkdir(parents=True)
    return run_dir


def run_comparison(config: CompareConfig) -> Comparison:
    """Train every optimizer of ``config``; write the runs, the plot and the JSON; return all."""
    try:
        device = torch.device(config.device)
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as error:  # torch's errors for bad or absent devices
        raise ValueError(f"Invalid device: {config.device!r}: {error}") from None
    logdir = Path(config.logdir)
    if logdir.exists() and not logdir.is_dir():
        raise ValueError(f"Invalid logdir: {config.logdir!r} is a file, not a directory")
    data = load_digits_split(config.val_fraction, config.seed, device)
    if config.batch_size > data.train_inputs.shape[0]:
        raise ValueError(
            f"Invalid batch_size: {config.batch_size}; the training split has only "
            f"{data.train_inputs.shape[0]} samples"
        )
    torch.manual_seed(config.seed)
    initial_model = build_model(data.train_inputs.shape[1], config.hidden, 10).to(device)
    try:
        run_dir = _new_run_dir(logdir)
    except OSError as error:  # a file on the way, no permission, a read-only file system
        raise ValueError(
            f"Invalid logdir: {config.logdir!r}: cannot create {error.filename!r}: {error.strerror}"
        ) from None
    started = time.perf_counter()
    threads = torch.get_num_threads()
    torch.set_num_threads(config.threads)
    try:
        results = {
            name: train_one(name, initial_model, data, config, run_dir)
            for name in config.optimizers
        }
    finally:
        torch.set_num_threads(threads)
    seconds = time.perf_counter() - started
    plot_path = run_dir / "compare.png"
    plot(results, plot_path, config.target_loss)
    json_path = run_dir / "results.json"
    report = {
        "config": asdict(config),
        "results": {name: asdict(result) for name, result in results.items()},
        "total_seconds": seconds,
        "environment": {
            "torch": torch.__version__,
            "python": platform.python_version(),
            "device": str(device),
            "train_samples": data.train_inputs.shape[0],
            "val_samples": data.val_inputs.shape[0],
            "backends": backend_info(),
        },
    }
    write_text_atomically(json_path, json.dumps(report, indent=2, default=str))
    return Comparison(config, run_dir, results, json_path, plot_path)


def _learning_rate(text: str) -> tuple[str, float]:
    name, separator, value = text.partition("=")
    name = name.strip().lower()
    if not separator or name not in OPTIMIZERS:
        raise argparse.ArgumentTypeError(
            f"invalid --lr {text!r}: expected NAME=VALUE with NAME in {list(OPTIMIZERS)}"
        )
    try:
        lr = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid --lr {text!r}: {value!r} is no number") from None
    if not (math.isfinite(lr) and lr > 0):
        raise argparse.ArgumentTypeError(f"invalid --lr {text!r}: the learning rate must be > 0")
    return name, lr


def add_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = CompareConfig()
    parser.add_argument(
        "--optimizers",
        nargs="+",
        choices=list(OPTIMIZERS),
        default=list(defaults.optimizers),
        metavar="NAME",
        help=f"optimizers to compare, from {list(OPTIMIZERS)} (default: all)",
    )
    parser.add_argument(
        "--lr",
        nargs="+",
        action="extend",
        type=_learning_rate,
        default=[],
        metavar="NAME=LR",
        help="learning rate per optimizer, e.g. --lr adam=3e-3 sgd=0.05; only for optimizers "
        "in --optimizers (defaults: "
        + ", ".join(f"{name}={lr:g}" for name, lr in DEFAULT_LR.items())
        + ")",
    )
    parser.add_argument(
        "--epochs",
        type=int,
        default=defaults.epochs,
        help="passes over the training split (default: %(default)s)",
    )
    parser.add_argument(
        "--batch-size", type=int, default=defaults.batch_size, help="(default: %(default)s)"
    )
    parser.add_argument(
        "--hidden",
        type=int,
        nargs="+",
        default=list(defaults.hidden),
        help="hidden layer widths (default: %(default)s)",
    )
    parser.add_argument("--seed", type=int, default=defaults.seed, help="(default: %(default)s)")
    parser.add_argument(
        "--target-loss",
        type=float,
        default=defaults.target_loss,
        help="train loss whose first crossing the table reports (default: %(default)s)",
    )
    parser.add_argument(
        "--eval-every",
        type=int,
        default=defaults.eval_every,
        help="evaluate on the full splits every this many steps (default: %(default)s)",
    )
    parser.add_argument(
        "--device", default=defaults.device, help="cpu, cuda, cuda:1... (default: %(default)s)"
    )
    parser.add_argument(
        "--logdir",
        default=defaults.logdir,
        help="parent of the timestamped output directory (default: %(default)s)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=defaults.threads,
        help="torch CPU threads; this small MLP gains nothing from more, and on a busy machine "
        "extra threads spin and slow it down (default: %(default)s)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _check_learning_rates(given: list[tuple[str, float]], optimizers: tuple[str, ...]) -> None:
    """Refuse an ``--lr`` that would be silently ignored: for an optimizer not selected, or for
    one optimizer twice."""
    seen: dict[str, float] = {}
    for name, lr in given:
        if name not in optimizers:
            raise UsageError(
                f"--lr {name}={lr:g}: {name} is not among --optimizers ({' '.join(optimizers)})"
            )
        if name in seen:
            raise UsageError(f"--lr gives {name} twice: {name}={seen[name]:g} and {name}={lr:g}")
        seen[name] = lr


def run(args: argparse.Namespace) -> int:
    optimizers = tuple(dict.fromkeys(args.optimizers))
    _check_learning_rates(args.lr, optimizers)
    check_device(args.device)
    try:
        config = CompareConfig(
            optimizers=optimizers,
            lr={**DEFAULT_LR, **dict(args.lr)},
            epochs=args.epochs,
            batch_size=args.batch_size,
            hidden=tuple(args.hidden),
            seed=args.seed,
            target_loss=args.target_loss,
            eval_every=args.eval_every,
            device=args.device,
            threads=args.threads,
            logdir=args.logdir,
            progress=not args.no_progress,
        )
        comparison = run_comparison(config)
    except ValueError as error:
        print(f"torchopt-lab compare: error: {error}", file=sys.stderr)
        return 2
    print(format_table(comparison.results, config.target_loss))
    print(f"\nTensorBoard runs: {comparison.run_dir}  (tensorboard --logdir {config.logdir})")
    print(f"Plot: {comparison.plot_path}")
    print(f"Results: {comparison.json_path}")
    return 0
