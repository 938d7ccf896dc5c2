"""Experiments in the service (``shopmtl serve [MODEL] --experiment CONFIG``, docs/ABTEST.md):
traffic split between arms, exposure and feedback logging that never blocks a request.

- ``POST /v1/experiments/{name}/rank`` ``{user_id, scenario, candidates, k?}``: the user's arm
  (``abtest.assign.assign(user_id, salt, arms)``: a salted hash, stable across requests and
  restarts, independent across experiments), its policy's scores of the candidates, the ``k``
  best -> ``{request_id, arm, shown: [item ids, best first], shown_index: [candidate
  indices]}``. One exposure per request goes to the event queue: the unit
  (``unit_of(user_id, salt)``: the raw id is never stored or logged), the arm, the scenario,
  the item ids shown, the service time and the HTTP status. A refused request whose user id
  could be read (a 422: bad candidates, an unknown scenario's k; a 500) is logged too, with
  its status and nothing shown, so the error-rate guardrail sees it per arm.
- ``POST /v1/feedback`` ``{request_id, kind: click|conversion, item, position, value}`` -> 202:
  a click or a conversion of a request answered before, to the same queue.

The queue (``EventQueue``) is bounded: a request puts its event without waiting; when the
queue is full the event is dropped and counted (metrics and the store's meta), never queued
without bound and never waited for. One writer thread drains it into the event store
(``abtest.events.EventStore``: a SQLite file in WAL mode, or a PostgreSQL database that several
servers share), a batch per transaction. At start the server claims the store's meta
(``experiment``, ``arms`` {arm: share}, ``salt_sha256``: the first server's values stay, and a
server whose config differs is refused) and writes ``control``. On shutdown (SIGTERM: after
uvicorn answered the requests in flight) the queue is drained and this run's counts written
under its own keys, ``written@SERVER`` and ``dropped@SERVER`` ({exposures, feedback}; SERVER:
host, pid and a random suffix, so servers and restarts never overwrite each other's). Readers
see their sums as ``written`` and ``dropped``, so events sent = stored + dropped can be checked
over every server of the experiment.

With ``--workers N`` (``serve.workers``) each worker process is one such server: its own
queue, writer thread and ``written@SERVER`` / ``dropped@SERVER`` keys (a SQLite store's
writers take turns: ``abtest.events``); the supervisor claims the store's meta once before
the workers start (``claim_events``: a differing config fails there, not in a restart loop),
and the experiment's metrics are written to the workers' shared files, so ``/metrics``
counts every worker (the queue depth summed over the live ones).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import queue
import socket
import threading
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import pyarrow as pa

from shopmtl.abtest.assign import assign, unit_of
from shopmtl.abtest.events import EventStore, Exposure, Feedback, describe
from shopmtl.abtest.experiment import ExperimentConfig, build_policies
from shopmtl.abtest.policy import Policy, top_k
from shopmtl.config import ConfigError
from shopmtl.data.ingest import DataError
from shopmtl.deps import require
from shopmtl.serve.errors import data_error_fields, error_json, validation_message

MAX_CANDIDATES = 1_000  # candidates of one rank request (as /v1/recommend)
MAX_ID = 128  # characters of a user id, a request id, an item id
BATCH = 512  # events per write transaction
FEEDBACK_PATH = "/v1/feedback"
KINDS = ("exposures", "feedback")
_STOP = object()
log = logging.getLogger("shopmtl.serve")


def server_id() -> str:
    """This server run's name in the store's meta keys (``written@SERVER``): the host and pid
    say which process it was, the random suffix keeps a restart (or a reused pid) apart."""
    return f"{socket.gethostname()[:64]}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def rank_path(name: str) -> str:
    return f"/v1/experiments/{name}/rank"


# -- the bounded queue and its writer -----------------------------------------------------------


@dataclass
class Counts:
    queued: dict[str, int] = field(default_factory=lambda: dict.fromkeys(KINDS, 0))
    written: dict[str, int] = field(default_factory=lambda: dict.fromkeys(KINDS, 0))
    dropped: dict[str, int] = field(default_factory=lambda: dict.fromkeys(KINDS, 0))


class EventQueue:
    """Exposures and feedback on their way to ``store``: ``put`` never waits (a full queue
    drops the event and counts it), one writer thread writes batches. ``on_count(what, kind,
    n)`` reports each change (what: queued, written, dropped) to the metrics."""

    def __init__(self, store: EventStore, maxsize: int,
                 on_count: Any = None) -> None:
        self.store = store
        self.counts = Counts()
        self._q: queue.Queue[Any] = queue.Queue(maxsize)
        self._lock = threading.Lock()  # counts are bumped by many request threads
        self._on_count = on_count
        self._thread = threading.Thread(target=self._drain, daemon=True,
                                        name="shopmtl-events")
        self._closed = False

    def start(self) -> None:
        self._thread.start()

    def depth(self) -> int:
        return self._q.qsize()

    def _count(self, what: str, kind: str, n: int) -> None:
        if n <= 0:
            return
        with self._lock:
            getattr(self.counts, what)[kind] += n
        if self._on_count is not None:
            self._on_count(what, kind, n)

    def put(self, event: Exposure | Feedback) -> bool:
        """Queue ``event`` without waiting: False (counted as dropped) when the queue is full
        or closed."""
        kind = "exposures" if isinstance(event, Exposure) else "feedback"
        if self._closed:
            self._count("dropped", kind, 1)
            return False
        try:
            self._q.put_nowait(event)
        except queue.Full:
            self._count("dropped", kind, 1)
            return False
        self._count("queued", kind, 1)
        return True

    def _drain(self) -> None:
        stop = False
        while not stop:
            batch = [self._q.get()]
            while len(batch) < BATCH:  # take what is there, never wait for more
                try:
                    batch.append(self._q.get_nowait())
                except queue.Empty:
                    break
            stop = any(e is _STOP for e in batch)
            self._write([e for e in batch if e is not _STOP])

    def _write(self, batch: list[Any]) -> None:
        exposures = [e for e in batch if isinstance(e, Exposure)]
        feedback = [e for e in batch if isinstance(e, Feedback)]
        for kind, rows, add in (("exposures", exposures, self.store.add_exposures),
                                ("feedback", feedback, self.store.add_feedback)):
            if not rows:
                continue
            try:
                self._count("written", kind, add(rows))
            except Exception as e:  # a full disk, a locked file: counted, logged by type
                log.error("event store: %d %s not written (%s)", len(rows), kind,
                          type(e).__name__)
                self._count("dropped", kind, len(rows))

    def close(self, timeout: float = 60) -> Counts:
        """Stop taking events, write every queued one, end the writer: the counts."""
        self._closed = True
        if self._thread.is_alive():
            self._q.put(_STOP, timeout=timeout)  # may wait for room: the writer is draining
            self._thread.join(timeout)
        else:  # never started: write what is queued here
            pending = []
            while True:
                try:
                    pending.append(self._q.get_nowait())
                except queue.Empty:
                    break
            self._write(pending)
        return self.counts


# -- the experiment in the service ------------------------------------------------------------


def claim_store(store: EventStore, cfg: ExperimentConfig) -> None:
    """An event store belongs to one experiment (and one salt): refuse another's. The
    claim is atomic, so of several servers starting at once on one database the first
    one's config is the store's and a differing one is refused (``ConfigError``)."""
    salt = hashlib.sha256(cfg.salt.encode()).hexdigest()
    held = store.claim_meta({"experiment": cfg.name, "salt_sha256": salt,
                             "arms": cfg.shares})
    where = describe(store.where)  # a URL's password hidden
    if held["experiment"] != cfg.name or held["salt_sha256"] != salt:
        raise ConfigError(f"{where}: this event store holds another experiment "
                          "(another name or salt); give a new events path")
    if held["arms"] != cfg.shares:
        raise ConfigError(f"{where}: this event store's arms or shares differ "
                          "from the config's; give a new events path")
    store.set_meta("control", cfg.control)


def claim_events(cfg: ExperimentConfig) -> None:
    """Create ``cfg``'s event store and claim its meta, then close it: the ``--workers``
    supervisor's check before any worker starts (each worker then claims it again and finds
    the same values). Nothing to do for ``events: none``."""
    if cfg.events is None:
        return
    with EventStore(cfg.events) as store:
        claim_store(store, cfg)


def _rank_body(pd: Any) -> type:
    cell = str | int | float | bool | None
    strict = pd.ConfigDict(extra="forbid", strict=True)
    return pd.create_model(
        "ExperimentRankRequest", __config__=strict,
        user_id=(str | int, pd.Field(description="the user: the unit of randomisation (stored "
                                     "only as a salted hash)")),
        scenario=(str, pd.Field(min_length=1, max_length=MAX_ID)),
        candidates=(list[dict[str, cell]], pd.Field(  # type: ignore[valid-type]
            min_length=1, max_length=MAX_CANDIDATES, description="the items to rank, rows of "
            "the training table's columns (item_id required)")),
        k=(int | None, pd.Field(None, ge=1, le=MAX_CANDIDATES, description="items to show "
                                "(default: the experiment's k for the scenario)")))


def _feedback_body(pd: Any) -> type:
    strict = pd.ConfigDict(extra="forbid", strict=True)
    return pd.create_model(
        "FeedbackRequest", __config__=strict,
        request_id=(str, pd.Field(min_length=1, max_length=MAX_ID)),
        kind=(Literal["click", "conversion"], ...),
        item=(str | int, pd.Field(description="the item id clicked or bought")),
        position=(int, pd.Field(ge=0, le=MAX_CANDIDATES, description="its place in `shown`, "
                                "from 0")),
        value=(float, pd.Field(0.0, ge=0, allow_inf_nan=False, description="a conversion's "
                               "revenue (0 for a click)")))


def _check_id(value: Any, where: str) -> str:
    text = str(value)
    if not 0 < len(text) <= MAX_ID:
        raise DataError(f"{where}: expected 1..{MAX_ID} characters")
    return text


class Experiment:
    """One experiment's arms, policies and event queue in a running service."""

    def __init__(self, cfg: ExperimentConfig) -> None:
        self.cfg = cfg
        self.arms = [(a.name, a.share) for a in cfg.arms]
        self.policies: Mapping[str, Policy] = build_policies(cfg)
        self.locks = {a: threading.Lock() for a in self.policies}  # scoring is CPU-bound
        self.path = rank_path(cfg.name)
        self.metrics: ExperimentMetrics | None = None
        self._multiprocess = False
        self._depth_lock = threading.Lock()
        # events: none (a dry run, the bench's baseline): no store, no queue, nothing logged
        self.store = EventStore(cfg.events) if cfg.events is not None else None
        self.queue = EventQueue(self.store, cfg.queue, self._count) if self.store else None
        if self.store is not None:
            self._check_store(self.store)
        self.unattributed = 0  # refused requests whose user id could not be read
        self.server = server_id()  # this run's meta keys: written@SERVER, dropped@SERVER

    def attach_metrics(self, registry: Any, multiprocess: bool = False) -> None:
        """The experiment's series in the service's Prometheus ``registry``; ``multiprocess``:
        one of several workers (``serve.metrics``: the values go to the shared files)."""
        self.metrics = ExperimentMetrics(registry, self.arms, multiprocess)
        self._multiprocess = multiprocess
        if self.queue is not None and not multiprocess:
            self.metrics.depth.set_function(self.queue.depth)

    def _count(self, what: str, kind: str, n: int) -> None:
        if self.metrics is not None:
            self.metrics.count(what, kind, n)
            if self._multiprocess and self.queue is not None:
                # a callback gauge is read in this process only: the shared files hold values.
                # Read and set under one lock, so the last set is never an older depth.
                with self._depth_lock:
                    self.metrics.depth.set(self.queue.depth())

    def _check_store(self, store: EventStore) -> None:
        try:
            claim_store(store, self.cfg)
        except ConfigError:
            store.close()
            raise

    def start(self) -> None:
        if self.queue is not None:
            self.queue.start()

    def warm_up(self) -> None:
        """Each model arm scores its first model's contract example once: the first call pays
        for lazy set-up (onnxruntime sessions, encoder tables) before the service says ready.
        Popularity and random arms need none."""
        for arm, policy in self.policies.items():
            models = getattr(policy, "models", None)
            if not models:
                continue
            task, model = next(iter(models.items()))
            rows = pa.Table.from_pylist([dict(model.contract(task).example)])
            with self.locks[arm]:
                policy.scores(rows)

    # the two routes' work (run in a worker thread: scoring is CPU-bound)

    def rank(self, body: Any, start: float | None = None) -> tuple[int, dict[str, Any]]:
        """(status, JSON answer) of a validated rank body; its exposure queued, its latency
        counted from ``start`` (``time.perf_counter()`` when the route got the request)."""
        start = time.perf_counter() if start is None else start
        user = _check_id(body.user_id, "body.user_id")
        arm = assign(user, self.cfg.salt, self.arms)
        request_id = uuid.uuid4().hex
        status, shown, answer = 200, [], {}
        try:
            shown_index, shown = self._rank(arm, body)
            answer = {"request_id": request_id, "arm": arm, "shown": shown,
                      "shown_index": shown_index}
        except DataError as e:
            status = 422
            answer = error_json("invalid_request", str(e), _fields(str(e)))
        except Exception as e:  # a bug or a model failure: logged by type, answered 500
            log.error("experiment %s: arm %s failed (%s)", self.cfg.name, arm, type(e).__name__)
            status = 500
            answer = error_json("internal", "internal error")
        self.exposure(request_id, arm, user, body.scenario, shown, start, status)
        return status, answer

    def _rank(self, arm: str, body: Any) -> tuple[list[int], list[str]]:
        k = body.k if body.k is not None else self.cfg.k_for(body.scenario)
        if k is None:
            raise DataError("body.scenario: the experiment has no k for this scenario; give "
                            "k in the request")
        # the request's scenario is every candidate's; its user id fills a row without one
        # (a row's own user id is kept: a model may know users by another id than the unit's)
        rows = [{"user_id": body.user_id, **c,
                 "scenario": _same(c, "scenario", body.scenario, i)}
                for i, c in enumerate(body.candidates)]
        for i, r in enumerate(rows):
            if r.get("item_id") is None:
                raise DataError(f"body.candidates.{i}.item_id: every candidate needs its item id")
        try:
            table = pa.Table.from_pylist(rows)
        except (pa.ArrowInvalid, pa.ArrowTypeError):
            raise DataError("body.candidates: a column holds values of different types "
                            "across candidates") from None
        with self.locks[arm]:
            scores = self.policies[arm].scores(table)
        order = top_k(np.asarray(scores), k)
        items = [str(rows[i]["item_id"]) for i in order]
        return [int(i) for i in order], items

    def exposure(self, request_id: str, arm: str, user: str, scenario: str, shown: list[str],
                 start: float, status: int) -> None:
        latency = 1000 * (time.perf_counter() - start)
        if self.queue is not None:
            self.queue.put(Exposure(request_id, time.time(), self.cfg.name, "test", arm,
                                    unit_of(user, self.cfg.salt), scenario, json.dumps(shown),
                                    latency, status))
        if self.metrics is not None:
            self.metrics.requests.labels(arm, str(status)).inc()

    def feedback(self, body: Any) -> None:
        item = _check_id(body.item, "body.item")
        if self.queue is not None:
            self.queue.put(Feedback(body.request_id, time.time(), body.kind, item,
                                    body.position, float(body.value)))

    def close(self) -> Counts:
        """Drain the queue, write this run's counts under its own meta keys, close."""
        if self.queue is None or self.store is None:
            return Counts()
        counts = self.queue.close()
        try:
            self.store.set_meta(f"written@{self.server}", counts.written)
            self.store.set_meta(f"dropped@{self.server}", counts.dropped)
        except Exception as e:  # the database gone at shutdown: the counts are in the log
            log.error("event store: this run's counts not written (%s)", type(e).__name__)
        self.store.close()
        log.info("experiment %s: events written %s, dropped %s", self.cfg.name,
                 counts.written, counts.dropped)
        return counts


