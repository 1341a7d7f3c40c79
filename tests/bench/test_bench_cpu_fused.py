"""``bench-cpu-fused`` runs end to end (``--quick``) and prints a row per optimizer and set; the
rule-form updates it times for torch's fused optimizers compute what those optimizers compute."""

from __future__ import annotations

import pytest
import torch

import torchopt_lab
from torchopt_lab.bench import cpu_fused
from torchopt_lab.bench.optim import QUICK_NOTE
from torchopt_lab.cli import main
from torchopt_lab.optim import _cpu_fused


@pytest.fixture(autouse=True)
def _small_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_cpu_fused, "CHUNK", 2)  # fewer loops to compile


def test_bench_cpu_fused_quick_prints_a_ratio_and_compile_time_per_optimizer_and_set(
    capsys,
) -> None:
    assert main(["bench-cpu-fused", "--quick", "--optimizers", "Lion"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1] == QUICK_NOTE
    rows = [line.strip("| ").split(" | ") for line in lines if line.startswith("| ")][1:]
    # One optimizer, one compile (tests stay fast); the rows of torch's optimizers in rule form
    # run the same fused path, their math is held below.
    assert {(cells[0], cells[1]) for cells in rows} == {
        ("Lion", "transformer"),
        ("Lion", "small-tensors"),
    }
    assert {cells[5] for cells in rows} == {"ours reference"}
    for cells in rows:
        assert float(cells[7]) > 0 and float(cells[8]) > 0 and float(cells[9]) >= 0


def test_the_paired_ratio_is_the_median_of_each_turns_ratio() -> None:
    # Turns slowed alike on both sides (a slow stretch of the machine) keep their ratio.
    assert cpu_fused.paired_ratio([1.1, 2.2, 3.3], [1.0, 2.0, 3.0]) == pytest.approx(1.1)
    # One odd turn does not move the median.
    assert cpu_fused.paired_ratio([2.0, 1.0, 3.0, 2.0, 9.0], [1.0] * 5) == 2.0


@pytest.mark.parametrize("name", sorted(cpu_fused.TORCH_FUSED))
def test_rule_form_update_matches_torch_fused_optimizer(name: str) -> None:
    # Float64, so that the bound is the rounding of float64: 1e-12 relative after 3 steps.
    spec = cpu_fused.TORCH_FUSED[name]
    generator = torch.Generator().manual_seed(0)
    params = [
        torch.randn(shape, dtype=torch.float64, generator=generator) for shape in [(3, 4), (5,)]
    ]
    theirs = [p.clone().requires_grad_() for p in params]
    optimizer = spec.theirs(theirs, **spec.options, foreach=False)
    states = [[torch.zeros_like(p) for _ in range(spec.states)] for p in params]
    for step in range(1, 4):
        grads = [torch.randn(p.shape, dtype=p.dtype, generator=generator) for p in params]
        for p, g in zip(theirs, grads, strict=True):
            p.grad = g
        optimizer.step()
        for i, (p, g) in enumerate(zip(params, grads, strict=True)):
            params[i], *states[i] = spec.update(p, g, *states[i], **spec.scalars(step))
    for mine, reference in zip(params, theirs, strict=True):
        torch.testing.assert_close(mine, reference.detach(), rtol=1e-12, atol=1e-12)


def test_bench_cpu_fused_declared_rows_time_the_builtins_compiled_declaration(capsys) -> None:
    # "<name> declared": our built-in's whole step with its declaration's update compiled (the
    # switch back on afterwards), against torch's fused kernel on the same tensors.
    assert _cpu_fused.TORCH_KERNELS
    argv = ["bench-cpu-fused", "--quick", "--optimizers", "Adagrad declared", "--sets"]
    assert main([*argv, "small-tensors"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")][1:]
    cells = rows[0].strip("| ").split(" | ")
    assert (cells[0], cells[5]) == ("Adagrad declared", "torch fused")
    assert float(cells[4]) > 0 and float(cells[6]) > 0  # ours, torch's ms (--quick: 2 digits)
    assert _cpu_fused.TORCH_KERNELS
    decision = torchopt_lab.backend_info()["decisions"]["optim.Adagrad (fused)"]
    assert decision["backend"] == "inductor"


@pytest.mark.parametrize("quick", [False, True])
def test_a_first_compile_is_charged_to_no_row(monkeypatch, capsys, quick) -> None:
    # A process's first compile also builds what later ones reuse (about 11 s here): the first
    # row's compile column took it. Timed runs compile something first; --quick does not.
    calls = []
    monkeypatch.setattr(cpu_fused, "warm_compiler", lambda: calls.append("warm") or 11.0)

    def measure(name, shapes, repeats, steps):
        calls.append(name)
        return {"ours": 2.0, "baseline": 1.0, "paired": 2.0, "baseline_name": "x", "compile": 0.0}

    monkeypatch.setattr(cpu_fused, "measure", measure)
    quick_args = ["--quick"] if quick else ["--repeats", "1", "--steps", "1"]
    assert (
        main(["bench-cpu-fused", *quick_args, "--optimizers", "Lion", "--sets", "transformer"]) == 0
    )
    assert calls == (["Lion"] if quick else ["warm", "Lion"])
    out = capsys.readouterr().out
    assert ("# a first compile, charged to no row: 11.0 s" in out) != quick
