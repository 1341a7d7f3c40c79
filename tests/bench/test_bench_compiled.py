"""The torch.compile benchmark runs end to end on a tiny set and prints its four variants."""

from __future__ import annotations

import re

import torchopt_lab.bench.compiled as compiled


def test_compiled_step_benchmark_times_ours_and_torch_eager_and_compiled(monkeypatch) -> None:
    monkeypatch.setitem(compiled.PARAM_SETS, "tiny", (lambda: [(4, 3), (5,)], lambda: [(2,)]))
    rows = compiled.optimizer_step("tiny")
    assert [row.split(" | ")[:2] for row in rows] == [
        ["| Adam", "ours eager"],
        ["| Adam", "ours compiled"],
        ["| Adam", "torch foreach eager"],
        ["| Adam", "torch compiled"],
    ]
    for row in rows:
        assert re.fullmatch(r"\| Adam \| [a-z ]+ \| \d+\.\d ms \| first call \d+\.\d s \|", row), (
            row
        )
