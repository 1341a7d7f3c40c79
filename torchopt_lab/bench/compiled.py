"""``python -m torchopt_lab.bench.compiled``: torch.compile, measured against eager and torch.

Two CPU timings, each against PyTorch in the same run:

- an optimizer step, ``@torch.compile def step(): optimizer.step()``, Adam (built in) and NAdam
  (a rule optimizer) over bench-optim's transformer set: ours eager, ours compiled (with
  ``fullgraph=True``: one graph, no break), torch.optim foreach eager, torch.optim compiled (best
  of 5 turns x 3 steps, and the first call, which includes the compile);
- forward + backward of an MLP of our layers compiled, against the same torch.nn MLP compiled
  (median of 20 steps, 1 thread, the torch path).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

import torch

import torchopt_lab.nn as ours_nn
import torchopt_lab.nn.functional as ours_functional
import torchopt_lab.optim as ours_optim
from torchopt_lab.bench.optim import PARAM_SETS


def _best_of(fn: Callable[[], None], turns: int = 5, steps: int = 3) -> float:
    best = float("inf")
    for _ in range(turns):
        start = time.perf_counter()
        for _ in range(steps):
            fn()
        best = min(best, (time.perf_counter() - start) / steps)
    return best


def optimizer_step(set_name: str = "transformer", name: str = "Adam") -> list[str]:
    """Rows of the optimizer-step table for optimizer ``name`` (in torch.optim and ours)."""
    shapes = PARAM_SETS[set_name][0]()
    rows = []
    for mode in ("ours eager", "ours compiled", "torch foreach eager", "torch compiled"):
        generator = torch.Generator().manual_seed(0)
        params = [torch.randn(shape, generator=generator).requires_grad_() for shape in shapes]
        for param in params:
            param.grad = 1e-3 * torch.randn(param.shape, generator=generator)
        if mode.startswith("torch"):
            optimizer = getattr(torch.optim, name)(params, lr=1e-3, foreach=True)
        else:
            optimizer = getattr(ours_optim, name)(params, lr=1e-3, backend="torch")

        def step(optimizer: torch.optim.Optimizer = optimizer) -> None:
            optimizer.step()

        torch._dynamo.reset()
        # Ours must trace as one graph; torch.optim's step breaks the graph around the update
        # (its _use_grad_for_differentiable), so it cannot take fullgraph=True.
        run = torch.compile(step, fullgraph=mode == "ours compiled") if "compiled" in mode else step
        start = time.perf_counter()
        run()
        first = time.perf_counter() - start
        rows.append(
            f"| {name} | {mode} | {_best_of(run) * 1e3:.1f} ms | first call {first:.1f} s |"
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


def main() -> None:
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    torch.set_num_threads(2)
    print(f"# {when}: torch {torch.__version__}, lr=1e-3 over the transformer set, 2 threads")
    print("| optimizer | step | best of 5 turns x 3 steps | first call (compile included) |")
    print("|---|---|---|---|")
    for name in ("Adam", "NAdam"):
        for row in optimizer_step(name=name):
            print(row, flush=True)
    torch.set_num_threads(1)
    print(f"# MLP forward + backward, 1 thread, median of 20: {mlp_forward_backward()}")


if __name__ == "__main__":
    main()
