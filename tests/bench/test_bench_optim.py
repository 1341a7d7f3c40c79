"""The optimizer benchmark runs end to end (``--quick``) and prints a row per optimizer and set."""

from __future__ import annotations

import pytest

from torchopt_lab.bench.optim import OPTIMIZERS, PARAM_SETS
from torchopt_lab.cli import main


def test_bench_optim_quick_prints_a_ratio_for_every_optimizer_and_set(capsys) -> None:
    assert main(["bench-optim", "--quick"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    body = [row.strip("| ").split(" | ") for row in rows[1:]]
    assert {(cells[0], cells[1]) for cells in body} == {
        (name, set_name) for name in OPTIMIZERS for set_name in PARAM_SETS
    }
    for cells in body:
        assert float(cells[7]) > 0  # ours/foreach is always measured
    fused = {cells[0] for cells in body if cells[6] != "n/a"}
    assert "RMSprop" not in fused  # torch.optim.RMSprop has no fused implementation


def test_bench_optim_rejects_an_unknown_optimizer() -> None:
    with pytest.raises(SystemExit, match="unknown optimizer: Lion"):
        main(["bench-optim", "--quick", "--optimizers", "Lion"])
