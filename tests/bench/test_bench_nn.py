"""``torchopt-lab bench-nn --quick`` runs every model end to end and prints a ratio for each."""

from __future__ import annotations

import pytest

from torchopt_lab import cli
from torchopt_lab.bench.nn import QUICK_NOTE


def test_bench_nn_quick_prints_a_ratio_per_model(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["bench-nn", "--quick"]) == 0
    lines = capsys.readouterr().out.splitlines()
    # Three steps of tiny batches: said before the table and in the ratio column's name.
    assert lines[1] == QUICK_NOTE and "timings are not measurements" in QUICK_NOTE
    assert lines[2].endswith("ratio (not measured)")
    rows = [line.split() for line in lines[3:]]
    assert [row[0] for row in rows] == ["mlp", "cnn", "block"]
    for row in rows:
        ours, theirs, ratio = map(float, row[2:5])
        assert ours > 0 and theirs > 0
        assert ratio == pytest.approx(ours / theirs, rel=0.01, abs=0.01)


def test_bench_nn_rejects_zero_threads(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["bench-nn", "--quick", "--threads", "0"]) == 2
    err = capsys.readouterr().err
    assert err == "torchopt-lab bench-nn: error: --threads must be >= 1, got 0\n"
