"""``torchopt-lab bench-cpu-fused``: the ``fused=True`` CPU step of rule optimizers, in one run.

Three kinds of rows, on ``bench-optim``'s parameter sets (``transformer``, ``small-tensors``):

- **the mechanism against torch's fused CPU kernels**: SGD with momentum, Adagrad, Adam and AdamW
  written below in rule form (``update(param, grad, *state, **scalars)``, *for this benchmark
  only*: the package's built-in optimizers run torch's own fused kernels for ``fused=True`` on
  CPU), compiled and run by :mod:`torchopt_lab.optim._cpu_fused` exactly as a rule optimizer's
  ``fused=True`` step is, against ``torch.optim``'s ``fused=True`` on the same tensors;
- **the same four as our built-in optimizers** (``<name> declared``): their whole ``step()``
  with ``fused=True``, their declaration's ``update`` compiled (``_cpu_fused.TORCH_KERNELS`` off
  for these rows), against the same torch fused kernels: what a user gets with the switch off;
- **every registered rule optimizer**: ``fused=True`` against its torch path (``fused=None``).

Each row also gives the one-time compile cost: the first two steps' time less two steady
steps' (an update that creates its state compiles on the second step), with Inductor's on-disk
caches disabled (except under ``--quick``) so that it is a cold compile, after a first compile
that no row is charged with (a process's first also builds what later ones reuse, about 11 s);
an update compiled for an earlier row (the same update, dtype and branch) shows about 0.
Variants are timed in turns and each reports its best turn (``timeit``'s advice for a shared
machine); ``paired median`` is the median over the turns of ours / the baseline, the two timed
back to back in each turn (first in turn), which a machine whose speed drifts moves less than
the ratio of the best turns.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import torch
from torch import Tensor

from torchopt_lab._arguments import UsageError, refuse_overridden_by_quick
from torchopt_lab.bench import add_set_arguments, choices, table_header, warm_compiler
from torchopt_lab.bench.optim import PARAM_SETS, QUICK_NOTE
from torchopt_lab.optim import _cpu_fused
from torchopt_lab.optim.rules import REGISTRY

# --- torch's fused CPU optimizers in rule form: for this benchmark only -----------------------


def _sgd_momentum(
    param: Tensor, grad: Tensor, momentum_buffer: Tensor, *, lr: float, momentum: float
):
    # b_t = mu b + g (dampening 0; b_0 = 0 gives torch's b_1 = g), theta -= lr b_t.
    momentum_buffer = momentum_buffer * momentum + grad
    return param - lr * momentum_buffer, momentum_buffer


def _adagrad(param: Tensor, grad: Tensor, state_sum: Tensor, *, clr: float, eps: float):
    # G_t = G + g^2, theta -= lr_t g / (sqrt(G_t) + eps).
    state_sum = state_sum + grad * grad
    return param - clr * grad / (state_sum.sqrt() + eps), state_sum


def _adam(
    param: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    decoupled: bool,
    bias_correction1: float,
    bias_correction2_sqrt: float,
):
    if weight_decay != 0:
        if decoupled:  # AdamW: theta *= 1 - lr lambda
            param = param * (1 - lr * weight_decay)
        else:  # Adam: g += lambda theta
            grad = grad + weight_decay * param
    exp_avg = torch.lerp(exp_avg, grad, 1 - beta1)
    exp_avg_sq = exp_avg_sq * beta2 + (1 - beta2) * grad * grad
    denom = exp_avg_sq.sqrt() / bias_correction2_sqrt + eps
    return param - (lr / bias_correction1) * exp_avg / denom, exp_avg, exp_avg_sq


@dataclass(frozen=True)
class TorchFused:
    """A torch.optim optimizer with a fused CPU kernel, and its update in rule form."""

    theirs: type[torch.optim.Optimizer]
    options: dict[str, Any]
    update: Callable[..., tuple[Tensor, ...]]
    states: int
    scalars: Callable[[int], dict[str, Any]]


def _adam_scalars(weight_decay: float, decoupled: bool) -> Callable[[int], dict[str, Any]]:
    def scalars(step: int) -> dict[str, Any]:
        return {
            "lr": 1e-4,
            "beta1": 0.9,
            "beta2": 0.999,
            "eps": 1e-8,
            "weight_decay": weight_decay,
            "decoupled": decoupled,
            "bias_correction1": 1 - 0.9**step,
            "bias_correction2_sqrt": (1 - 0.999**step) ** 0.5,
        }

    return scalars


TORCH_FUSED: dict[str, TorchFused] = {
    "SGD(momentum)": TorchFused(
        torch.optim.SGD,
        {"lr": 1e-3, "momentum": 0.9},
        _sgd_momentum,
        1,
        lambda step: {"lr": 1e-3, "momentum": 0.9},
    ),
    "Adagrad": TorchFused(
        torch.optim.Adagrad, {"lr": 1e-3}, _adagrad, 1, lambda step: {"clr": 1e-3, "eps": 1e-10}
    ),
    "Adam": TorchFused(torch.optim.Adam, {"lr": 1e-4}, _adam, 2, _adam_scalars(0.0, False)),
    "AdamW": TorchFused(torch.optim.AdamW, {"lr": 1e-4}, _adam, 2, _adam_scalars(1e-2, True)),
}

# The same four as our built-in optimizers, through their whole ``step()``: ``fused=True`` on CPU
# tensors with their declaration's ``update`` compiled (``_cpu_fused.TORCH_KERNELS`` off for the
# row: by default they hand the step to torch's kernels), against the same torch fused kernels.
DECLARED: dict[str, tuple[str, dict[str, Any]]] = {
    f"{name} declared": (spec.theirs.__name__, spec.options) for name, spec in TORCH_FUSED.items()
}

# ------------------------------------------------------------------------------------------------


# The registered optimizers beside the ones torch has fused CPU kernels for (the built-ins Adam
# and AdamW are timed against torch's fused kernels above, not twice).
_RULES = sorted(name for name in REGISTRY if name not in TORCH_FUSED)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    names = [*TORCH_FUSED, *DECLARED, *_RULES]
    add_set_arguments(parser, names, PARAM_SETS)
    parser.add_argument(
        "--quick",
        action="store_true",
        help="tiny sets, 2 repeats of 1 step: a smoke run, whose timings are not measurements",
    )


def _tensors(shapes: list[tuple[int, ...]]) -> tuple[list[Tensor], list[Tensor]]:
    generator = torch.Generator().manual_seed(0)
    params = [torch.randn(shape, generator=generator) for shape in shapes]
    grads = [1e-3 * torch.randn(shape, generator=generator) for shape in shapes]
    return params, grads


class _MechanismStep:
    """The rule-form update of a torch fused optimizer, stepped by the fused CPU path."""

    def __init__(self, spec: TorchFused, params: list[Tensor], grads: list[Tensor]) -> None:
        self.spec, self.count = spec, 0
        self.params, self.grads = [p.detach() for p in params], grads
        self.states = [[torch.zeros_like(p) for p in params] for _ in range(spec.states)]
        self.plans: dict = {}

    def step(self) -> None:
        self.count += 1
        left = _cpu_fused.fused_update(
            "bench.cpu_fused",
            self.spec.update,
            self.params,
            self.grads,
            self.states,
            self.spec.scalars(self.count),
            False,
            self.plans,
        )
        if left:
            raise RuntimeError(f"the fused CPU path did not update {len(left)} tensors")


class _DeclaredStep:
    """A built-in optimizer's ``fused=True`` step with its declaration's update compiled."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer

    def step(self) -> None:
        kernels, _cpu_fused.TORCH_KERNELS = _cpu_fused.TORCH_KERNELS, False
        try:
            self.optimizer.step()
        finally:
            _cpu_fused.TORCH_KERNELS = kernels