def _same(row: Mapping[str, Any], column: str, value: Any, i: int) -> Any:
    """A candidate's ``column`` is the request's (given or not)."""
    if row.get(column) not in (None, value):
        raise DataError(f"body.candidates.{i}.{column}: differs from the request's {column}")
    return value


def _fields(message: str) -> list[str]:
    """The places a refusal names: ``body.candidates.3.item_id``, or a model's column."""
    head = message.split(":", 1)[0]
    return [head] if head.startswith("body.") else data_error_fields(message)


class ExperimentMetrics:
    """The experiment's Prometheus series, in the service's registry."""

    def __init__(self, registry: Any, arms: list[tuple[str, float]],
                 multiprocess: bool = False) -> None:
        pc = require("prometheus_client", "serve", "the /metrics endpoint")
        live = {"multiprocess_mode": "livesum"} if multiprocess else {}
        self.events = {what: pc.Counter(f"shopmtl_experiment_events_{what}", f"Experiment "
                                        f"events {what}, by kind (exposures, feedback)",
                                        ["kind"], registry=registry)
                       for what in ("queued", "written", "dropped")}
        for counter in self.events.values():
            for kind in KINDS:
                counter.labels(kind)
        self.depth = pc.Gauge("shopmtl_experiment_queue_depth", "Events waiting for the "
                              "writer", registry=registry, **live)
        self.requests = pc.Counter("shopmtl_experiment_requests", "Rank requests by arm and "
                                   "status", ["arm", "status"], registry=registry)
        for arm, _ in arms:
            self.requests.labels(arm, "200")
        self.unattributed = pc.Counter("shopmtl_experiment_unattributed_errors", "Refused "
                                       "rank requests whose user id could not be read (no "
                                       "arm: not in the event store)", registry=registry)

    def count(self, what: str, kind: str, n: int) -> None:
        self.events[what].labels(kind).inc(n)


