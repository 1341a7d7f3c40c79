"""The tutorial in docs/authoring.md runs as written: its first code block is saved as the
user's own file (its first line names it), the others run in order against it (the fused path
under the Triton interpreter, as every kernel test here)."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

from torchopt_lab import backend

TUTORIAL = Path(__file__).resolve().parents[1] / "docs" / "authoring.md"


def _code_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", TUTORIAL.read_text(), flags=re.DOTALL)


def test_authoring_tutorial_runs_as_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    module, *scripts = _code_blocks()
    name = re.match(r"# (\w+)\.py\n", module)
    assert name, "the tutorial's first code block must start with '# <file>.py'"
    (tmp_path / f"{name[1]}.py").write_text(module)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, name[1], raising=False)
    namespace: dict[str, object] = {"__name__": "tutorial"}
    try:
        for script in scripts:
            exec(compile(script, str(TUTORIAL), "exec"), namespace)
    finally:
        sys.modules.pop(name[1], None)
    assert "check_optimizer(Signum): passed" in capsys.readouterr().out
    # The last block held the fused path to the reference: the rule kernel ran.
    assert backend.backend_info()["decisions"]["optim.Signum"]["backend"] == "triton"


def test_authoring_tutorial_rule_compiles_to_one_graph(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The tutorial's Signum, as a user would compile its step: one graph, no break (its scalars
    # are written with operations valid on numbers and 0-dim tensors), equal to the eager step.
    import torch

    module = _code_blocks()[0]
    name = re.match(r"# (\w+)\.py\n", module)
    assert name
    (tmp_path / f"{name[1]}.py").write_text(module)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, name[1], raising=False)
    try:
        signum = __import__(name[1]).Signum
        torch._dynamo.reset()
        results = []
        for compiled in (False, True):
            torch.manual_seed(0)
            params = [torch.randn(3, 4, requires_grad=True), torch.randn(5, requires_grad=True)]
            optimizer = signum(params, lr=torch.tensor(0.01), weight_decay=0.1, backend="torch")

            def step(optimizer: torch.optim.Optimizer = optimizer) -> None:
                optimizer.step()

            run = torch.compile(step, backend="eager", fullgraph=True) if compiled else step
            for index in range(3):
                torch.manual_seed(index)
                for p in params:
                    p.grad = torch.randn_like(p)
                run()
            results.append(params)
        for a, b in zip(*results, strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    finally:
        sys.modules.pop(name[1], None)
        torch._dynamo.reset()