def _variants(name: str, shapes: list[tuple[int, ...]]) -> tuple[Any, Any, str]:
    """(ours fused, the baseline, the baseline's name), on their own copies of one set."""
    params, grads = _tensors(shapes)
    theirs_params = [p.clone().requires_grad_() for p in params]
    for p, g in zip(theirs_params, grads, strict=True):
        p.grad = g
    if name in TORCH_FUSED:
        spec = TORCH_FUSED[name]
        baseline = spec.theirs(theirs_params, **spec.options, fused=True)
        return _MechanismStep(spec, params, grads), baseline, "torch fused"
    ours_params = [p.clone().requires_grad_() for p in params]
    for p, g in zip(ours_params, grads, strict=True):
        p.grad = g
    if name in DECLARED:
        cls_name, options = DECLARED[name]
        baseline = getattr(torch.optim, cls_name)(theirs_params, **options, fused=True)
        ours = REGISTRY[cls_name](ours_params, **options, fused=True)
        return _DeclaredStep(ours), baseline, "torch fused"
    cls = REGISTRY[name]
    fused = cls(ours_params, lr=1e-4, fused=True)
    return fused, cls(theirs_params, lr=1e-4, backend="torch"), "ours reference"


def _time_turn(optimizer: Any, steps: int) -> float:
    start = time.perf_counter()
    for _ in range(steps):
        optimizer.step()
    return (time.perf_counter() - start) / steps


