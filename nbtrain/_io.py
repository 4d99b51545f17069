"""Atomic file writes: a file is either its old self or completely new, never half written.

A crash, a full disk or Ctrl-C in the middle of an export must not destroy the previous
export (or checkpoint): the new content goes to a temporary file in the same directory (so
the final rename never crosses a filesystem), is flushed to disk, and only then replaces the
target with `os.replace`, which is atomic on POSIX and Windows.

Shared by every writer in nbtrain: `History.to_csv` today, checkpoints (issue 5) next.
"""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any


@contextlib.contextmanager
def atomic_write(
    path: str | os.PathLike[str], mode: str = "w", *, newline: str | None = None
) -> Iterator[IO[Any]]:
    """Open a temporary file beside `path`; on a clean exit it replaces `path` atomically.

    If the block raises (any exception, KeyboardInterrupt included), the temporary file is
    removed and `path` is left exactly as it was.

    >>> import os, tempfile
    >>> target = os.path.join(tempfile.mkdtemp(), "out.txt")
    >>> with atomic_write(target) as handle:
    ...     _ = handle.write("done")
    >>> open(target).read()
    'done'
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"mode must be 'w' or 'wb', got {mode!r}")
    target = Path(path)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        kwargs = {"newline": newline, "encoding": "utf-8"} if mode == "w" else {}
        with os.fdopen(fd, mode, **kwargs) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        # mkstemp creates the file 0600: keep the old file's mode, or the usual 0644.
        mode_bits = stat.S_IMODE(target.stat().st_mode) if target.exists() else 0o644
        os.chmod(tmp, mode_bits)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
