"""One run per output folder: ``shopmtl train`` holds an exclusive lock on ``OUT/.lock`` for
the whole run, so a second run into the same ``--out`` stops at once instead of overwriting
the first one's checkpoints and model directory.

The lock is ``fcntl.flock`` (non-blocking) on an open file: the kernel releases it when the
process ends, however it ends, so a killed run never leaves a stale lock. The file holds the
holder's pid, for the error message.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

LOCK = ".lock"


class OutputInUseError(OSError):
    """Another process holds the output folder's lock."""


@contextlib.contextmanager
def locked_output(out: Path) -> Iterator[Path]:
    """Hold ``out/.lock`` exclusively for the ``with`` block (``out`` is created if needed);
    raise ``OutputInUseError`` at once if another process holds it. A folder this call created
    and the run left empty (a config refused before anything was written) is removed again."""
    import fcntl

    out = Path(out)
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    path = out / LOCK
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
            raise OutputInUseError(
                f"{out} is in use by another shopmtl run (pid {holder})") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        try:
            yield path
        finally:
            os.ftruncate(fd, 0)
            if created and os.listdir(out) == [LOCK]:
                path.unlink()
                out.rmdir()
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
