"""The host-overhead benchmark runs end to end on a CPU and prints a row per optimizer."""

from __future__ import annotations

import os

from torchopt_lab.bench.optim_host import OPTIMIZERS
from torchopt_lab.cli import main


def test_bench_optim_host_prints_positive_times_for_every_optimizer(capsys) -> None:
    interpret = os.environ.get("TRITON_INTERPRET")
    assert main(["bench-optim-host", "--tensors", "64", "--repeats", "2"]) == 0
    assert os.environ.get("TRITON_INTERPRET") == interpret  # restored for the other tests
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    body = [row.strip("| ").split(" | ") for row in rows[1:]]
    assert [cells[0] for cells in body] == list(OPTIMIZERS)
    for cells in body:
        assert all(float(value) > 0 for value in cells[1:])


def test_bench_optim_host_launches_no_kernel(monkeypatch) -> None:
    from triton_kernels.optim import launchers

    launched = []
    monkeypatch.setattr(launchers, "_launch", lambda *args, **kwargs: launched.append(args))
    from torchopt_lab.bench.optim_host import measure

    measure("Adam", tensors=8, repeats=1)
    assert launched == []


def test_bench_optim_host_rejects_more_tensors_than_the_set_has(capsys) -> None:
    assert main(["bench-optim-host", "--tensors", "5000"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("torchopt-lab bench-optim-host: error: --tensors must be in")
    assert "got 5000" in err
