"""Plumbing shared by the experiments: configuration from a dataclass, seeding, the output
directory, figures and the verdict. Experiments import this module as a sibling (``import
common``); the ``torchopt_lab`` package never imports anything from ``experiments/``.

Each experiment defines its configuration as one dataclass, every knob on its own line with a
comment (one of them ``out``, the output directory); :func:`parse_config` turns it into a
command line whose ``--help`` shows those comments, plus ``--smoke`` (the experiment's small
budget, for tests: a smoke run prints no verdict, since its budget can neither support nor refute
the claim).

Bad values end the command with exit status 2 and one line naming the value, never a traceback:
numbers must be finite and within their knob's bounds (by default > 0 when the default is > 0,
else >= 0; see :func:`parse_config`), a ``device`` knob must name a device this machine has, and
``out`` must be (or be creatable as) a directory.
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

from torchopt_lab._arguments import UsageError, check_device
from torchopt_lab._files import write_atomically, write_text_atomically

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


# The bounds a numeric knob can have: name -> (test, what the message says it must be).
BOUNDS: dict[str, tuple[Any, str]] = {
    "any": (lambda value: True, "a finite number"),
    ">0": (lambda value: value > 0, "> 0"),
    ">=0": (lambda value: value >= 0, ">= 0"),
    ">=2": (lambda value: value >= 2, ">= 2"),
    "(0,1]": (lambda value: 0 < value <= 1, "in (0, 1]"),
}


def _check_bounds(config: Any, defaults: Any, bounds: Mapping[str, str]) -> None:
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if isinstance(value, bool) or not isinstance(value, int | float):
            continue
        default = getattr(defaults, field.name)
        test, expected = BOUNDS[bounds.get(field.name, ">0" if default > 0 else ">=0")]
        if not (np.isfinite(value) and test(value)):
            option = "--" + field.name.replace("_", "-")
            raise UsageError(f"invalid {option} {value!r}: must be {expected}")
    if hasattr(config, "device"):
        check_device(config.device)
    if getattr(config, "out", ""):
        # The nearest existing path must be a directory, or start() could not create out.
        existing = next(
            path for path in (Path(config.out), *Path(config.out).parents) if path.exists()
        )
        if not existing.is_dir():
            raise UsageError(f"invalid --out {config.out!r}: {str(existing)!r} is not a directory")


#: The values a ``dtype`` knob takes: torch's floating dtypes by name.
FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")


def parse_config(
    config_class: type[Config],
    argv: Sequence[str] | None,
    smoke: Mapping[str, Any],
    description: str,
    bounds: Mapping[str, str] | None = None,
) -> tuple[Config, bool]:
    """Build ``config_class`` from the command line: defaults, then ``smoke`` if ``--smoke``,
    then every option given explicitly (``--field-name value``). Returns the configuration and
    whether this is a smoke run (pass it to :func:`verdict`).

    ``bounds`` names, per numeric knob, a key of :data:`BOUNDS`; a knob not named must be > 0
    when its default is, else >= 0. Values out of bounds, and a ``device`` this machine lacks,
    exit with status 2 and one line naming the value."""
    script = getattr(sys.modules.get(config_class.__module__), "__file__", None)
    parser = argparse.ArgumentParser(
        prog=Path(script).name if script else None,  # the experiment's file, also under pytest
        description=description,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--smoke", action="store_true", help=f"small budget for tests: {dict(smoke)}"
    )
    comments = _comments(config_class)
    defaults = config_class()
    for field in dataclasses.fields(config_class):
        default = getattr(defaults, field.name)
        option = "--" + field.name.replace("_", "-")
        comment = comments.get(field.name, "")
        # A comment that states the default itself (out: "" means runs/experiments/<name>)
        # is not given a second one.
        help_text = comment if "(default:" in comment else f"{comment} (default: {default!r})"
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
    smoke_run = arguments.pop("smoke")
    values = dict(smoke) if smoke_run else {}
    values.update(
        {
            name: tuple(value) if isinstance(value, list) else value
            for name, value in arguments.items()
        }
    )
    config = dataclasses.replace(defaults, **values)
    try:
        _check_bounds(config, defaults, bounds or {})
        dtype = getattr(config, "dtype", FLOAT_DTYPES[0])
        if dtype not in FLOAT_DTYPES:  # anything else would fail deep in torch
            raise UsageError(f"invalid --dtype {dtype!r}: choose from {', '.join(FLOAT_DTYPES)}")
    except UsageError as error:
        parser.exit(2, f"{parser.prog}: error: {error}\n")
    return config, smoke_run


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and every CUDA device)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def save_figure(figure: Any, path: Path) -> None:
    """Write ``figure`` to ``path`` atomically (a temporary file, then a rename), then close it."""
    from matplotlib import pyplot

    figure.tight_layout()
    file_format = path.suffix.lstrip(".") or "png"
    try:
        write_atomically(
            path, lambda temporary: figure.savefig(temporary, dpi=90, format=file_format)
        )
    finally:
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
    write_text_atomically(out / "config.json", json.dumps(settings, indent=2))
    print(f"== {name}")
    print(f"CLAIM: {claim}")
    print("config: " + ", ".join(f"{key}={value}" for key, value in settings.items()))
    return out


SMOKE_VERDICT = (
    "smoke run: no verdict (a smoke budget is too small to support or refute the claim; run "
    "without --smoke for one)"
)


def verdict(
    supported: bool, evidence: Sequence[str], out: Path, figure: Path, *, smoke: bool
) -> int:
    """Print the verdict with its numbers (a smoke run: the numbers and no verdict); return the
    exit code (0 whatever the verdict)."""
    for line in evidence:
        print(f"  {line}")
    if smoke:
        print(SMOKE_VERDICT)
    else:
        print(f"VERDICT: {'SUPPORTED' if supported else 'NOT SUPPORTED'}")
    print(f"outputs: {out} (tensorboard --logdir {out}); figure: {figure}")
    sys.stdout.flush()
    return 0
