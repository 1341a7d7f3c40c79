"""Result files are written atomically: a run killed while writing leaves the previous file (or
none), never a truncated one, and no temporary file behind."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from torchopt_lab._files import write_atomically, write_text_atomically


def test_a_write_that_fails_halfway_leaves_the_previous_file_and_no_temporary(tmp_path) -> None:
    target = tmp_path / "results.json"
    target.write_text("previous")

    def killed_halfway(temporary: Path) -> None:
        temporary.write_text('{"half": ')
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_atomically(target, killed_halfway)
    assert target.read_text() == "previous"
    assert [path.name for path in tmp_path.iterdir()] == ["results.json"]


def test_a_write_replaces_the_file_with_a_plain_files_permissions(tmp_path) -> None:
    target = tmp_path / "config.json"
    write_text_atomically(target, "new")
    assert target.read_text() == "new"
    plain = tmp_path / "plain"
    plain.write_text("")
    assert stat.S_IMODE(os.stat(target).st_mode) == stat.S_IMODE(os.stat(plain).st_mode)
    write_text_atomically(target, "newer")
    assert target.read_text() == "newer"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["config.json", "plain"]
