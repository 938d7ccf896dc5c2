"""``shopmtl serve --workers N``: N uvicorn worker processes on one listening socket.

One process answers on one core (the GIL), so a service on N cores runs N workers. The parent
is uvicorn's own multiprocess supervisor (``uvicorn.supervisors.Multiprocess``, subclassed as
``Supervisor``): it binds the socket once, spawns the workers (each builds the app itself
through the factory ``worker_app``: loads the model and warms it up), restarts a worker that
died or stopped answering its health pings, and on SIGTERM or SIGINT sends each worker SIGTERM
and waits: a worker stops accepting and answers its requests in flight first (uvicorn's
graceful shutdown, ``GRACEFUL_S``). Every bound is per worker: ``--max-in-flight 4`` with
``--workers 2`` admits 8 model requests at once.

What the workers share lives in a private folder the supervisor creates (``mkdtemp``: mode
0700) and removes when it stops:

- ``metrics/``: ``PROMETHEUS_MULTIPROC_DIR``, so that ``/metrics`` of any worker counts the
  whole service (``serve.metrics``);
- ``slot-<i>.lock``: a worker claims the lowest free index ``i`` by an exclusive ``flock`` on
  it, held for its life (the kernel frees it when the process dies, so a restarted worker takes
  the dead one's index); the index, never the pid, answers in ``X-Shopmtl-Worker``;
- ``serving-<i>.json``: the version worker ``i`` serves (written after its warm-up and after
  each swap);
- ``published.json``: the model directory the service serves since the last reload that
  passed (absent: the one it was started with); a restarted worker loads that one.

A hot reload (``POST /admin/reload`` on whichever worker the connection reached, or SIGHUP to
the supervisor, which passes it to one worker) runs the full check and warm-up on that
worker as with one process (``serve.reload``). Only when it passed is the new directory
published (an atomic rename) and the supervisor asked (SIGUSR1) to signal every worker; each
then reloads the published directory through its own ``Reloader`` (the manifest's hashes
checked again, a warm-up again). The reply waits (up to ``SIBLING_WAIT_S``) until every
worker's ``serving-<i>.json`` says the new version and reports the counts. A refused reload
publishes nothing: every worker keeps its model. One service-wide reload runs at a time: the
worker running one holds an exclusive ``flock`` on ``reload.lock`` until the others swapped,
and a reload arriving on any worker meanwhile is refused (409 ``reload_in_progress``), as a
second reload is in one process.

With ``--experiment CONFIG`` (beside a model directory or alone) each worker builds its own
experiment from the config (``serve.experiment``): its own event queue and writer, its counts
under its own ``written@SERVER`` / ``dropped@SERVER`` keys, so the N workers are N servers of
the experiment sharing one event store. The supervisor loads the config and claims the
store's meta once before spawning them (a bad config or another experiment's store fails
there, once). On SIGTERM each worker, after answering its requests in flight, writes its
queued events and its counts before it exits; the supervisor waits for all of them.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from shopmtl.deps import require
from shopmtl.serve.app import GRACEFUL_S, MAX_BODY, admin_key_from, create_app
from shopmtl.serve.batch import MAX_ROWS

ENV = "SHOPMTL_SERVE_WORKERS"  # the workers' options (JSON), from the supervisor
PUBLISHED = "published.json"
SIBLING_WAIT_S = 60.0  # seconds a reload's reply waits for the other workers to swap
BUSY_RETRY_S = 120.0  # seconds a worker retries a reload refused as busy (its warm-up runs)
POLL_S = 0.05
log = logging.getLogger("shopmtl.serve")


def atomic_write(path: Path, data: dict[str, Any]) -> None:
    """``data`` as JSON at ``path``, whole or not at all (a reader never sees half a file)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def claim_slot(shared: Path, count: int) -> tuple[int, IO[bytes]]:
    """The lowest worker index whose lock file no live process holds, and the open file that
    holds it (keep it open: closing it frees the index)."""
    for _ in range(100):  # a worker being replaced may hold its slot a moment longer
        for i in range(count):
            f = (shared / f"slot-{i}.lock").open("ab")
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                f.close()
                continue
            return i, f
        time.sleep(0.1)
    raise RuntimeError(f"all {count} worker slots are taken: is another supervisor running?")


