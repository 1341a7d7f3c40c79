"""``torchopt-lab bench-optim``: optimizer step time of ours against torch.optim, in one run.

For each optimizer and parameter set it times ``step()`` of ours, torch.optim with
``foreach=True``, and torch.optim with ``fused=True`` where torch has a fused kernel for the device
(tried, not assumed), and prints the ratios ours/torch (below 1 means ours is faster). Variants are
timed in turns, repeat after repeat, and each reports its best turn (as ``timeit`` advises: on a
shared machine, slower turns measure the neighbours' load, not the code). Parameters and gradients
are shared by the variants; each keeps its own optimizer state.

Everything is in tables: add a parameter set to ``PARAM_SETS`` or an optimizer to ``OPTIMIZERS``.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import torch

import torchopt_lab.optim as ours
from torchopt_lab._arguments import UsageError, check_device, refuse_overridden_by_quick
from torchopt_lab.bench import add_set_arguments, choices, optim_gpu, table_header


@dataclass(frozen=True)
class OptimizerSpec:
    """Ours and torch's class for one optimizer, with the options both get."""

    ours: type[torch.optim.Optimizer]
    theirs: type[torch.optim.Optimizer]
    options: dict[str, Any] = field(default_factory=dict)


OPTIMIZERS: dict[str, OptimizerSpec] = {
    "SGD": OptimizerSpec(ours.SGD, torch.optim.SGD, {"lr": 1e-3}),
    "Momentum": OptimizerSpec(ours.Momentum, torch.optim.SGD, {"lr": 1e-3, "momentum": 0.9}),
    "Adagrad": OptimizerSpec(ours.Adagrad, torch.optim.Adagrad, {"lr": 1e-3}),
    "RMSprop": OptimizerSpec(ours.RMSprop, torch.optim.RMSprop, {"lr": 1e-4}),
    "Adam": OptimizerSpec(ours.Adam, torch.optim.Adam, {"lr": 1e-4}),
    "AdamW": OptimizerSpec(ours.AdamW, torch.optim.AdamW, {"lr": 1e-4}),
}
# The optimizers declared as rules run by RuleOptimizer join from their registry, wherever
# torch.optim has one to time against (not Lion); the built-ins (rule.reference set) are listed
# above with the options their timings have always used.
OPTIMIZERS.update(
    (name, OptimizerSpec(cls, getattr(torch.optim, name), {"lr": 1e-4}))
    for name, cls in sorted(ours.REGISTRY.items())
    if hasattr(torch.optim, name) and cls.rule.reference is None
)


def transformer_shapes(layers: int, width: int, vocab: int) -> list[tuple[int, ...]]:
    """A GPT-like stack: embeddings, then per layer two norms, attention and MLP with biases."""
    shapes: list[tuple[int, ...]] = [(vocab, width), (1024, width)]
    for _ in range(layers):
        shapes += [(width,), (width,)]  # attention norm
        shapes += [(width, 3 * width), (3 * width,), (width, width), (width,)]
        shapes += [(width,), (width,)]  # MLP norm
        shapes += [(width, 4 * width), (4 * width,), (4 * width, width), (width,)]
    return [*shapes, (width,), (width,)]


def small_shapes(count: int) -> list[tuple[int, ...]]:
    """Many small tensors: biases, norms and small matrices, as in a wide shallow model."""
    cycle = [(256,), (64, 16), (128,), (32, 32), (512,)]
    return [cycle[i % len(cycle)] for i in range(count)]


# name -> (full-size shapes, --quick shapes)
PARAM_SETS: dict[str, tuple[Callable[[], list], Callable[[], list]]] = {
    "transformer": (
        lambda: transformer_shapes(layers=16, width=360, vocab=4096),
        lambda: transformer_shapes(layers=2, width=32, vocab=64),
    ),
    "small-tensors": (lambda: small_shapes(2000), lambda: small_shapes(50)),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_set_arguments(parser, OPTIMIZERS, PARAM_SETS)
    parser.add_argument(
        "--device",
        default="cpu",
        help="cpu (the torch path) or cuda (the fused Triton kernels on GPU-sized sets: "
        "GPT-2-small, 1.3B parameters, 4096 small tensors; the other options are for cpu) "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "float64", "bfloat16", "float16"],
        help="parameter and state dtype (default: %(default)s)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="tiny sets, 2 repeats of 1 step: a smoke run, whose timings are not measurements",
    )


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _variants(
    spec: OptimizerSpec, params: list[torch.Tensor]
) -> dict[str, torch.optim.Optimizer | None]:
    """Ours, torch foreach, torch fused and ours with ``fused=True`` (the last two None where
    torch has no fused kernel here)."""
    variants: dict[str, torch.optim.Optimizer | None] = {
        "ours": spec.ours(params, **spec.options, backend="torch"),
        "foreach": spec.theirs(params, **spec.options, foreach=True),
    }
    try:
        fused = spec.theirs(params, **spec.options, fused=True)
        fused.step()  # torch checks the device and dtype lazily, at the first step
        variants["fused"] = fused
    except (TypeError, RuntimeError):
        variants["fused"] = None
    # Ours with fused=True where torch has a fused kernel here: on the torch path that is torch's
    # fused update on our state (docs/optimizers.md), so the ratio measures our step's overhead.
    variants["ours_fused"] = (
        spec.ours(params, **spec.options, backend="torch", fused=True)
        if variants["fused"] is not None
        else None
    )
    return variants


