"""Argument checks shared by the ``torchopt-lab`` subcommands and the experiments' command lines.

Bad input ends a command with exit status 2 and a message naming the bad value, never a
traceback. argparse reports what it checks itself (an unknown option, a value that is no
number); the rest (ranges, ``--device cuda`` without a GPU, ``--lr`` for an optimizer not
selected) a subcommand raises as :class:`UsageError` after parsing, which
:func:`torchopt_lab.cli.main` prints as one line: ``torchopt-lab COMMAND: error: ...``.
"""

from __future__ import annotations

import torch

__all__ = ["UsageError", "check_device"]


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
