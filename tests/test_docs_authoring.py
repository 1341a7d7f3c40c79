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
