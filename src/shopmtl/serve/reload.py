"""The served model and its hot reload (``POST /admin/reload``, SIGHUP).

A ``Served`` is one loaded model as the service answers it: the ``Model``, its version (the
short sha256 of its ``manifest.json``), its endpoints by path, which score through the model's
one ``serve.batch.Scorer`` (one model call at a time, concurrent table rows combined). It is
never changed once built. ``ServeState.current`` points at the one being served;
the gate reads that reference once when a request arrives and the request is answered by that
``Served`` to its end (its answer and its ``X-Model-Version`` header), so a swap never moves a
request from one model to another half way.

``Reloader.reload(path)`` builds the next one off the serving path (the caller's thread: a
worker thread of the server, or the SIGHUP thread; the old model keeps answering meanwhile):
``shopmtl.load`` (the manifest's hashes checked), its endpoints, the check that they are the
served ones (the same paths, the same request schemas, the same ``top_k`` bound: FastAPI's
routes and their validation are fixed when the app is built, so a model that would change them
needs a restart), and the warm-up (each endpoint answers its contract's example). Only then is
``state.current`` assigned, once, under a lock. A reload that fails at any step leaves the
served model as it was. Reloads are serialised: one at a time (the startup warm-up counts as
one), a second is refused at once, never queued.

Errors carry a stable code and a message that says why in words; the path of the model
directory is replaced by "the model directory" (the manifest's messages start with it), and an
unexpected exception is named by its type only.
"""

from __future__ import annotations

import gc
import hashlib
import logging
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from shopmtl.serve.batch import MAX_ROWS, Scorer
from shopmtl.serve.endpoints import Endpoint, build_endpoints

if TYPE_CHECKING:
    from shopmtl.serve.gate import ServeState

log = logging.getLogger("shopmtl.serve")
# onnxruntime threads per call of a served bundle: a call of a few hundred rows gains nothing
# from a second thread, whose spin-wait after every call took a core from the server's own
# Python (bench/serve_load.py, int8 at 16 clients: 1 thread 315-325 req/s and 11-12 CPU s,
# one per core 237-244 req/s and 14-15 CPU s, 12 s runs each, alternated)
ONNX_THREADS = 1


def model_version(path: Path) -> str:
    """The model directory's version: the short sha256 of its ``manifest.json`` (which holds
    the sha256 of every file, so any change to the model changes it)."""
    manifest = path / "manifest.json"
    if not manifest.is_file():
        return "unknown"
    return hashlib.sha256(manifest.read_bytes()).hexdigest()[:12]


def runtime(kind: str) -> str:
    """The served model's kind and whether this process has torch, for the log lines of
    readiness and reload: an ONNX bundle is served without it (``shopmtl.load`` defers torch
    to what a PyTorch model needs), so "torch not loaded" is what its server should say; a
    PyTorch model directory loads it."""
    torch = "torch loaded" if sys.modules.get("torch") is not None else "torch not loaded"
    return f"kind {kind}; {torch}"


@dataclass(frozen=True)
class Served:
    """One loaded model as the service answers it (the module docstring)."""

    path: Path | None  # None: an experiment-only service (serve.experiment), no model
    model: Any
    version: str
    endpoints: Mapping[str, Endpoint]

    @property
    def kind(self) -> str:
        return "none" if self.model is None else str(self.model.kind)


