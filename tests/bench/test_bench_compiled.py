"""The torch.compile benchmark runs end to end on a tiny set and prints its four variants."""

from __future__ import annotations

import re

import pytest
import torch

import torchopt_lab.bench.compiled as compiled


def test_compiled_step_benchmark_times_ours_and_torch_eager_and_compiled(monkeypatch) -> None:
    monkeypatch.setitem(compiled.PARAM_SETS, "tiny", (lambda: [(4, 3), (5,)], lambda: [(2,)]))
    rows = compiled.optimizer_step("tiny", turns=1, steps=1)
    assert [row.split(" | ")[:4] for row in rows] == [
        ["| Adam", "tiny", "2", "ours eager"],
        ["| Adam", "tiny", "2", "ours compiled"],
        ["| Adam", "tiny", "2", "torch foreach eager"],
        ["| Adam", "tiny", "2", "torch compiled"],
    ]
    for row in rows:
        pattern = r"\| Adam \| tiny \| 2 \| [a-z ]+ \| \d+\.\d ms \| first two calls \d+\.\d s \|"
        assert re.fullmatch(pattern, row), row


@pytest.mark.parametrize("quick", [False, True])
def test_compiled_step_benchmark_compiles_cold_unless_quick(monkeypatch, quick) -> None:
    # Inductor's caches would let a variant reuse a graph an earlier one compiled (torch's plain
    # SGD is the same foreach add as ours): the compile column would time a cache hit.
    monkeypatch.setitem(compiled.PARAM_SETS, "tiny", (lambda: [(3,)], lambda: [(2,)]))
    caches_off = []
    compile_ = compiled.torch.compile

    def recording_compile(function, **options):
        run = compile_(function, backend="eager", **options)

        def call():
            caches_off.append(compiled.torch._inductor.config.force_disable_caches)
            run()

        return call

    cleared = []
    clear = compiled.torch._inductor.utils.clear_inductor_caches
    monkeypatch.setattr(
        compiled.torch._inductor.utils,
        "clear_inductor_caches",
        lambda: cleared.append(len(caches_off)) or clear(),
    )
    monkeypatch.setattr(compiled.torch, "compile", recording_compile)
    compiled.optimizer_step("tiny", "Lion", quick=quick, turns=1, steps=1)
    assert caches_off[:2] == [not quick, not quick]
    # The kernels built in memory by an earlier compile are dropped before the compiled one's.
    assert cleared == ([] if quick else [0])


def test_compiled_step_benchmark_times_lion_without_a_torch_counterpart(monkeypatch) -> None:
    monkeypatch.setitem(compiled.PARAM_SETS, "tiny", (lambda: [(3,)], lambda: [(2,)]))
    rows = compiled.optimizer_step("tiny", "Lion", turns=1, steps=1)
    assert [row.split(" | ")[3] for row in rows] == ["ours eager", "ours compiled"]


def test_compiled_benchmark_cli_refuses_unknown_optimizers(capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        compiled.main(["--optimizers", "Adam,Adamm", "--no-mlp"])
    assert exit_info.value.code == 2
    assert "unknown optimizer: Adamm" in capsys.readouterr().err


def test_compiled_benchmark_cli_offers_all_registered_optimizers() -> None:
    assert set(compiled.STEPPED) == set(compiled.OPTIMIZERS) | set(compiled.ours_optim.REGISTRY)


def test_a_first_compile_is_charged_to_no_row(monkeypatch, capsys) -> None:
    # A process's first compile also builds what later ones reuse (about 11 s here): ours,
    # compiled first, took it (plain SGD 15.7 s against torch's 6.6 s; 6.3 against 6.1 after).
    calls = []
    monkeypatch.setattr(compiled, "warm_compiler", lambda: calls.append("warm") or 11.0)
    monkeypatch.setattr(
        compiled, "optimizer_step", lambda set_name, name, **options: calls.append(name) or []
    )
    assert compiled.main(["--optimizers", "Adam", "--sets", "transformer", "--no-mlp"]) == 0
    assert calls == ["warm", "Adam"]
    assert "# a first compile, charged to no row: 11.0 s" in capsys.readouterr().out


def test_warm_compiler_compiles_with_the_caches_off() -> None:
    from torchopt_lab.bench import warm_compiler

    graphs = torch._dynamo.utils.counters["stats"]
    before = graphs["unique_graphs"]
    assert warm_compiler() > 0
    assert graphs["unique_graphs"] == before + 1
