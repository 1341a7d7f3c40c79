"""The ``torchopt-lab`` command. Each subcommand lives in its own module, which provides
``add_arguments(parser)`` and ``run(args) -> int``; ``run`` raises
:class:`torchopt_lab._arguments.UsageError` for bad input found after parsing, which ends the
command with one line on stderr and exit status 2, as argparse's own errors do."""

from __future__ import annotations

import argparse
import importlib
import sys

from torchopt_lab import __version__
from torchopt_lab._arguments import UsageError

# name -> (module, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "compare": (
        "torchopt_lab.compare",
        "Train one network on the 8x8 digits with every optimizer and compare them.",
    ),
    "bench-optim": (
        "torchopt_lab.bench.optim",
        "time optimizer steps of ours against torch.optim foreach and fused",
    ),
    "bench-cpu-fused": (
        "torchopt_lab.bench.cpu_fused",
        "time fused=True on CPU (rules compiled by Inductor) against torch's fused CPU kernels",
    ),
    "bench-compiled": (
        "torchopt_lab.bench.compiled",
        "time compiled optimizer steps and layers against eager and torch's compiled ones",
    ),
    "bench-optim-host": (
        "torchopt_lab.bench.optim_host",
        "time the host work of a fused step over 4096 small tensors against torch.optim's",
    ),
    "bench-nn": (
        "torchopt_lab.bench.nn",
        "Time a training step of an MLP and a CNN from torchopt_lab.nn against torch.nn.",
    ),
    "bench-nn-kernels": (
        "torchopt_lab.bench.nn_kernels",
        "Time each layer Triton kernel (GB/s) and cross-entropy's memory against torch on a GPU.",
    ),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="torchopt-lab",
        description="torchopt-lab: optimizer experiments and benchmarks against PyTorch.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        module = importlib.import_module(module_name)
        sub = subparsers.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(sub)
        sub.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return int(args._run(args) or 0)
    except UsageError as error:
        print(f"torchopt-lab {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