class ReloadError(Exception):
    """A refused reload: the HTTP status, the stable code, the message (no path, no value)."""

    def __init__(self, status: int, code: str, message: str, outcome: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.outcome = status, code, message, outcome


def load_served(path: str | Path, features: Any = None, batch_rows: int = MAX_ROWS,
                on_call: Callable[[int, int], None] | None = None) -> Served:
    """``shopmtl.load(path)`` (manifest verified) and its endpoints (filled from the feature
    store ``features``, a ``serve.features.Features``, when given), scoring through one
    ``Scorer(model, batch_rows, on_call)``; not warmed up."""
    from shopmtl.modeldir import load

    path = Path(path)
    version = model_version(path)  # before the load: a change meanwhile fails the manifest
    model = load(path, onnx_threads=ONNX_THREADS)
    scorer = Scorer(model, batch_rows, on_call)
    return Served(path, model, version,
                  {e.path: e for e in build_endpoints(scorer, features)})


def warm_up(served: Served) -> None:
    """Each endpoint answers its contract's example once (the first text request builds the
    text bank and loads the encoder: seconds). Raises the first failure."""
    for ep in served.endpoints.values():
        ep.answer(ep.body.model_validate(ep.example))


def signature(served: Served) -> dict[str, tuple[Any, int]]:
    """What the routes fixed at startup depend on: path -> (request JSON schema, top_k bound)."""
    return {p: (ep.body.model_json_schema(), ep.max_top_k) for p, ep in served.endpoints.items()}


def incompatibility(old: Served, new: Served) -> str:
    """Why ``new`` cannot be served by the routes built for ``old`` ("" when it can)."""
    a, b = signature(old), signature(new)
    if a.keys() != b.keys():
        gone, added = sorted(a.keys() - b.keys()), sorted(b.keys() - a.keys())
        parts = ([f"it lacks {', '.join(gone)}"] if gone else []) + (
            [f"it adds {', '.join(added)}"] if added else [])
        return (f"the new model's endpoints differ from the served ones ({'; '.join(parts)}); "
                "the routes are fixed when the server starts: restart it to serve this model")
    changed = sorted(p for p in a if a[p] != b[p])
    if changed:
        return (f"the request schema of {', '.join(changed)} would change (other fields, types, "
                "ranges or labels); the routes are fixed when the server starts: restart it "
                "to serve this model")
    return ""


def _why(e: BaseException, path: Path) -> str:
    """A failure in words, without the directory's path (or, unexpected, by its type only)."""
    from shopmtl.train.checkpoint import CheckpointError

    if isinstance(e, CheckpointError):
        text = str(e)
        for p in sorted({str(path), str(path.absolute())}, key=len, reverse=True):
            text = text.replace(p + ": ", "").replace(p + "/", "").replace(
                p, "the model directory")
        return text
    return f"{type(e).__name__} while loading the model"


def settle_heap() -> None:
    """Every object alive now (the libraries, the app, the served model, warm) moved out of
    the cyclic garbage collector's sight (``gc.freeze``): they live as long as the model.
    Why: a request makes thousands of short-lived objects, so the collector's full passes
    came often, and each walked the millions of objects of torch, pyarrow and the model,
    holding the GIL: those pauses were the service's tail (``bench/serve_load.py``, int8 at 16
    clients, quiet machine: p99 97-104 ms without, 28 ms with, p50 18 ms either way). After a
    reload the frozen objects are thawed and collected first, so the model swapped out can
    be freed (its objects that the old ``Served`` still held at this moment and that form
    cycles stay: a reload's worth of leftovers, not a growing queue)."""
    gc.unfreeze()
    gc.collect()
    gc.freeze()


class Reloader:
    """Serialised reloads of ``state.current`` (the module docstring). ``start_path``: the
    directory the server was started with, reloaded when no path is given. ``on_swap``:
    called with the new ``Served`` right after the swap (the app refreshes its OpenAPI
    version). ``load``: what ``load_served`` is given besides the path (the feature store,
    the scorer's options), the same for every model the server serves."""

    def __init__(self, state: ServeState, start_path: Path | None,
                 on_swap: Callable[[Served], None] | None = None,
                 load: Mapping[str, Any] | None = None) -> None:
        self.state, self.start_path, self.on_swap = state, start_path, on_swap
        self.load = dict(load or {})
        self._busy = threading.Lock()
        self._swap = threading.Lock()

    def startup(self) -> None:
        """The warm-up of the model the server started with (a thread at server start):
        ready once it answered; holds the reload slot meanwhile."""
        with self._busy:
            served = self.state.current
            try:
                warm_up(served)
            except Exception as e:  # the model cannot answer its own example: never ready
                self.state.warm_error = f"{type(e).__name__}"
                log.error("warm-up failed (%s); /readyz stays 503", type(e).__name__)
                return
            settle_heap()
            self._set_ready()
            log.info("ready: model %s answered the warm-up on %d endpoints (%s)",
                     served.version, len(served.endpoints), runtime(served.kind))

    def _set_ready(self) -> None:
        self.state.warm_error = ""
        self.state.ready.set()
        self.state.metrics.ready.set(1)

    def reload(self, path: str | Path | None = None, via: str = "admin") -> tuple[Served, Served]:
        """Load, check, warm up and swap in the model at ``path`` (default: the startup path,
        read again): (the previous ``Served``, the new one). Raises ``ReloadError``."""
        metrics = self.state.metrics
        if not self._busy.acquire(blocking=False):
            metrics.reloads.labels("busy").inc()
            log.warning("reload (%s) refused: another reload or the warm-up is running", via)
            raise ReloadError(409, "reload_in_progress", "another reload (or the startup "
                              "warm-up) is running; retry when it is done", "busy")
        try:
            start = time.perf_counter()
            if self.state.current.model is None:  # no model routes were built: nothing fits
                raise ReloadError(409, "reload_incompatible", "this server was started "
                                  "without a model directory (an experiment only): restart it "
                                  "to serve a model", "incompatible")
            new = self._prepare(Path(path) if path is not None else self.start_path)
            with self._swap:  # one reference assignment: the next request gets the new model
                old, self.state.current = self.state.current, new
                metrics.model(new.version, new.kind)
            settle_heap()
            self._set_ready()  # a reload can bring up a server whose startup warm-up failed
            if self.on_swap is not None:
                self.on_swap(new)
            metrics.reloads.labels("ok").inc()
            log.info("reloaded (%s): model %s -> %s in %.1f s (%s)", via, old.version,
                     new.version, time.perf_counter() - start, runtime(new.kind))
            return old, new
        except ReloadError as e:
            metrics.reloads.labels(e.outcome).inc()
            log.warning("reload (%s) refused (%s): %s; model %s keeps serving", via, e.code,
                        e.message, self.state.current.version)
            raise
        finally:
            self._busy.release()

    def _prepare(self, path: Path) -> Served:
        try:
            new = load_served(path, **self.load)
        except Exception as e:
            raise ReloadError(422, "reload_failed", f"the model did not load: {_why(e, path)}",
                              "failed") from None
        why = incompatibility(self.state.current, new)
        if why:
            raise ReloadError(409, "reload_incompatible", why, "incompatible")
        try:
            warm_up(new)
        except Exception as e:
            raise ReloadError(422, "reload_failed", "the new model failed its warm-up "
                              f"({type(e).__name__}): it cannot answer its own example",
                              "failed") from None
        return new
