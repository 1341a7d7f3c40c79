"""Plumbing shared by the experiments: configuration from a dataclass, seeding, the output
directory, figures and the verdict. Experiments import this module as a sibling (``import
common``); the ``torchopt_lab`` package never imports anything from ``experiments/``.

Each experiment defines its configuration as one dataclass, every knob on its own line with a
comment (one of them ``out``, the output directory); :func:`parse_config` turns it into a
command line whose ``--help`` shows those comments, plus ``--smoke`` (the experiment's small
budget, for tests).
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import random
import re
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch

Config = TypeVar("Config")

_KNOB = re.compile(r"^\s+(\w+)\s*:[^#]*#\s*(.+)$")


def _comments(config_class: type) -> dict[str, str]:
    """The trailing comment of each field line in the dataclass's source."""
    comments = {}
    for line in inspect.getsource(config_class).splitlines():
        match = _KNOB.match(line)
        if match:
            comments[match.group(1)] = match.group(2).strip()
    return comments


def parse_config(
    config_class: type[Config],
    argv: Sequence[str] | None,
    smoke: Mapping[str, Any],
    description: str,
) -> Config:
    """Build ``config_class`` from the command line: defaults, then ``smoke`` if ``--smoke``,
    then every option given explicitly (``--field-name value``)."""
    parser = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--smoke", action="store_true", help=f"small budget for tests: {dict(smoke)}"
    )
    comments = _comments(config_class)
    defaults = config_class()
    for field in dataclasses.fields(config_class):
        default = getattr(defaults, field.name)
        option = "--" + field.name.replace("_", "-")
        help_text = f"{comments.get(field.name, '')} (default: {default!r})"
        if isinstance(default, bool):
            kind: dict[str, Any] = {"action": argparse.BooleanOptionalAction}
        elif isinstance(default, tuple):
            element = type(default[0]) if default else str
            kind = {"nargs": "+", "type": element}
        else:
            kind = {"type": type(default)}
        parser.add_argument(
            option, dest=field.name, default=argparse.SUPPRESS, help=help_text, **kind
        )
    arguments = vars(parser.parse_args(argv))
    values = dict(smoke) if arguments.pop("smoke") else {}
    values.update(
        {
            name: tuple(value) if isinstance(value, list) else value
            for name, value in arguments.items()
        }
    )
    return dataclasses.replace(defaults, **values)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and every CUDA device)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def save_figure(figure: Any, path: Path) -> None:
    from matplotlib import pyplot

    figure.tight_layout()
    figure.savefig(path, dpi=90)
    pyplot.close(figure)


def pyplot() -> Any:
    """matplotlib's pyplot on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as module

    return module


def start(name: str, claim: str, config: Any) -> Path:
    """Create the output directory (``config.out``, else ``runs/experiments/<name>``), keep the
    configuration there, print what is tested; return the directory.

    Runs torch on one thread: these models are far too small to gain from intra-op threads,
    and on a busy machine extra threads spin and make a run up to ten times slower.
    """
    torch.set_num_threads(1)
    out = Path(config.out) if config.out else Path("runs") / "experiments" / name
    out.mkdir(parents=True, exist_ok=True)
    settings = dataclasses.asdict(config)
    (out / "config.json").write_text(json.dumps(settings, indent=2))
    print(f"== {name}")
    print(f"CLAIM: {claim}")
    print("config: " + ", ".join(f"{key}={value}" for key, value in settings.items()))
    return out


def verdict(supported: bool, evidence: Sequence[str], out: Path, figure: Path) -> int:
    """Print the verdict with its numbers; return the exit code (0 whatever the verdict)."""
    for line in evidence:
        print(f"  {line}")
    print(f"VERDICT: {'SUPPORTED' if supported else 'NOT SUPPORTED'}")
    print(f"outputs: {out} (tensorboard --logdir {out}); figure: {figure}")
    sys.stdout.flush()
    return 0
