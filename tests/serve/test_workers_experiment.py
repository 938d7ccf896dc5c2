"""``shopmtl serve MODEL --experiment CONFIG --workers 2``: each worker one server of the
experiment, all writing one SQLite event store.

Rank requests and feedback over fresh connections reach both workers (``X-Shopmtl-Worker`` 0
and 1); ``/metrics`` of either counts the experiment's requests and events of both; on SIGTERM
to the supervisor every worker drains its queue and writes its own counts, so the store holds
exactly the exposures and feedback sent, two servers' ``written@SERVER`` summing to them, and
no process is left. The arms are seeded random orders (no model to train: the test stays
fast); the zoo model is served beside them.
"""

from __future__ import annotations

import multiprocessing
import os
import re
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

import shopmtl
from shopmtl.abtest.events import EventStore, read_events
from shopmtl.config import ConfigError
from tests.serve.helpers import version_of
from tests.serve.server import Server, free_port, wait_ready
from tests.serve.test_workers import (
    WORKERS,
    alive,
    descendants,
    metric,
    stop_all,
    wait_for,
)

NAME = "wexp"
RANKS = 40  # rank requests at least (more until both workers answered some)
FEEDBACK = 12
MAX_TRIES = 400


def write_config(folder: Path) -> Path:
    """Two seeded random arms, 50/50, events in ``folder/events.db`` (relative: beside it)."""
    cfg = {"name": NAME, "k": {"home_feed": 3},
           "arms": [{"name": "control", "share": 0.5, "policy": {"random": 1}},
                    {"name": "treatment", "share": 0.5, "policy": {"random": 2}}]}
    path = folder / "exp.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def start(model_dir: Path | None, cfg: Path, log: Path) -> Server:
    port = free_port()
    model = [str(model_dir)] if model_dir is not None else []
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "shopmtl", "serve", *model, "--experiment", str(cfg),
             "--port", str(port), "--workers", str(WORKERS)], stdout=out,
            stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    return Server(f"http://127.0.0.1:{port}", proc, log)


def post(server: Server, path: str, body: dict[str, Any]) -> httpx.Response:
    """One request on a connection of its own (the kernel gives it to either worker)."""
    with server.client() as c:
        return c.post(path, json=body)


def rank_body(i: int) -> dict[str, Any]:
    return {"user_id": f"user-{i:04d}", "scenario": "home_feed",
            "candidates": [{"item_id": f"item-{j}", "price": 1.0 + j} for j in range(8)]}


def ranks(server: Server) -> list[httpx.Response]:
    """Rank requests for distinct users, 4 at a time on fresh connections, until at least
    ``RANKS`` were answered and both workers answered some."""
    got: list[httpx.Response] = []
    with ThreadPoolExecutor(4) as pool:
        while len(got) < MAX_TRIES:
            n = len(got)
            got += pool.map(lambda i: post(server, f"/v1/experiments/{NAME}/rank",
                                           rank_body(i)), range(n, n + 4))
            if len(got) >= RANKS and {r.headers.get("x-shopmtl-worker") for r in got} == {
                    "0", "1"}:
                return got
    raise AssertionError(f"{len(got)} fresh connections never reached both workers")


def sent(server: Server, sample: str, want: float) -> None:
    """``sample`` in ``/metrics`` (the sum over the workers' files) reaches ``want``."""
    wait_for(f"{sample} == {want}", lambda: metric(server, sample) == want, 10)


