"""One model's scoring in the service: one call at a time, concurrent table rows combined.

Every endpoint scores through its model's ``Scorer``: ``locked(fn)`` runs ``fn`` alone (a joint
model's text bank is shared state, and scoring is CPU-bound: threads would gain nothing), and
``predict(rows, tasks)`` scores table rows (``/v1/score``, ``/v1/ads/ctr``, ``/v1/recommend``).

Why combine: a request of 100 candidates spends most of its scoring time in the fixed cost of
one ``Model.predict`` call (building a table, the reader, the encoders, one onnxruntime call),
not in its rows: on the quickstart int8 bundle 100 rows take 2.1 ms and 800 rows 3.6 ms
(``bench/serve_load.py`` measures what this buys end to end). So while one call runs, the rows
of the requests that arrive meanwhile wait in a queue, and the next call scores them all at
once: flat combining, as in Triton's dynamic batcher with no queue delay. The first waiting
request that gets the model's lock scores everything queued (up to ``max_rows`` rows a call,
at least one request), hands each request its own slice and lets them go; a request already
scored when it gets the lock just leaves. No request ever waits for a batch to fill: alone, a
request is scored at once, as without combining.

An error stays with its request: when a combined call fails (a bad row of one request), every
request of it is scored again alone, so each gets its own answer or its own error, with row
numbers counted in its own rows. Results equal a request scored alone up to float rounding:
a row's forward reads only that row, except under onnxruntime's dynamic int8 quantisation,
whose activation scale is taken over the whole call (so a row's int8 answer moves within the
quantisation error with the rows scored beside it: already true of a request's candidates).
A static int8 bundle (``shopmtl export --int8 --calibrate TRAIN``) fixes its scales at export,
so its answers do not depend on the rows beside them (tests/export/test_static_int8.py).
``max_rows`` = 0 turns combining off: each request is one call under the lock.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

T = TypeVar("T")
Rows = list[dict[str, Any]]
Predictions = dict[str, list[Any]]
MAX_ROWS = 4096  # rows of one combined call: about the candidates of 40 requests


def predict_tasks(model: Any, rows: Rows, tasks: Sequence[str]) -> Predictions:
    """task -> one prediction per row, from ``Model.predict``. A joint model answers one task
    at a time; any other kind answers all the tasks in one pass."""
    if model.kind == "joint":
        return {t: model.predict(rows, task=t).column(t).to_pylist() for t in tasks}
    table = model.predict(rows, task=list(tasks))
    return {t: table.column(t).to_pylist() for t in tasks}


@dataclass(eq=False)
class _Waiting:
    """One request's rows in the queue, and once scored its predictions or its error."""

    rows: Rows
    tasks: tuple[str, ...]
    done: bool = False
    result: Predictions = field(default_factory=dict)
    error: BaseException | None = None


class Scorer:
    """The scoring of one loaded ``model`` (the module docstring). ``on_call(requests, rows)``
    is told of every model call ``predict`` makes (the service's metrics)."""

    def __init__(self, model: Any, max_rows: int = MAX_ROWS,
                 on_call: Callable[[int, int], None] | None = None) -> None:
        if max_rows < 0:
            raise ValueError("max_rows must be >= 0 (0: no combining)")
        self.model, self.max_rows, self.on_call = model, max_rows, on_call
        self.lock = threading.Lock()  # the model: one call at a time
        self._queue: deque[_Waiting] = deque()
        self._queued = threading.Lock()  # the queue alone: held for an append or a pop

    def locked(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """``fn(*args, **kwargs)`` with the model to itself."""
        with self.lock:
            return fn(*args, **kwargs)

    def predict(self, rows: Rows, tasks: Sequence[str]) -> Predictions:
        """``predict_tasks(model, rows, tasks)``, combined with the rows of concurrent calls."""
        if self.max_rows == 0:
            with self.lock:
                self._told(1, len(rows))
                return predict_tasks(self.model, rows, tasks)
        me = _Waiting(rows, tuple(tasks))
        with self._queued:
            self._queue.append(me)
        while not me.done:
            with self.lock:
                if not me.done:  # else a call made while this one waited scored it
                    self._score(self._take())
        if me.error is not None:
            raise me.error
        return me.result

    def _take(self) -> list[_Waiting]:
        """The queue's head: up to ``max_rows`` rows, at least one request."""
        out: list[_Waiting] = []
        n = 0
        with self._queued:
            while self._queue and (not out or n + len(self._queue[0].rows) <= self.max_rows):
                out.append(self._queue.popleft())
                n += len(out[-1].rows)
        return out

    def _score(self, taken: list[_Waiting]) -> None:
        """Every request of ``taken`` done: one call per task list; alone after a failure."""
        try:
            groups: dict[tuple[str, ...], list[_Waiting]] = {}
            for w in taken:
                groups.setdefault(w.tasks, []).append(w)
            for tasks, group in groups.items():
                if len(group) == 1 or not self._together(group, tasks):
                    for w in group:
                        self._alone(w)
        finally:  # whatever happened, no request is left waiting for an answer
            for w in taken:
                if not w.done:
                    w.error = w.error or RuntimeError("the request was not scored")
                    w.done = True

    def _together(self, group: list[_Waiting], tasks: tuple[str, ...]) -> bool:
        """One call for the whole group, each request handed its slice; False if it failed."""
        rows = [r for w in group for r in w.rows]
        try:
            preds = predict_tasks(self.model, rows, tasks)
        except Exception:  # a bad row of one request: they are scored alone, to tell whose
            return False
        self._told(len(group), len(rows))
        start = 0
        for w in group:
            stop = start + len(w.rows)
            w.result = {t: v[start:stop] for t, v in preds.items()}
            w.done, start = True, stop
        return True

    def _alone(self, w: _Waiting) -> None:
        try:
            w.result = predict_tasks(self.model, w.rows, w.tasks)
            self._told(1, len(w.rows))
        except Exception as e:
            w.error = e
        w.done = True

    def _told(self, requests: int, rows: int) -> None:
        if self.on_call is not None:
            self.on_call(requests, rows)
