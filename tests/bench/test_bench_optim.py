"""The optimizer benchmark runs end to end (``--quick``) and prints a row per optimizer and set."""

from __future__ import annotations

from torchopt_lab.bench.optim import OPTIMIZERS, PARAM_SETS, QUICK_NOTE
from torchopt_lab.cli import main


def test_bench_optim_quick_prints_a_ratio_for_every_optimizer_and_set(capsys) -> None:
    assert main(["bench-optim", "--quick"]) == 0
    lines = capsys.readouterr().out.splitlines()
    # Single-step timings of tiny sets: said before the table and in the ratio columns' names.
    assert lines[1] == QUICK_NOTE and "timings are not measurements" in QUICK_NOTE
    assert lines[2].endswith(
        "| ours/foreach (not measured) | ours/fused (not measured) "
        "| ours fused=True/fused (not measured) |"
    )
    rows = [line for line in lines if line.startswith("| ")]
    body = [row.strip("| ").split(" | ") for row in rows[1:]]
    assert {(cells[0], cells[1]) for cells in body} == {
        (name, set_name) for name in OPTIMIZERS for set_name in PARAM_SETS
    }
    for cells in body:
        assert float(cells[8]) > 0  # ours/foreach is always measured
    fused = {cells[0] for cells in body if cells[6] != "n/a"}
    assert "RMSprop" not in fused  # torch.optim.RMSprop has no fused implementation
    # ours with fused=True runs wherever torch's fused kernel does
    assert (
        fused
        == {cells[0] for cells in body if cells[7] != "n/a"}
        == {
            "SGD",
            "Momentum",
            "Adagrad",
            "Adam",
            "AdamW",
        }
    )


def test_bench_optim_rejects_an_unknown_optimizer(capsys) -> None:
    assert main(["bench-optim", "--quick", "--optimizers", "Lion"]) == 2
    assert capsys.readouterr().err.startswith(
        "torchopt-lab bench-optim: error: unknown optimizer: Lion;"
    )


def test_a_full_bench_optim_run_does_not_say_quick(monkeypatch, capsys) -> None:
    import torchopt_lab.bench.optim as bench

    monkeypatch.setattr(
        bench,
        "measure",
        lambda *a, **k: {"ours": 1.0, "foreach": 2.0, "fused": None, "ours_fused": None},
    )
    assert main(["bench-optim", "--optimizers", "SGD", "--sets", "small-tensors"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert QUICK_NOTE not in lines and lines[-1].endswith("| 0.50 | n/a | n/a |")
    assert lines[1].endswith("| ours/foreach | ours/fused | ours fused=True/fused |")
