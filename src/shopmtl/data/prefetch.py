"""Batches made ahead in a background thread, so that parsing, encoding and copying the next
batches overlaps the training step that uses the current one.

A streamed source parses Parquet / CSV and encodes each chunk on the training thread: the
step waits for it (and a GPU idles meanwhile). pyarrow's readers and torch's tensor copies
release the GIL, so one producer thread runs beside the step even in one process.

The order of the batches is the wrapped iterator's, unchanged: a run with prefetch takes the
same batches in the same order as one without (resume's ``skip`` included), and nothing that
draws from torch's global generator may run in the producer (``TableSource`` draws its id
dropout after the batch comes out, on the training thread).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from typing import TypeVar

T = TypeVar("T")

_DONE = object()
_POLL = 0.1  # seconds between the producer's checks that the consumer is still there


class _Failed:
    """The producer's exception, handed to the consumer to raise there."""

    def __init__(self, error: BaseException) -> None:
        self.error = error


def prefetch(items: Iterator[T], depth: int, name: str = "prefetch") -> Iterator[T]:
    """``items``, produced up to ``depth`` ahead by a daemon thread (``depth`` 0: ``items``
    itself). An exception of the producer is raised by the consumer at the item where it
    happened; closing the returned generator early (or dropping it) stops the producer."""
    if depth <= 0:
        yield from items
        return
    q: queue.Queue[object] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(x: object) -> bool:
        while not stop.is_set():
            try:
                q.put(x, timeout=_POLL)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for x in items:
                if not put(x):
                    return
            put(_DONE)
        except BaseException as e:
            put(_Failed(e))
        finally:
            close = getattr(items, "close", None)
            if close is not None:
                close()

    worker = threading.Thread(target=produce, name=name, daemon=True)
    worker.start()
    try:
        while True:
            x = q.get()
            if x is _DONE:
                return
            if isinstance(x, _Failed):
                raise x.error
            yield x  # type: ignore[misc]
    finally:
        stop.set()
        worker.join(timeout=5 * _POLL + 1)


__all__ = ["prefetch"]
