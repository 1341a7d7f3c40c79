"""Writing result files atomically: a killed run leaves the old file or the new one, never a
truncated one."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

__all__ = ["write_atomically", "write_text_atomically"]

# The permissions a plain open() would give a new file (mkstemp makes it private, 0o600).
_UMASK = os.umask(0)
os.umask(_UMASK)


def write_atomically(path: str | os.PathLike[str], write: Callable[[Path], object]) -> None:
    """Call ``write(temporary)`` to fill a new file in ``path``'s directory, then rename it over
    ``path`` (``os.replace``, atomic within one file system). On any error the temporary file is
    removed and ``path`` is left as it was."""
    target = Path(path)
    descriptor, name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(descriptor)
    temporary = Path(name)
    try:
        write(temporary)
        with open(temporary, "rb+") as handle:
            os.fsync(handle.fileno())
        os.chmod(temporary, 0o666 & ~_UMASK)
        os.replace(temporary, target)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def write_text_atomically(path: str | os.PathLike[str], text: str) -> None:
    """``Path(path).write_text(text)`` (UTF-8), atomically: see :func:`write_atomically`."""
    write_atomically(path, lambda temporary: temporary.write_text(text, encoding="utf-8"))