def _time_turn(optimizer: torch.optim.Optimizer, steps: int, device: torch.device) -> float:
    _synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        optimizer.step()
    _synchronize(device)
    return (time.perf_counter() - start) / steps


def measure(
    spec: OptimizerSpec,
    shapes: list[tuple[int, ...]],
    *,
    device: torch.device,
    dtype: torch.dtype,
    repeats: int,
    steps: int,
) -> dict[str, float | None]:
    """Best seconds per step of each variant, timed in turns."""
    generator = torch.Generator(device="cpu").manual_seed(0)
    params = []
    for shape in shapes:
        p = torch.randn(shape, generator=generator).to(device, dtype).requires_grad_()
        p.grad = 1e-3 * torch.randn(shape, generator=generator).to(device, dtype)
        params.append(p)
    variants = _variants(spec, params)
    times: dict[str, list[float]] = {name: [] for name, opt in variants.items() if opt}
    for optimizer in variants.values():
        if optimizer is not None:
            optimizer.step()  # warm-up: state allocation happens here, not in the timings
    for _ in range(repeats):
        for name in times:
            times[name].append(_time_turn(variants[name], steps, device))
    return {name: min(times[name]) if name in times else None for name in variants}


QUICK_NOTE = (
    "# quick run: timings are not measurements (tiny sets, single-step turns); its ratios only "
    "show that every variant ran"
)


def _format_ms(seconds: float | None) -> str:
    return "n/a" if seconds is None else f"{seconds * 1e3:.2f}"


def _format_ratio(mine: float, theirs: float | None) -> str:
    return "n/a" if theirs is None else f"{mine / theirs:.2f}"


# What the cuda run ignores, with the value that means "not given".
_CPU_ONLY = {
    "optimizers": ",".join(OPTIMIZERS),
    "sets": ",".join(PARAM_SETS),
    "repeats": 7,
    "steps": 3,
    "dtype": "float32",
    "quick": False,
}


def run(args: argparse.Namespace) -> int:
    device = check_device(args.device)
    if device.type == "cuda":
        ignored = [name for name, value in _CPU_ONLY.items() if getattr(args, name) != value]
        if ignored:
            raise UsageError(
                "--device cuda runs its fixed GPU cases and sets, float32; "
                + ", ".join(f"--{name} {getattr(args, name)}" for name in ignored)
                + " would be ignored"
            )
        # On a GPU: the fused kernels' cases and sets (GPT-2-small, 1.3B, 4096 small tensors),
        # with achieved bandwidth against the device's copy bandwidth.
        when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        print(f"# bench-optim --device cuda {when}: torch {torch.__version__}")
        print(optim_gpu.report(device), flush=True)
        return 0
    optimizer_names = choices(args.optimizers, OPTIMIZERS, "optimizer")
    set_names = choices(args.sets, PARAM_SETS, "parameter set")
    dtype = getattr(torch, args.dtype)
    if args.repeats < 1 or args.steps < 1:
        raise UsageError(f"--repeats and --steps must be >= 1, got {args.repeats} and {args.steps}")
    refuse_overridden_by_quick(args, {name: _CPU_ONLY[name] for name in ("repeats", "steps")})
    repeats, steps = (2, 1) if args.quick else (args.repeats, args.steps)
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    print(
        f"# bench-optim {when}: torch {torch.__version__}, device {device}, {args.dtype}, "
        f"{torch.get_num_threads()} threads, best of {repeats} turns x {steps} steps"
    )
    if args.quick:
        print(QUICK_NOTE)
    columns = ["optimizer", "set", "tensors", "params", "ours ms", "foreach ms", "fused ms"]
    columns.append("ours fused=True ms")
    ratios = ["ours/foreach", "ours/fused", "ours fused=True/fused"]
    if args.quick:
        ratios = [f"{ratio} (not measured)" for ratio in ratios]
    print(table_header([*columns, *ratios]))
    for set_name in set_names:
        full, quick = PARAM_SETS[set_name]
        shapes = quick() if args.quick else full()
        count = sum(torch.Size(shape).numel() for shape in shapes)
        for name in optimizer_names:
            result = measure(
                OPTIMIZERS[name], shapes, device=device, dtype=dtype, repeats=repeats, steps=steps
            )
            mine = result["ours"]
            print(
                f"| {name} | {set_name} | {len(shapes)} | {count / 1e6:.2f}M "
                f"| {_format_ms(mine)} | {_format_ms(result['foreach'])} "
                f"| {_format_ms(result['fused'])} | {_format_ms(result['ours_fused'])} "
                f"| {_format_ratio(mine, result['foreach'])} "
                f"| {_format_ratio(mine, result['fused'])} "
                f"| {_format_ratio(result['ours_fused'] or 0.0, result['fused'])} |",
                flush=True,
            )
    return 0