@dataclass(frozen=True)
class Worker:
    """This process's place among the workers: its index, their number, the shared folder."""

    index: int
    count: int
    shared: Path

    @property
    def metrics_dir(self) -> str:
        return str(self.shared / "metrics")

    def serving(self, version: str) -> None:
        """Say which version this worker serves now (after its warm-up, after each swap)."""
        atomic_write(self.shared / f"serving-{self.index}.json", {"version": version})

    def published(self) -> dict[str, Any] | None:
        """The directory and version the last reload that passed published (None: none)."""
        return read_json(self.shared / PUBLISHED)

    def publish(self, path: Path, version: str) -> int:
        """After this worker's reload passed: publish ``path`` and ask the supervisor to tell
        every worker; the number of other workers told."""
        atomic_write(self.shared / PUBLISHED, {"path": os.path.abspath(path),
                                               "version": version})
        os.kill(os.getppid(), signal.SIGUSR1)
        return self.count - 1

    def reload_all(self, reloader: Any, path: str | Path | None, via: str
                   ) -> tuple[Any, Any, dict[str, int]]:
        """A service-wide reload from this worker: one at a time across the workers (a
        second, on any worker, is refused as busy, as a second reload is in one process);
        this worker's full reload, then the publish, then the wait for the others: (the old
        ``Served``, the new one, the counts). Raises ``ReloadError``."""
        from shopmtl.serve.reload import ReloadError

        with (self.shared / "reload.lock").open("ab") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                reloader.state.metrics.reloads.labels("busy").inc()
                raise ReloadError(409, "reload_in_progress", "another worker is running a "
                                  "reload; retry when it is done", "busy") from None
            old, new = reloader.reload(path, via)
            told = self.publish(new.path, new.version)
            serving = self.wait_serving(new.version)
        return old, new, {"total": self.count, "told": told, "serving": serving}

    def wait_serving(self, version: str, timeout: float = SIBLING_WAIT_S) -> int:
        """Wait until every worker serves ``version`` (or ``timeout``): how many do."""
        deadline = time.monotonic() + timeout
        while True:
            n = sum((read_json(self.shared / f"serving-{i}.json") or {}).get("version")
                    == version for i in range(self.count))
            if n == self.count or time.monotonic() > deadline:
                return n
            time.sleep(POLL_S)


def follow(worker: Worker, reloader: Any) -> None:
    """SIGUSR1 in a worker: reload the published directory unless it serves that version
    already (the worker that published it); a reload refused as busy (this worker's warm-up or
    another reload is running) is retried, any other refusal is logged and counted by the
    reloader and leaves this worker's model as it was."""
    from shopmtl.serve.reload import ReloadError

    deadline = time.monotonic() + BUSY_RETRY_S
    while True:
        pub = worker.published()
        if pub is None or pub.get("version") == reloader.state.version:
            return
        try:
            reloader.reload(pub["path"], "published by a sibling worker")
            return
        except ReloadError as e:
            if e.outcome != "busy" or time.monotonic() > deadline:
                return
        time.sleep(0.2)


def install_signals(worker: Worker, reloader: Any) -> None:
    """A worker's SIGUSR1 (follow the published reload) and SIGHUP (reload the startup
    directory here, then publish it), each in a thread: a handler must not block the loop."""
    from shopmtl.serve.reload import ReloadError

    def follow_in_thread(_sig: int, _frame: Any) -> None:
        threading.Thread(target=follow, args=(worker, reloader), daemon=True,
                         name="shopmtl-follow").start()

    def hup() -> None:
        with contextlib.suppress(ReloadError):  # logged and counted; nothing is published
            worker.reload_all(reloader, None, "SIGHUP")

    signal.signal(signal.SIGUSR1, follow_in_thread)
    signal.signal(signal.SIGHUP, lambda _s, _f: threading.Thread(
        target=hup, daemon=True, name="shopmtl-reload").start())


_SLOT: list[IO[bytes]] = []  # the worker's slot lock, open for the process's life


def worker_app() -> Any:
    """The uvicorn app factory each worker process calls: claims its index, builds the app
    of the published model directory (or the startup one) with the supervisor's options."""
    from shopmtl.serve.features import open_store

    opts = json.loads(os.environ[ENV])
    shared = Path(opts["shared"])
    index, lock = claim_slot(shared, opts["workers"])
    _SLOT.append(lock)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format=f"%(asctime)s %(levelname)s %(name)s[worker {index}]: "
                        "%(message)s")
    worker = Worker(index, opts["workers"], shared)
    pub = worker.published()
    path = pub["path"] if pub is not None else opts["model"]
    experiment = None
    if opts["experiment"] is not None:  # this worker's own queue, writer and counts
        from shopmtl.abtest.experiment import load_experiment

        experiment = load_experiment(opts["experiment"])
    app = create_app(path, max_in_flight=opts["max_in_flight"], max_body=opts["max_body"],
                     admin_key=admin_key_from(opts["admin_key_file"]),
                     features=open_store(opts["features"], opts["features_redis"]),
                     experiment=experiment, batch_rows=opts["batch_rows"], worker=worker)
    reloader = app.state.reloader
    if opts["model"] is not None:
        reloader.start_path = Path(opts["model"])  # SIGHUP rereads the startup directory
    install_signals(worker, reloader)
    return app


