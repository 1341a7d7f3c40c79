"""``torchopt-lab bench-nn``: one training step (forward, backward, SGD step) of an MLP, a small
CNN and a transformer block minus attention (Embedding, RMSNorm, SiLU) built from
``torchopt_lab.nn`` against the same models from ``torch.nn``, timed in the same run, with the
ratio ours / torch.

The two models of a pair share their initial weights and data; steps alternate between them so
that machine noise hits both alike, and the median step time is reported.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType

import torch
from torch import nn as torch_nn

from torchopt_lab import nn as our_nn
from torchopt_lab._arguments import UsageError, refuse_overridden_by_quick


@dataclass(frozen=True)
class Workload:
    """A model family and the shapes of one batch."""

    name: str
    build: Callable[[ModuleType], torch_nn.Module]
    input_shape: tuple[int, ...]
    classes: int
    vocabulary: int = 0  # > 0: the input is token ids below it, not floats


def mlp(nn: ModuleType, width: int = 512) -> torch_nn.Module:
    """784 -> width -> width/2 -> 10, ReLU, for flattened 28x28 images."""
    return nn.Sequential(
        nn.Linear(784, width),
        nn.ReLU(),
        nn.Linear(width, width // 2),
        nn.ReLU(),
        nn.Linear(width // 2, 10),
    )


def cnn(nn: ModuleType, channels: int = 16) -> torch_nn.Module:
    """Two conv-batchnorm-relu blocks (the second strided) and a linear classifier, for 3x32x32."""
    return nn.Sequential(
        nn.Conv2d(3, channels, 3, padding=1),
        nn.BatchNorm2d(channels),
        nn.ReLU(inplace=True),
        nn.Conv2d(channels, 2 * channels, 3, stride=2, padding=1),
        nn.BatchNorm2d(2 * channels),
        nn.ReLU(inplace=True),
        torch_nn.Flatten(),
        nn.Linear(2 * channels * 16 * 16, 10),
    )


def block(
    nn: ModuleType, vocabulary: int = 1000, width: int = 128, sequence: int = 32
) -> torch_nn.Module:
    """A transformer block minus attention, for ``sequence`` token ids: embedding, RMSNorm, a
    SiLU feed-forward (width -> 4 width -> width), and a linear classifier over the sequence."""
    return nn.Sequential(
        nn.Embedding(vocabulary, width),
        nn.RMSNorm(width),
        nn.Linear(width, 4 * width),
        nn.SiLU(),
        nn.Linear(4 * width, width),
        torch_nn.Flatten(),
        nn.Linear(sequence * width, 10),
    )


def workloads(quick: bool) -> list[Workload]:
    batch_mlp, batch_cnn, batch_block = (16, 4, 4) if quick else (256, 64, 64)
    return [
        Workload("mlp", mlp, (batch_mlp, 784), 10),
        Workload("cnn", cnn, (batch_cnn, 3, 32, 32), 10),
        Workload("block", block, (batch_block, 32), 10, vocabulary=1000),
    ]


def _step_fn(
    model: torch_nn.Module, loss_fn: torch_nn.Module, data: torch.Tensor, target: torch.Tensor
) -> Callable[[], None]:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss_fn(model(data), target).backward()
        optimizer.step()

    return step


def time_pair(workload: Workload, steps: int, warmup: int) -> tuple[float, float]:
    """Median seconds per training step: (ours, torch)."""
    torch.manual_seed(0)
    theirs = workload.build(torch_nn)
    ours = workload.build(our_nn)
    ours.load_state_dict(theirs.state_dict())
    if workload.vocabulary:
        data = torch.randint(0, workload.vocabulary, workload.input_shape)
    else:
        data = torch.randn(workload.input_shape)
    target = torch.randint(0, workload.classes, (workload.input_shape[0],))
    our_step = _step_fn(ours, our_nn.CrossEntropyLoss(), data, target)
    their_step = _step_fn(theirs, torch_nn.CrossEntropyLoss(), data, target)
    for _ in range(warmup):
        our_step()
        their_step()
    our_times, their_times = [], []
    for _ in range(steps):
        for step, times in ((our_step, our_times), (their_step, their_times)):
            start = time.perf_counter()
            step()
            times.append(time.perf_counter() - start)
    return statistics.median(our_times), statistics.median(their_times)


# The sizing options' defaults: the parser's, and what --quick refuses to see overridden.
_SIZES = {"steps": 50, "warmup": 5}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--steps",
        type=int,
        default=_SIZES["steps"],
        help="timed steps per model (default: %(default)s)",
    )
    parser.add_argument(
        "--warmup",
        type=int,
        default=_SIZES["warmup"],
        help="untimed steps first (default: %(default)s)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch intra-op threads (default: torch's choice); 1 is steadier on a busy machine",
    )
    parser.add_argument(
        "--quick", action="store_true", help="tiny batches and 3 steps: a smoke test, not a timing"
    )


QUICK_NOTE = (
    "# quick run: timings are not measurements (tiny batches, 3 steps); its ratios only show that "
    "both models ran"
)


def run(args: argparse.Namespace) -> int:
    if args.steps < 1 or args.warmup < 0:
        raise UsageError(
            f"--steps must be >= 1 and --warmup >= 0, got {args.steps} and {args.warmup}"
        )
    if args.threads is not None and args.threads < 1:
        raise UsageError(f"--threads must be >= 1, got {args.threads}")
    refuse_overridden_by_quick(args, _SIZES)
    steps, warmup = (3, 1) if args.quick else (args.steps, args.warmup)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    print(
        f"training step (forward + backward + SGD), median of {steps}; torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads"
    )
    if args.quick:
        print(QUICK_NOTE)
    ratio = "ratio (not measured)" if args.quick else "ratio"
    print(f"{'model':<6} {'batch':>6} {'torchopt_lab ms':>16} {'torch.nn ms':>12} {ratio:>6}")
    for workload in workloads(args.quick):
        ours, theirs = time_pair(workload, steps, warmup)
        print(
            f"{workload.name:<6} {workload.input_shape[0]:>6} {ours * 1e3:>16.3f} "
            f"{theirs * 1e3:>12.3f} {ours / theirs:>6.2f}"
        )
    return 0