# -- the routes -----------------------------------------------------------------------------


def add_routes(fastapi: Any, app: Any, exp: Experiment) -> None:
    """The rank and feedback routes. The rank body is validated here (not by FastAPI) so that
    a refused request whose user id can be read is still logged as its arm's exposure."""
    from starlette.concurrency import run_in_threadpool

    pd = require("pydantic", "serve", "the HTTP request models")
    rank_model, feedback_model = _rank_body(pd), _feedback_body(pd)
    JSONResponse = fastapi.responses.JSONResponse

    def refused(errors: Any) -> Any:  # places as FastAPI names them: body.<field>
        message, fields = validation_message(
            [{**e, "loc": ("body", *e.get("loc", ()))} for e in errors])
        return JSONResponse(error_json("invalid_request", message, fields), status_code=422)

    async def rank(request: Any) -> Any:
        start = time.perf_counter()
        raw = await request.body()
        try:
            body = rank_model.model_validate_json(raw)
        except pd.ValidationError as e:
            _log_refused(exp, raw, start)
            return refused(e.errors(include_input=False, include_context=False))
        try:
            status, answer = await run_in_threadpool(exp.rank, body, start)
        except DataError as e:  # a user id out of bounds: no arm
            _log_refused(exp, b"", start)
            return JSONResponse(error_json("invalid_request", str(e), _fields(str(e))), 422)
        return JSONResponse(answer, status_code=status)

    async def feedback(request: Any) -> Any:
        raw = await request.body()
        try:
            body = feedback_model.model_validate_json(raw)
            exp.feedback(body)
        except pd.ValidationError as e:
            return refused(e.errors(include_input=False, include_context=False))
        except DataError as e:
            return JSONResponse(error_json("invalid_request", str(e), _fields(str(e))), 422)
        return JSONResponse({"status": "accepted"}, status_code=202)

    rank.__annotations__["request"] = fastapi.Request
    feedback.__annotations__["request"] = fastapi.Request
    errors = {422: {"description": "`invalid_request`: the body (or a candidate) is invalid"},
              500: {"description": "`internal`: the arm's policy failed"}}
    app.add_api_route(exp.path, rank, methods=["POST"], tags=["experiments"],
                      summary=f"Experiment {exp.cfg.name}: rank candidates for a user",
                      description="The user's arm (a salted hash of the user id) ranks the "
                      "candidates; the answer is the request id, the arm and the item ids "
                      "shown, best first. The exposure is logged (the unit, never the user id).",
                      responses=errors, openapi_extra=_body_doc(rank_model))
    app.add_api_route(FEEDBACK_PATH, feedback, methods=["POST"], tags=["experiments"],
                      status_code=202, summary="A click or a conversion of a ranked request",
                      description="Logged for the experiment's analysis (`shopmtl abtest "
                      "analyze`); 202 once queued (a full queue drops it and counts the drop).",
                      responses={422: errors[422]}, openapi_extra=_body_doc(feedback_model))


def _body_doc(model: Any) -> dict[str, Any]:
    return {"requestBody": {"required": True, "content": {"application/json": {
        "schema": model.model_json_schema()}}}}


def _log_refused(exp: Experiment, raw: bytes, start: float) -> None:
    """A 422 before ranking: an exposure of the user's arm when the user id can be read."""
    user = None
    try:
        given = json.loads(raw) if raw else None
        if isinstance(given, dict) and isinstance(given.get("user_id"), str | int) \
                and not isinstance(given.get("user_id"), bool):
            user = str(given["user_id"])
            scenario = given.get("scenario")
    except ValueError:
        pass
    if user is None or not 0 < len(user) <= MAX_ID:
        exp.unattributed += 1
        if exp.metrics is not None:
            exp.metrics.unattributed.inc()
        return
    scenario = scenario if isinstance(scenario, str) and 0 < len(scenario) <= MAX_ID else ""
    exp.exposure(uuid.uuid4().hex, assign(user, exp.cfg.salt, exp.arms), user, scenario, [],
                 start, 422)
