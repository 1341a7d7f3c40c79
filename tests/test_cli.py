"""Every ``torchopt-lab`` subcommand: bad input ends in exit status 2 and an error naming the
value, never a traceback; ``--help`` shows each option's default once; ``--version``."""

from __future__ import annotations

import argparse
import re

import pytest
import torch

from torchopt_lab import cli


def subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = cli.build_parser()
    (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(action.choices)


def with_device() -> list[str]:
    return [
        name
        for name, parser in subcommands().items()
        if any("--device" in action.option_strings for action in parser._actions)
    ]


def exit_status(argv: list[str]) -> int:
    try:
        return cli.main(argv)
    except SystemExit as exit_info:  # argparse's own errors
        return exit_info.code


def test_every_subcommand_is_listed_and_the_device_taking_ones_are_known() -> None:
    assert set(subcommands()) == set(cli.SUBCOMMANDS)
    assert with_device() == ["compare", "bench-optim", "bench-nn-kernels"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal needs a machine without CUDA")
@pytest.mark.parametrize("name", with_device())
def test_device_cuda_without_cuda_is_one_line_and_exit_2(name, tmp_path, capsys) -> None:
    extra = ["--logdir", str(tmp_path)] if name == "compare" else []
    assert exit_status([name, "--device", "cuda", *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"torchopt-lab {name}: error: invalid --device 'cuda'"), err
    assert err.count("\n") == 1 and "Traceback" not in err


@pytest.mark.parametrize("name", with_device())
def test_a_device_that_does_not_exist_is_refused_naming_it(name, tmp_path, capsys) -> None:
    extra = ["--logdir", str(tmp_path)] if name == "compare" else []
    assert exit_status([name, "--device", "gpu7", *extra]) == 2
    last = capsys.readouterr().err.splitlines()[-1]
    assert last.startswith(f"torchopt-lab {name}: error:") and "gpu7" in last, last


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["bench-optim", "--steps", "0"], "--repeats and --steps must be >= 1, got 7 and 0"),
        (["bench-optim", "--quick", "--repeats", "-1"], "got -1 and 3"),
        (["bench-optim", "--sets", "huge"], "unknown parameter set: huge"),
        (["bench-optim-host", "--repeats", "0"], "got 4096 and 0"),
        (["bench-cpu-fused", "--steps", "0"], "--repeats and --steps must be >= 1, got 7 and 0"),
        (["bench-cpu-fused", "--optimizers", "Muon"], "unknown optimizer: Muon"),
        (["bench-compiled", "--repeats", "0"], "--repeats and --steps must be >= 1, got 0 and 3"),
        (["bench-compiled", "--optimizers", "Muon"], "unknown optimizer: Muon"),
        (["bench-nn", "--warmup", "-1"], "--warmup >= 0, got 50 and -1"),
        (["bench-nn", "--quick", "--steps", "0"], "--steps must be >= 1"),
        (["bench-nn-kernels", "--device", "cpu", "--quick", "--repeats", "0"], "got 8192, 4096, 0"),
    ],
)
def test_out_of_range_numbers_are_refused_naming_the_value(argv, message, capsys) -> None:
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"torchopt-lab {argv[0]}: error: ") and message in err, err
    assert err.count("\n") == 1


@pytest.mark.parametrize("name", list(cli.SUBCOMMANDS))
def test_help_shows_each_options_default_exactly_once(name) -> None:
    for action in subcommands()[name]._actions:
        if action.nargs == 0:  # --help and flags: no value, no default to show
            continue
        shown = re.findall(r"\(defaults?: ", action.help or "")
        assert len(shown) == 1, (name, action.dest, action.help)


def test_version(capsys) -> None:
    import torchopt_lab

    assert exit_status(["--version"]) == 0
    assert capsys.readouterr().out == f"torchopt-lab {torchopt_lab.__version__}\n"


@pytest.mark.parametrize(
    ("argv", "ignored"),
    [
        (["bench-optim", "--quick", "--repeats", "5"], "--repeats 5"),
        (["bench-cpu-fused", "--quick", "--steps", "2"], "--steps 2"),
        (["bench-compiled", "--quick", "--repeats", "3"], "--repeats 3"),
        (["bench-nn", "--quick", "--steps", "10"], "--steps 10"),
        (["bench-nn-kernels", "--device", "cpu", "--quick", "--rows", "64"], "--rows 64"),
    ],
)
def test_quick_refuses_sizes_it_would_ignore_naming_them(argv, ignored, capsys) -> None:
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err == (
        f"torchopt-lab {argv[0]}: error: --quick sets its own sizes; {ignored} would be ignored: "
        "drop one\n"
    )