def paired_ratio(ours: list[float], baseline: list[float]) -> float:
    """The median over the turns of ours / the baseline, each turn's two timed back to back: on a
    machine whose speed drifts (other tenants' memory traffic), a slow stretch slows both sides
    of a turn, while the best turns of each side may come from different stretches."""
    return statistics.median(a / b for a, b in zip(ours, baseline, strict=True))


def measure(name: str, shapes: list[tuple[int, ...]], repeats: int, steps: int) -> dict[str, Any]:
    """Best seconds per step of ours fused and of the baseline, their paired ratio
    (:func:`paired_ratio`) and the one-time compile."""
    ours, baseline, baseline_name = _variants(name, shapes)
    # The first two steps compile (cold: Inductor's caches are off in run()): an update that
    # creates its state (SGD's momentum buffer) runs its torch update on the first step and
    # compiles on the second.
    first = 2 * _time_turn(ours, 2)
    baseline.step()  # state allocation, not timed
    times: dict[str, list[float]] = {"ours": [], "baseline": []}
    for turn in range(repeats):
        # Which side goes first alternates, so that neither always follows the other's traffic.
        for key in ("ours", "baseline") if turn % 2 == 0 else ("baseline", "ours"):
            times[key].append(_time_turn(ours if key == "ours" else baseline, steps))
    best = {key: min(value) for key, value in times.items()}
    compile_time = max(first - 2 * best["ours"], 0.0)
    paired = paired_ratio(times["ours"], times["baseline"])
    return {**best, "paired": paired, "baseline_name": baseline_name, "compile": compile_time}


def run(args: argparse.Namespace) -> int:
    names = choices(args.optimizers, [*TORCH_FUSED, *DECLARED, *_RULES], "optimizer")
    set_names = choices(args.sets, list(PARAM_SETS), "parameter set")
    if args.repeats < 1 or args.steps < 1:
        raise UsageError(f"--repeats and --steps must be >= 1, got {args.repeats} and {args.steps}")
    refuse_overridden_by_quick(args, {"repeats": 7, "steps": 3})
    repeats, steps = (2, 1) if args.quick else (args.repeats, args.steps)
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    print(
        f"# bench-cpu-fused {when}: torch {torch.__version__}, cpu, float32, "
        f"{torch.get_num_threads()} threads, best of {repeats} turns x {steps} steps (paired: "
        f"the median of the turns' ratios), {_cpu_fused.CHUNK} tensors per compiled call"
    )
    if args.quick:
        print(QUICK_NOTE)
    else:
        print(f"# a first compile, charged to no row: {warm_compiler():.1f} s")
    unmeasured = " (not measured)" if args.quick else ""
    ratio, paired = f"ours fused/baseline{unmeasured}", f"paired median{unmeasured}"
    columns = ["optimizer", "set", "tensors", "params", "ours fused ms", "baseline", "baseline ms"]
    print(table_header([*columns, ratio, paired, "compile s"]))
    # A cold compile is the one-time cost; --quick (not a measurement) keeps the caches.
    with torch._inductor.config.patch(force_disable_caches=not args.quick):
        for set_name in set_names:
            full, quick = PARAM_SETS[set_name]
            shapes = quick() if args.quick else full()
            count = sum(torch.Size(shape).numel() for shape in shapes)
            for name in names:
                result = measure(name, shapes, repeats, steps)
                print(
                    f"| {name} | {set_name} | {len(shapes)} | {count / 1e6:.2f}M "
                    f"| {result['ours'] * 1e3:.2f} | {result['baseline_name']} "
                    f"| {result['baseline'] * 1e3:.2f} "
                    f"| {result['ours'] / result['baseline']:.2f} | {result['paired']:.2f} "
                    f"| {result['compile']:.1f} |",
                    flush=True,
                )
    return 0