@pytest.mark.parametrize("with_model", [True, False], ids=["model", "experiment-only"])
def test_each_worker_is_a_server_of_the_experiment_and_sigterm_writes_every_event(
        with_model: bool, zoo_dir: Path, zoo_model: shopmtl.Model, tmp_path: Path) -> None:
    cfg = write_config(tmp_path)
    server = start(zoo_dir if with_model else None, cfg, tmp_path / "serve.log")
    seen: set[int] = set()
    try:
        wait_ready(server)
        wait_for("both workers ready", lambda: metric(server, "shopmtl_ready") == WORKERS)
        seen |= descendants(server.proc.pid)
        answers = ranks(server)
        for r in answers:
            assert r.status_code == 200, r.text
        bodies = [r.json() for r in answers]
        feedback = [{"request_id": b["request_id"], "kind": "click", "item": b["shown"][0],
                     "position": 0} for b in bodies[:FEEDBACK - 1]]
        feedback.append({"request_id": bodies[0]["request_id"], "kind": "conversion",
                         "item": bodies[0]["shown"][0], "position": 0, "value": 9.5})
        with ThreadPoolExecutor(4) as pool:
            accepted = list(pool.map(lambda b: post(server, "/v1/feedback", b), feedback))
        assert [r.status_code for r in accepted] == [202] * FEEDBACK
        m = len(answers)
        # /metrics of either worker counts both workers' requests and events
        by_arm = {a: sum(b["arm"] == a for b in bodies) for a in ("control", "treatment")}
        for arm, n in by_arm.items():
            sent(server, f'shopmtl_experiment_requests_total{{arm="{arm}",status="200"}}', n)
        sent(server, 'shopmtl_experiment_events_queued_total{kind="exposures"}', m)
        sent(server, 'shopmtl_experiment_events_queued_total{kind="feedback"}', FEEDBACK)
        sent(server, 'shopmtl_experiment_events_written_total{kind="exposures"}', m)
        text = httpx.get(f"{server.url}/metrics", timeout=10).text
        assert re.search(r"^shopmtl_experiment_queue_depth 0\.0$", text, re.M), text
        if with_model:  # the model's endpoint answers beside the experiment's
            r = post(server, "/v1/score", {"rows": [zoo_model.contract("click").example]})
            assert r.status_code == 200, r.text
            assert r.headers["x-model-version"] == version_of(zoo_dir)
        seen |= descendants(server.proc.pid)
        server.proc.terminate()  # SIGTERM: every worker drains its queue, writes its counts
        assert server.proc.wait(60) == 0, server.log_text()
        wait_for("no process left", lambda: not any(alive(p) for p in seen), 15)
    finally:
        stop_all(server, seen)
    assert len(seen) > WORKERS  # the workers and the tracker were seen, and all ended
    events = read_events(tmp_path / "events.db")
    assert events.exposures.num_rows == m
    assert sorted(events.exposures.column("request_id").to_pylist()) == sorted(
        b["request_id"] for b in bodies)
    assert set(events.exposures.column("status").to_pylist()) == {200}
    assert sorted(zip(events.feedback.column("request_id").to_pylist(),
                      events.feedback.column("kind").to_pylist(), strict=True)) == sorted(
        (f["request_id"], f["kind"]) for f in feedback)
    servers = events.meta["servers"]
    assert len(servers) == WORKERS, servers  # one server per worker, each with its own keys
    assert sum(s["written"]["exposures"] for s in servers.values()) == m
    assert all(s["written"]["exposures"] > 0 for s in servers.values())  # both got traffic
    assert events.meta["written"] == {"exposures": m, "feedback": FEEDBACK}
    assert events.meta["dropped"] == {"exposures": 0, "feedback": 0}
    assert events.meta["experiment"] == NAME
    log = server.log_text()
    assert log.count(f"experiment {NAME}: events written") == WORKERS, log
    assert "user-0" not in log  # the raw user ids are never logged


def test_a_store_of_another_experiment_is_refused_before_any_worker_starts(
        zoo_dir: Path, tmp_path: Path) -> None:
    from shopmtl.serve.workers import run_workers

    with EventStore(tmp_path / "events.db") as store:
        store.set_meta("experiment", "someone-else")
    with pytest.raises(ConfigError, match=r"events\.db: this event store holds another"):
        run_workers(zoo_dir, workers=2, experiment=write_config(tmp_path))


# -- N processes on one SQLite store at once ------------------------------------------------

WRITERS = 4
BATCHES = 20  # transactions per writer
ROWS = 10  # exposures per transaction


def _writer(where: str, index: int, start_at: float) -> dict[str, Any]:
    """One process as a worker's writer: opens the store (a fresh file: the first one creates
    it), claims the meta, writes its batches, then its own counts; what it claimed."""
    from shopmtl.abtest.events import EventStore, Exposure

    while time.time() < start_at:  # every process starts its writes at one moment
        time.sleep(0.001)
    with EventStore(where) as store:
        held = store.claim_meta({"experiment": NAME, "arms": {"a": 0.5, "b": 0.5}})
        for b in range(BATCHES):
            store.add_exposures(Exposure(f"{index}-{b}-{r}", time.time(), NAME, "test", "a",
                                         f"unit-{r}", "home_feed", "[]")
                                for r in range(ROWS))
        store.set_meta(f"written@w{index}", {"exposures": BATCHES * ROWS, "feedback": 0})
    return held


def test_n_processes_claim_and_write_one_fresh_sqlite_store_at_once(tmp_path: Path) -> None:
    """The workers' writers without a server: created, claimed and written by 4 processes at
    the same moment, the store holds every row once and the 4 counts (no "database is
    locked": each writer waits for the lock, abtest.events.BUSY_TIMEOUT_S)."""
    where = str(tmp_path / "events.db")
    start_at = time.time() + 2.0  # after the spawned interpreters imported pyarrow
    with ProcessPoolExecutor(WRITERS, mp_context=multiprocessing.get_context("spawn")) as pool:
        held = list(pool.map(_writer, [where] * WRITERS, range(WRITERS),
                             [start_at] * WRITERS))
    assert held == [{"experiment": NAME, "arms": {"a": 0.5, "b": 0.5}}] * WRITERS
    events = read_events(where)
    ids = events.exposures.column("request_id").to_pylist()
    assert len(ids) == len(set(ids)) == WRITERS * BATCHES * ROWS
    assert events.meta["written"] == {"exposures": WRITERS * BATCHES * ROWS, "feedback": 0}
    assert len(events.meta["servers"]) == WRITERS
