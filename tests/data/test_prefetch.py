"""data.prefetch: the same items in the same order, the producer's error raised at its item,
and a consumer that stops early stops the producer thread."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest

from shopmtl.data.prefetch import prefetch


def _count(n: int, seen: list[int] | None = None) -> Iterator[int]:
    for i in range(n):
        if seen is not None:
            seen.append(i)
        yield i


def _workers() -> int:
    return sum(t.name == "prefetch-test" for t in threading.enumerate())


@pytest.mark.parametrize("depth", [0, 1, 3, 100])
def test_same_items_same_order(depth: int) -> None:
    assert list(prefetch(_count(50), depth, "prefetch-test")) == list(range(50))


def test_it_reads_ahead_but_at_most_depth() -> None:
    seen: list[int] = []
    it = prefetch(_count(100, seen), 4, "prefetch-test")
    assert next(it) == 0
    deadline = time.monotonic() + 5
    while len(seen) < 6 and time.monotonic() < deadline:
        time.sleep(0.01)
    # one taken, 4 queued, one more made and waiting to be queued: never the whole stream
    assert len(seen) == 6
    it.close()


def test_the_producers_error_is_raised_at_its_item() -> None:
    def broken() -> Iterator[int]:
        yield 1
        yield 2
        raise ValueError("chunk 3: bad bytes")

    got = []
    with pytest.raises(ValueError, match="chunk 3: bad bytes"):
        for x in prefetch(broken(), 2, "prefetch-test"):
            got.append(x)
    assert got == [1, 2]


def test_stopping_early_stops_the_producer_and_closes_the_source() -> None:
    closed = threading.Event()

    def endless() -> Iterator[int]:
        try:
            i = 0
            while True:
                yield i
                i += 1
        finally:
            closed.set()

    it = prefetch(endless(), 2, "prefetch-test")
    assert [next(it) for _ in range(5)] == [0, 1, 2, 3, 4]
    it.close()
    assert closed.wait(5)
    deadline = time.monotonic() + 5
    while _workers() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert _workers() == 0
