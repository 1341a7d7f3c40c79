"""``torchopt-lab bench-optim-host``: host time of one fused-kernel step over many small tensors.

With thousands of small tensors a step's device work is tiny (Adam over 4096 tensors of 256 to
4096 float32 elements moves 250 MB: under 0.1 ms at an H100's bandwidth), so the step takes as
long as the host needs to prepare its launches. This measures that host work on any machine,
GPU or not: the parameters are CPU tensors, the optimizer takes its Triton path
(``backend="triton"``), and the kernel launches are replaced by a no-op, so what is timed is the
Python that runs per step (checks, tables, hyperparameters). Beside it, the host work torch.optim
does before its fused kernels on a GPU: ``_init_group`` collecting the tensors and
``_group_tensors_by_device_and_dtype``. That is a lower bound of torch's host time per step, since
its launches are left out too.

Two cases: the same gradient tensors every step, and new gradient tensors every step (as after
``zero_grad()`` and ``backward()``; the gradients alternate between two sets allocated beforehand,
so no allocation is timed). Each time is the median of ``--repeats`` steps.
"""

from __future__ import annotations

import argparse
import inspect
import os
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timezone

import torch

import torchopt_lab.optim as ours
from torchopt_lab._arguments import UsageError
from torchopt_lab.bench import choices, table_header
from torchopt_lab.bench.optim_gpu import PARAMETER_SETS

SMALL_TENSORS = "4096 small tensors"
#: The registered optimizers whose fused path is a built-in kernel (its host work is what this
#: measures) and which torch.optim has, to compare with: read from the registry, not listed.
OPTIMIZERS = tuple(
    name
    for name, cls in ours.REGISTRY.items()
    if cls.rule.kernel is not None and hasattr(torch.optim, name)
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--optimizers",
        default=",".join(OPTIMIZERS),
        help=f"comma-separated, from {', '.join(OPTIMIZERS)} (default: all)",
    )
    parser.add_argument(
        "--tensors",
        type=int,
        default=4096,
        help="number of small tensors, at most 4096 (default: %(default)s)",
    )
    parser.add_argument(
        "--repeats", type=int, default=30, help="timed steps per case (default: %(default)s)"
    )


@contextmanager
def _kernels_not_launched() -> Iterator[None]:
    """Run the optimizers' Triton path on CPU tensors without launching anything.

    The backend lets the Triton path take CPU tensors only under the Triton interpreter; nothing
    is interpreted here, since no kernel is launched.
    """
    from triton_kernels.optim import launchers

    original_launch = launchers._launch
    original_interpret = os.environ.get("TRITON_INTERPRET")
    launchers._launch = lambda *args, **kwargs: None
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        yield
    finally:
        launchers._launch = original_launch
        if original_interpret is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = original_interpret


def _median_ms(step: Callable[[], object], before: Callable[[int], object], repeats: int) -> float:
    times = []
    for index in range(repeats):
        before(index)
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def _torch_host_work(optimizer: torch.optim.Optimizer) -> None:
    """What torch.optim's step does on the host before launching its fused kernels: collect the
    tensors of each group (``_init_group``, a private method whose lists differ between
    optimizers and torch versions, hence the signature is read) and group them by device and
    dtype."""
    from torch.utils._foreach_utils import _group_tensors_by_device_and_dtype

    list_count = len(inspect.signature(optimizer._init_group).parameters) - 1  # after group
    for group in optimizer.param_groups:
        lists: list[list[torch.Tensor]] = [[] for _ in range(list_count)]
        optimizer._init_group(group, *lists)
        _group_tensors_by_device_and_dtype([values for values in lists if values])


def measure(name: str, tensors: int, repeats: int) -> dict[str, float]:
    """Milliseconds of host work per step: ours with the same and with new gradients, torch's
    lower bound (see the module docstring)."""
    shapes = PARAMETER_SETS[SMALL_TENSORS]()[:tensors]
    params = [torch.nn.Parameter(torch.zeros(shape)) for shape in shapes]
    gradient_sets = [[torch.zeros_like(p) for p in params] for _ in range(2)]

    def use_gradients(index: int) -> None:
        for param, grad in zip(params, gradient_sets[index % 2], strict=True):
            param.grad = grad

    use_gradients(0)
    options = {"lr": 0.1, "momentum": 0.9} if name == "SGD" else {}
    result = {}
    with _kernels_not_launched():
        mine = getattr(ours, name)(params, backend="triton", **options)
        for _ in range(3):
            mine.step()
        result["ours, same grads"] = _median_ms(mine.step, lambda index: None, repeats)
        result["ours, new grads"] = _median_ms(mine.step, use_gradients, repeats)
    theirs = getattr(torch.optim, name)(params, **options)
    theirs.step()  # creates the state that _init_group then reads
    result["torch, before its kernels"] = _median_ms(
        lambda: _torch_host_work(theirs), use_gradients, repeats
    )
    return result


def run(args: argparse.Namespace) -> int:
    names = choices(args.optimizers, OPTIMIZERS, "optimizer")
    if not 1 <= args.tensors <= 4096 or args.repeats < 1:
        raise UsageError(
            f"--tensors must be in [1, 4096] and --repeats positive, got {args.tensors} and "
            f"{args.repeats}"
        )
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    print(
        f"# bench-optim-host {when}: torch {torch.__version__}, {args.tensors} small tensors, "
        f"median of {args.repeats} steps, kernel launches not run"
    )
    print(
        table_header(
            [
                "optimizer",
                "ours ms, same grads",
                "ours ms, new grads",
                "torch ms before its kernels",
                "torch / ours (new grads)",
            ]
        )
    )
    for name in names:
        times = measure(name, args.tensors, args.repeats)
        mine, theirs = times["ours, new grads"], times["torch, before its kernels"]
        print(
            f"| {name} | {times['ours, same grads']:.2f} | {mine:.2f} | {theirs:.2f} "
            f"| {theirs / mine:.2f} |",
            flush=True,
        )
    return 0
