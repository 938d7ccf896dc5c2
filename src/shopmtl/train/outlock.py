"""One run per output folder: ``shopmtl train`` holds an exclusive lock on ``OUT/.lock`` for
the whole run, so a second run into the same ``--out`` stops at once instead of overwriting
the first one's checkpoints and model directory.

The lock is ``fcntl.flock`` (non-blocking) on an open file: the kernel releases it when the
process ends, however it ends, so a killed run never leaves a stale lock (only, at worst, the
file, which is no lock). The file holds the holder's pid, for the error message; the run that
created it removes it when it ends.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

LOCK = ".lock"


class OutputInUseError(OSError):
    """Another process holds the output folder's lock."""


def _open_lock(path: Path) -> tuple[int, bool]:
    """The lock file's descriptor and whether this call created the file."""
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644), True
    except FileExistsError:
        return os.open(path, os.O_RDWR | os.O_CREAT, 0o644), False


def _still_there(fd: int, path: Path) -> bool:
    """Whether ``path`` is still the file ``fd`` has open: a holder that is done removes the
    lock file it created, so a process that opened the file just before and got the lock just
    after holds a lock on a removed file, and must open the path again."""
    try:
        st, now = os.fstat(fd), os.stat(path)
    except FileNotFoundError:
        return False
    return (st.st_dev, st.st_ino) == (now.st_dev, now.st_ino)


@contextlib.contextmanager
def locked_output(out: Path) -> Iterator[Path]:
    """Hold ``out/.lock`` exclusively for the ``with`` block (``out`` is created if needed);
    raise ``OutputInUseError`` at once if another process holds it. What this call created
    goes again at the end: the lock file (a refused run leaves a folder as it found it), and
    the folder itself when the run left it empty (a config refused before anything was
    written)."""
    import fcntl

    out = Path(out)
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    path = out / LOCK
    while True:
        fd, own_file = _open_lock(path)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            raise OutputInUseError(
                f"{out} is in use by another shopmtl run (pid {holder})") from None
        if _still_there(fd, path):
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        try:
            yield path
        finally:
            os.ftruncate(fd, 0)
            if own_file:  # removed while held: see _still_there
                path.unlink(missing_ok=True)
            if created and not os.listdir(out):
                out.rmdir()
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
