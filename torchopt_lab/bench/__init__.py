"""Benchmarks that print ratios against PyTorch measured in the same run."""

from __future__ import annotations

import argparse
from collections.abc import Iterable

from torchopt_lab._arguments import UsageError


def warm_compiler() -> float:
    """Compile and run a one-line function with Inductor's caches off; return the seconds it took.

    A process's first compile also does what every later one reuses (Inductor's imports, its C++
    prelude): about 11 s here, which a compile-time column would otherwise charge to whichever
    row compiles first (plain SGD's cold compile read 15.7 s first in the run, 6.3 s after this,
    torch's 6.1 s)."""
    import time

    import torch

    start = time.perf_counter()
    with torch._inductor.config.patch(force_disable_caches=True):
        torch.compile(lambda x: x * 2 + 1)(torch.ones(3))
    return time.perf_counter() - start


def table_header(columns: list[str]) -> str:
    """The first two lines of a markdown table with these column names."""
    return "| " + " | ".join(columns) + " |\n" + "|---" * len(columns) + "|"


def add_set_arguments(
    parser: argparse.ArgumentParser,
    optimizers: Iterable[str],
    sets: Iterable[str],
    *,
    repeats: int = 7,
    steps: int = 3,
) -> None:
    """The options of an optimizer-step benchmark: ``--optimizers`` and ``--sets`` (comma-separated
    names, all by default; read with :func:`choices`), ``--repeats`` timed turns per variant of
    ``--steps`` steps each."""
    optimizers, sets = list(optimizers), list(sets)
    parser.add_argument(
        "--optimizers",
        default=",".join(optimizers),
        help=f"comma-separated, from {', '.join(optimizers)} (default: all)",
    )
    parser.add_argument(
        "--sets",
        default=",".join(sets),
        help=f"comma-separated parameter sets, from {', '.join(sets)} (default: all)",
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=repeats,
        help="timed turns per variant (default: %(default)s)",
    )
    parser.add_argument(
        "--steps",
        type=int,
        default=steps,
        help="optimizer steps per timed turn (default: %(default)s)",
    )


def choices(text: str, names: Iterable[str], what: str) -> list[str]:
    """The comma-separated names of ``text``, each one of ``names``; else :class:`UsageError`
    naming the unknown ones."""
    names = list(names)
    chosen = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in chosen if name not in names]
    if unknown or not chosen:
        raise UsageError(
            f"unknown {what}: {', '.join(unknown) or repr(text)}; choose from {', '.join(names)}"
        )
    return chosen
