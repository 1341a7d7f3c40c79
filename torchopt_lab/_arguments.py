"""Argument checks shared by the ``torchopt-lab`` subcommands and the experiments' command lines.

Bad input ends a command with exit status 2 and a message naming the bad value, never a
traceback. argparse reports what it checks itself (an unknown option, a value that is no
number); the rest (ranges, ``--device cuda`` without a GPU, ``--lr`` for an optimizer not
selected) a subcommand raises as :class:`UsageError` after parsing, which
:func:`torchopt_lab.cli.main` prints as one line: ``torchopt-lab COMMAND: error: ...``.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["UsageError", "check_device", "refuse_overridden_by_quick"]


class UsageError(ValueError):
    """Bad command-line input found after parsing; the command exits 2 with this message."""


def check_device(text: str) -> torch.device:
    """The device ``text`` names, if this machine has it; else :class:`UsageError` naming it
    (``cuda`` on a machine without CUDA, ``cuda:3`` with two GPUs, a misspelt name)."""
    try:
        device = torch.device(text)
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as error:  # torch's errors for bad or absent devices
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UsageError(f"invalid --device {text!r}: {reason}") from None
    return device


def refuse_overridden_by_quick(args: Any, defaults: dict[str, Any]) -> None:
    """Under ``--quick``, which sets its own sizes, refuse the sizing options given with a value
    other than their default (``defaults``: option name -> default) instead of ignoring them."""
    if not getattr(args, "quick", False):
        return
    given = [name for name, default in defaults.items() if getattr(args, name) != default]
    if given:
        shown = ", ".join(f"--{name.replace('_', '-')} {getattr(args, name)}" for name in given)
        raise UsageError(f"--quick sets its own sizes; {shown} would be ignored: drop one")