def _supervisor_class() -> type:
    from uvicorn.supervisors.multiprocess import Multiprocess

    class Supervisor(Multiprocess):  # type: ignore[misc,valid-type]
        """uvicorn's supervisor, with SIGHUP a hot reload (uvicorn's own restarts every
        worker: a cold start) and SIGUSR1 passed to every worker (a published reload); the
        live gauges of a worker that died are dropped from the shared metrics."""

        def handle_term(self) -> None:
            self._stop_listening()
            super().handle_term()

        def handle_int(self) -> None:
            self._stop_listening()
            super().handle_int()

        def _stop_listening(self) -> None:
            # the workers close their copies of the socket as they shut down; this one, the
            # parent's, would otherwise keep accepting connections nobody answers
            for sock in self.sockets:
                sock.close()

        def handle_hup(self) -> None:
            log.info("SIGHUP: one worker reloads the startup directory, then publishes it")
            self._signal(signal.SIGHUP, first_only=True)

        def handle_usr1(self) -> None:
            self._signal(signal.SIGUSR1)

        def _signal(self, sig: int, first_only: bool = False) -> None:
            for p in self.processes:
                if p.pid is not None and p.process.is_alive():
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(p.pid, sig)
                    if first_only:
                        return

        def keep_subprocess_alive(self) -> None:
            before = {p.pid for p in self.processes}
            super().keep_subprocess_alive()
            from prometheus_client import multiprocess

            for pid in before - {p.pid for p in self.processes}:
                multiprocess.mark_process_dead(pid, os.environ["PROMETHEUS_MULTIPROC_DIR"])

    return Supervisor


def run_workers(model_path: Path | None, *, workers: int, host: str = "127.0.0.1",
                port: int = 8000, max_in_flight: int = 8, max_body: int = MAX_BODY,
                admin_key_file: str | Path | None = None, features: str | Path | None = None,
                features_redis: str | None = None, batch_rows: int = MAX_ROWS,
                experiment: str | Path | None = None) -> None:
    """``shopmtl serve --workers N`` (the module docstring): the supervisor, until SIGTERM or
    SIGINT; its private folder is removed when it returns. The options are ``serve.app.run``'s,
    each worker's own (``max_in_flight``: per worker)."""
    uvicorn = require("uvicorn", "serve", "shopmtl serve")
    from shopmtl.serve.reload import model_version

    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if workers < 2:
        raise ValueError("--workers N runs 2 or more workers (1: one process, serve.app.run)")
    if experiment is None and model_path is None:
        raise ValueError("give a model directory, an experiment, or both")
    # each check below fails here, once, not in every worker's restart loop
    if model_path is not None and model_version(Path(model_path)) == "unknown":
        raise ValueError("the model directory has no manifest.json: give a model directory "
                         "(OUT/model, an export bundle)")
    admin_key_from(admin_key_file)
    if experiment is not None:
        from shopmtl.abtest.experiment import load_experiment
        from shopmtl.serve.experiment import claim_events

        claim_events(load_experiment(experiment))  # the store created, its meta claimed
    shared = Path(tempfile.mkdtemp(prefix="shopmtl-serve-"))
    try:
        (shared / "metrics").mkdir()
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(shared / "metrics")  # the spawned inherit
        os.environ[ENV] = json.dumps({
            "shared": str(shared), "workers": workers,
            "model": None if model_path is None else os.path.abspath(model_path),
            "experiment": None if experiment is None else os.path.abspath(experiment),
            "max_in_flight": max_in_flight, "max_body": max_body,
            "admin_key_file": None if admin_key_file is None else os.path.abspath(admin_key_file),
            "features": None if features is None else os.path.abspath(features),
            "features_redis": features_redis, "batch_rows": batch_rows})
        config = uvicorn.Config("shopmtl.serve.workers:worker_app", factory=True, host=host,
                                port=port, workers=workers, access_log=False,
                                server_header=False, timeout_graceful_shutdown=GRACEFUL_S,
                                log_level="info")
        server = uvicorn.Server(config)
        sock = config.bind_socket()
        log.info("serving %s%s with %d workers on http://%s:%d (--max-in-flight %d per "
                 "worker: %d in all)", model_path or "no model directory",
                 "" if experiment is None else " and an experiment (one event queue per "
                 "worker)", workers, host, port, max_in_flight, workers * max_in_flight)
        try:
            _supervisor_class()(config, target=server.run, sockets=[sock]).run()
        finally:
            sock.close()
    finally:
        os.environ.pop(ENV, None)
        os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)
        shutil.rmtree(shared, ignore_errors=True)
