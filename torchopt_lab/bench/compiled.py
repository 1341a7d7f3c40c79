"""``torchopt-lab bench-compiled`` (or ``python -m torchopt_lab.bench.compiled``): torch.compile,
measured against eager and torch.

Two CPU timings, each against PyTorch in the same run:

- an optimizer step, ``@torch.compile def step(): optimizer.step()``, for each optimizer of
  ``--optimizers`` (all eleven by default, with bench-optim's options) over each parameter set of
  ``--sets`` (bench-optim's): ours eager, ours compiled (with ``fullgraph=True``: one graph, no
  break), torch.optim foreach eager, torch.optim compiled (where torch.optim has the optimizer;
  not Lion) (best of ``--repeats`` turns x ``--steps`` steps, and the first two calls, which
  include the compiles, cold: Inductor's caches off except under ``--quick``, after a first
  compile no row is charged with);
- forward + backward of an MLP of our layers compiled, against the same torch.nn MLP compiled
  (median of 20 steps, 1 thread, the torch path).
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable
from typing import Any

import torch
import torch._inductor.utils

import torchopt_lab.nn as ours_nn
import torchopt_lab.nn.functional as ours_functional
import torchopt_lab.optim as ours_optim
from torchopt_lab._arguments import UsageError, refuse_overridden_by_quick
from torchopt_lab.bench import add_set_arguments, choices, table_header, warm_compiler
from torchopt_lab.bench.optim import OPTIMIZERS, PARAM_SETS

#: name -> (ours, torch.optim's or None, the options both get): bench-optim's, and Lion.
STEPPED: dict[str, tuple[type, type | None, dict[str, Any]]] = {
    name: (spec.ours, spec.theirs, spec.options) for name, spec in OPTIMIZERS.items()
}
STEPPED.update(
    (name, (cls, None, {"lr": 1e-4}))
    for name, cls in sorted(ours_optim.REGISTRY.items())
    if name not in STEPPED
)
DESCRIPTION = "time compiled optimizer steps and layers against eager and torch's compiled ones"
_DEFAULTS = {"repeats": 5, "steps": 3}
QUICK_NOTE = (
    "# quick run: timings are not measurements (bench-optim's tiny sets, 2 turns of 1 step)"
)


def _clear_compiled_code() -> None:
    """Drop the kernels Inductor built and loaded earlier in this process (its in-memory caches,
    which ``force_disable_caches`` leaves), so that the next compile is cold."""
    clear = getattr(torch._inductor.utils, "clear_inductor_caches", None)
    if clear is not None:
        clear()


def _best_of(fn: Callable[[], None], turns: int = 5, steps: int = 3) -> float:
    best = float("inf")
    for _ in range(turns):
        start = time.perf_counter()
        for _ in range(steps):
            fn()
        best = min(best, (time.perf_counter() - start) / steps)
    return best


def optimizer_step(
    set_name: str = "transformer",
    name: str = "Adam",
    *,
    quick: bool = False,
    turns: int = 5,
    steps: int = 3,
) -> list[str]:
    """Rows of the optimizer-step table for optimizer ``name`` (ours, and torch.optim's where it
    has one) over parameter set ``set_name`` (its ``--quick`` shapes with ``quick``)."""
    full, tiny = PARAM_SETS[set_name]
    shapes = tiny() if quick else full()
    ours_class, torch_class, options = STEPPED[name]
    modes = ["ours eager", "ours compiled"]
    if torch_class is not None:
        modes += ["torch foreach eager", "torch compiled"]
    rows = []
    for mode in modes:
        generator = torch.Generator().manual_seed(0)
        params = [torch.randn(shape, generator=generator).requires_grad_() for shape in shapes]
        for param in params:
            param.grad = 1e-3 * torch.randn(param.shape, generator=generator)
        if mode.startswith("torch"):
            optimizer = torch_class(params, **options, foreach=True)
        else:
            optimizer = ours_class(params, **options, backend="torch")

        def step(optimizer: torch.optim.Optimizer = optimizer) -> None:
            optimizer.step()

        torch._dynamo.reset()
        # Ours must trace as one graph; torch.optim's step breaks the graph around the update
        # (its _use_grad_for_differentiable), so it cannot take fullgraph=True.
        run = torch.compile(step, fullgraph=mode == "ours compiled") if "compiled" in mode else step
        # The first call compiles; the second again where the update makes state from the first
        # gradient (SGD's momentum buffer): both untimed, so that no turn of the timing compiles.
        # Cold (except under --quick): with Inductor's caches on, torch's compile of a graph ours
        # had compiled before (plain SGD's foreach add) was a cache hit, 1.9 s against 16.7 s on
        # disk, 6.8 s against 15.0 s in memory (its C++ kernels already built and loaded).
        if "compiled" in mode and not quick:
            _clear_compiled_code()
        start = time.perf_counter()
        with torch._inductor.config.patch(force_disable_caches=not quick):
            run()
            run()
        first = time.perf_counter() - start
        best = _best_of(run, turns, steps)
        rows.append(
            f"| {name} | {set_name} | {len(shapes)} | {mode} | {best * 1e3:.1f} ms "
            f"| first two calls {first:.1f} s |"
        )
    return rows


def mlp_forward_backward() -> str:
    """One line: compiled ours against compiled torch.nn, forward + backward of an MLP."""
    os.environ["TORCHOPT_LAB_BACKEND"] = "torch"

    def build(nn: object) -> torch.nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(
            nn.Linear(256, 512),
            nn.ReLU(),
            nn.Linear(512, 512),
            nn.GELU(),
            nn.LayerNorm(512),
            nn.Linear(512, 10),
        )

    inputs, targets = torch.randn(256, 256), torch.randint(0, 10, (256,))
    medians = {}
    for name, model, loss_fn in (
        ("ours", build(ours_nn), ours_functional.cross_entropy),
        ("torch.nn", build(torch.nn), torch.nn.functional.cross_entropy),
    ):

        def train_step(model: torch.nn.Module = model, loss_fn: Callable = loss_fn) -> None:
            loss_fn(model(inputs), targets).backward()

        torch._dynamo.reset()
        run = torch.compile(train_step)
        for _ in range(4):
            run()
        times = []
        for _ in range(20):
            start = time.perf_counter()
            run()
            times.append(time.perf_counter() - start)
        medians[name] = sorted(times)[len(times) // 2]
    return (
        f"compiled ours {medians['ours'] * 1e3:.2f} ms, compiled torch.nn "
        f"{medians['torch.nn'] * 1e3:.2f} ms, ratio {medians['ours'] / medians['torch.nn']:.2f}"
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_set_arguments(parser, STEPPED, PARAM_SETS, **_DEFAULTS)
    parser.add_argument(
        "--quick",
        action="store_true",
        help="tiny sets, 2 repeats of 1 step: a smoke run, whose timings are not measurements",
    )
    parser.add_argument(
        "--no-mlp", action="store_true", help="skip the MLP forward + backward timing"
    )


def run(args: argparse.Namespace) -> int:
    names = choices(args.optimizers, STEPPED, "optimizer")
    set_names = choices(args.sets, PARAM_SETS, "parameter set")
    if args.repeats < 1 or args.steps < 1:
        raise UsageError(f"--repeats and --steps must be >= 1, got {args.repeats} and {args.steps}")
    refuse_overridden_by_quick(args, _DEFAULTS)
    turns, steps = (2, 1) if args.quick else (args.repeats, args.steps)
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    torch.set_num_threads(2)
    print(
        f"# bench-compiled {when}: torch {torch.__version__}, cpu, 2 threads, bench-optim's "
        f"options, best of {turns} turns x {steps} steps"
    )
    if args.quick:
        print(QUICK_NOTE)
    else:
        print(f"# a first compile, charged to no row: {warm_compiler():.1f} s")
    print(table_header(["optimizer", "set", "tensors", "step", "best", "first two (compiles)"]))
    for set_name in set_names:
        for name in names:
            for row in optimizer_step(set_name, name, quick=args.quick, turns=turns, steps=steps):
                print(row, flush=True)
    if not args.no_mlp:
        torch.set_num_threads(1)
        print(f"# MLP forward + backward, 1 thread, median of 20: {mlp_forward_backward()}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m torchopt_lab.bench.compiled", description=DESCRIPTION
    )
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except UsageError as error:
        parser.error(str(error))
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
