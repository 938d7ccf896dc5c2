"""Experiments in the service (``shopmtl serve --experiment``): the strict config, the bounded
event queue (drops counted, never waits), the feedback and rank refusals, assignment stable
across requests and restarts with no raw user id stored or logged, SIGTERM draining the queue,
and the loop end to end over loopback: the simulated shop's users against two arms of real
models, the events analysed (SRM within tolerance, sent = stored + dropped, nothing dropped).
"""

from __future__ import annotations

import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from shopmtl.abtest.assign import assign, unit_of
from shopmtl.abtest.events import EventStore, Exposure, Feedback, read_events
from shopmtl.abtest.experiment import load_experiment
from shopmtl.abtest.policy import top_k
from shopmtl.config import ConfigError
from shopmtl.serve.experiment import EventQueue
from tests.helpers import assert_one_error_line, cli
from tests.serve.server import Server, free_port, stop, wait_ready

EXAMPLES = Path(__file__).parents[2] / "examples"
NAME = "ranker-v2"
LABELS = ("day", "click", "conversion", "ad_click", "true_click", "true_conversion",
          "true_ad_click", "is_new_item")


@pytest.fixture(scope="module")
def trained(ab_models: Path) -> Path:
    """The A/B tests' session models (tests/abtest/conftest.py: a small world's multi-task
    model, its single-task baselines and its data), shared with the simulator's tests."""
    return ab_models


def write_config(path: Path, models: Path, **extra: Any) -> Path:
    """Two arms ranking by expected GMV (pCTR x pCVR x price): the multi-task model (control)
    and the single-task click and conversion models (treatment: one directory per task)."""
    weights = {"click": 1, "conversion": 1, "price": 1}
    single = {t: str(models / "single_task" / t / "model") for t in ("click", "conversion")}
    cfg = {"name": NAME, "k": {"home_feed": 10, "search": 10, "ad_slot": 4,
                               "product_page": 10},
           "arms": [{"name": "control", "share": 0.5,
                     "policy": {"model": str(models / "model"), "weights": weights}},
                    {"name": "treatment", "share": 0.5,
                     "policy": {"model": single, "weights": weights}}],
           **extra}
    path.write_text(yaml.safe_dump(cfg))
    return path


def candidates(trained: Path, n: int = 30, start: int = 0) -> list[dict[str, Any]]:
    """Rows of the world's test split without labels, user and scenario (the request's)."""
    rows = pq.read_table(trained / "data" / "test.parquet").slice(start, n).to_pylist()
    return [{k: v for k, v in r.items() if k not in (*LABELS, "user_id", "scenario")}
            for r in rows]


# -- the config --------------------------------------------------------------------------------


@pytest.mark.parametrize("change, match", [
    ({"colour": "red"}, "unknown key.*colour"),
    ({"events": "mysql://db/events"}, "mysql:// URL is not supported"),
    ({"control": "nobody"}, "control: not one of the arms"),
    ({"k": 0}, r"\.k: expected an integer in \[1, 1000\]"),
    ({"queue": 0}, r"\.queue: expected an integer"),
    ({"arms": [{"name": "a", "share": 0.5, "policy": {"random": 1}},
               {"name": "b", "share": 0.6, "policy": {"random": 2}}]}, "sum to 1"),
    ({"arms": [{"name": "a", "share": 0.5, "policy": {"random": 1, "popularity": "p.json"}},
               {"name": "b", "share": 0.5, "policy": {"random": 2}}]}, "exactly one of"),
    ({"arms": [{"name": "a", "share": 0.5, "policy": {"random": 1}, "colour": 1},
               {"name": "b", "share": 0.5, "policy": {"random": 2}}]},
     r"arms\[0\]: unknown key"),
    ({"arms": [{"name": "a b", "share": 0.5, "policy": {"random": 1}},
               {"name": "b", "share": 0.5, "policy": {"random": 2}}]}, r"arms\[0\]\.name"),
])
def test_the_config_is_strict(tmp_path: Path, change: dict[str, Any], match: str) -> None:
    path = write_config(tmp_path / "exp.yaml", tmp_path / "model", **change)
    with pytest.raises(ConfigError, match=match):
        load_experiment(path)


def test_config_defaults_and_relative_paths(tmp_path: Path) -> None:
    (tmp_path / "pop.json").write_text(json.dumps({"7": 3.0}))
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump({"name": "e1", "arms": [
        {"name": "pop", "share": 0.25, "policy": {"popularity": "pop.json"}},
        {"name": "rnd", "share": 0.75, "policy": {"random": 3}}]}))
    cfg = load_experiment(path)
    assert (cfg.salt, cfg.control, cfg.k, cfg.queue) == ("e1", "pop", 10, 10_000)
    assert cfg.events == tmp_path / "events.db"  # beside the config
    assert cfg.arms[0].policy.popularity == tmp_path / "pop.json"
    assert cfg.shares == {"pop": 0.25, "rnd": 0.75}


def test_each_policy_kind_is_built(trained: Path, tmp_path: Path) -> None:
    """A popularity arm from a JSON file or from the training Parquet (each item's clicks),
    a random arm: their scores rank the candidates as they say."""
    from shopmtl.abtest.experiment import build_policies

    distinct = {r["item_id"]: r for r in candidates(trained, 300)}  # one row per item
    rows = pa.Table.from_pylist(list(distinct.values())[:30])
    items = [str(i) for i in rows.column("item_id").to_pylist()]
    (tmp_path / "pop.json").write_text(json.dumps({items[7]: 5.0, items[3]: 9.0}))
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump({"name": "kinds", "arms": [
        {"name": "json", "share": 0.4, "policy": {"popularity": "pop.json"}},
        {"name": "clicks", "share": 0.3,
         "policy": {"popularity": str(trained / "data" / "train.parquet")}},
        {"name": "rnd", "share": 0.3, "policy": {"random": 3}}]}))
    policies = build_policies(load_experiment(path))
    assert [items[i] for i in top_k(policies["json"].scores(rows), 2)] == [items[3], items[7]]
    train = pq.read_table(trained / "data" / "train.parquet", columns=["item_id", "click"])
    clicks = Counter(str(i) for i, c in zip(train.column("item_id").to_pylist(),
                                            train.column("click").to_pylist(), strict=True)
                     if c)
    best = items[int(top_k(policies["clicks"].scores(rows), 1)[0])]
    assert clicks[best] == max(clicks[i] for i in items)
    assert sorted(top_k(policies["rnd"].scores(rows), 30).tolist()) == list(range(30))


# -- the queue -------------------------------------------------------------------------------


def _exposure(i: int) -> Exposure:
    return Exposure(f"r{i}", float(i), NAME, "test", "a", unit_of(str(i), "s"), "search", "[]")


def test_a_full_queue_drops_and_counts_never_waits(tmp_path: Path) -> None:
    """A queue of 3 whose writer is not running yet (a blocked writer): the 4th event on is
    dropped at once and counted; once the writer runs, the 3 queued are written:
    sent = written + dropped, per kind."""
    store = EventStore(tmp_path / "e.db")
    seen: list[tuple[str, str, int]] = []
    q = EventQueue(store, 3, on_count=lambda *c: seen.append(c))
    took = [q.put(_exposure(i)) for i in range(5)]
    took.append(q.put(Feedback("r0", 1.0, "click", "7", 0)))
    assert took == [True, True, True, False, False, False]
    assert q.counts.dropped == {"exposures": 2, "feedback": 1}
    assert q.depth() == 3
    q.start()
    counts = q.close()
    assert counts.written == {"exposures": 3, "feedback": 0}
    assert counts.queued["exposures"] + counts.dropped["exposures"] == 5
    assert q.put(_exposure(9)) is False  # closed: counted, never queued
    assert counts.dropped["exposures"] == 3
    assert ("dropped", "feedback", 1) in seen and ("written", "exposures", 3) in seen
    store.close()
    assert read_events(tmp_path / "e.db").exposures.num_rows == 3


def test_close_drains_a_busy_queue(tmp_path: Path) -> None:
    store = EventStore(tmp_path / "e.db")
    q = EventQueue(store, 5_000)
    q.start()
    for i in range(3_000):  # faster than the writer: most are still queued at close
        assert q.put(_exposure(i))
    counts = q.close()
    store.close()
    assert counts.written["exposures"] == 3_000 and counts.dropped["exposures"] == 0
    assert read_events(tmp_path / "e.db").exposures.num_rows == 3_000


# -- the routes, in process ------------------------------------------------------------------


@pytest.fixture(scope="module")
def app_client(trained: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    from starlette.testclient import TestClient

    from shopmtl.serve import create_app

    cfg = load_experiment(write_config(tmp_path_factory.mktemp("exp") / "exp.yaml",
                                       trained))
    app = create_app(trained / "model", experiment=cfg)  # the model's endpoints and the arms'

    with TestClient(app) as client:
        wait_ready_in(client)
        yield client


def wait_ready_in(client: Any, timeout: float = 60) -> None:
    """An in-process app (a starlette TestClient) answered its warm-up."""
    deadline = time.monotonic() + timeout
    while client.get("/readyz").status_code != 200:
        assert time.monotonic() < deadline, "never ready"
        time.sleep(0.05)


@pytest.mark.parametrize("body, fields", [
    ({"request_id": "r1", "kind": "purchase", "item": "7", "position": 0}, ["body.kind"]),
    ({"request_id": "r1", "kind": "click", "item": "7", "position": -1}, ["body.position"]),
    ({"request_id": "r1", "kind": "conversion", "item": "7", "position": 0, "value": -3.0},
     ["body.value"]),
    ({"request_id": "r1", "kind": "click", "item": "7", "position": "0"}, ["body.position"]),
    ({"request_id": "r1", "kind": "click", "item": "7", "position": 0, "user": "x"},
     ["body.user"]),
    ({"kind": "click", "item": "7", "position": 0}, ["body.request_id"]),
])
def test_bad_feedback_is_a_422_in_the_service_error_shape(app_client: Any, body: dict,
                                                           fields: list[str]) -> None:
    r = app_client.post("/v1/feedback", json=body)
    assert r.status_code == 422, r.text
    err = r.json()["error"]
    assert err["code"] == "invalid_request" and err["fields"] == fields
    assert "purchase" not in err["message"]  # no request value is echoed
    ok = app_client.post("/v1/feedback", json={"request_id": "r1", "kind": "conversion",
                                               "item": 7, "position": 2, "value": 19.5})
    assert ok.status_code == 202 and ok.json() == {"status": "accepted"}


def test_a_refused_rank_is_its_arms_exposure(app_client: Any, trained: Path) -> None:
    """A rank refused after its user id was read counts for the user's arm (status 422, nothing
    shown): the error-rate guardrail sees it. One without a readable user id has no arm."""
    exp = app_client.app.state.experiment
    before = exp.queue.counts.queued["exposures"]
    bad = {"user_id": "u-77", "scenario": "search", "candidates": [{"price": 3.0}]}
    r = app_client.post(f"/v1/experiments/{NAME}/rank", json=bad)
    assert r.status_code == 422
    assert r.json()["error"]["fields"] == ["body.candidates.0.item_id"]
    r = app_client.post(f"/v1/experiments/{NAME}/rank", json={"scenario": "search"})
    assert r.status_code == 422 and "body.user_id" in r.json()["error"]["fields"]
    r = app_client.post(f"/v1/experiments/{NAME}/rank", json={
        "user_id": "u-77", "scenario": "unknown", "candidates": candidates(trained, 5)})
    assert r.status_code == 422 and r.json()["error"]["fields"] == ["body.scenario"]
    ok = app_client.post(f"/v1/experiments/{NAME}/rank", json={
        "user_id": "u-77", "scenario": "search", "candidates": candidates(trained, 30), "k": 4})
    assert ok.status_code == 200
    got = ok.json()
    assert got["arm"] == assign("u-77", NAME, exp.arms) and len(got["shown"]) == 4
    rows = candidates(trained, 30)
    assert got["shown"] == [str(rows[i]["item_id"]) for i in got["shown_index"]]
    assert exp.queue.counts.queued["exposures"] - before == 3  # two 422s with a user, one 200
    assert exp.unattributed >= 1
    metrics = app_client.get("/metrics").text
    assert f'shopmtl_experiment_requests_total{{arm="{got["arm"]}",status="422"}}' in metrics
    assert "shopmtl_experiment_queue_depth" in metrics


def test_the_model_endpoints_answer_beside_the_experiment(app_client: Any, trained: Path
                                                          ) -> None:
    import shopmtl

    example = shopmtl.load(trained / "model").contract("click").example
    r = app_client.post("/v1/score", json={"rows": [example] * 3})
    assert r.status_code == 200 and len(r.json()["predictions"]) == 3


def test_without_a_model_a_reload_is_refused(trained: Path, tmp_path: Path) -> None:
    from starlette.testclient import TestClient

    from shopmtl.serve import create_app

    key = "k" * 32
    cfg = load_experiment(write_config(tmp_path / "exp.yaml", trained))
    with TestClient(create_app(None, experiment=cfg, admin_key=key)) as client:
        wait_ready_in(client)
        r = client.post("/admin/reload", headers={"authorization": f"Bearer {key}"})
        assert client.get("/v1/score").status_code == 404  # no model: no model endpoints
        assert client.get("/livez").headers["x-model-version"].startswith("exp-")
    assert r.status_code == 409 and r.json()["error"]["code"] == "reload_incompatible"


# -- the real server: restarts, privacy, SIGTERM ----------------------------------------------


@contextmanager
def _serve(cfg: Path, log: Path) -> Iterator[Server]:
    """``shopmtl serve --experiment CONFIG`` (no model directory: the arms only) on a free
    loopback port, ready; stopped (SIGTERM) on exit, always."""
    port = free_port()
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "shopmtl", "serve", "--experiment", str(cfg), "--port",
             str(port)], stdout=out, stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    server = Server(f"http://127.0.0.1:{port}", proc, log)
    try:
        wait_ready(server)
        yield server
    finally:
        stop(server)


def _rank(server: Server, user: str, rows: list[dict[str, Any]]) -> dict[str, Any]:
    with server.client() as c:
        r = c.post(f"/v1/experiments/{NAME}/rank",
                   json={"user_id": user, "scenario": "home_feed", "candidates": rows})
    assert r.status_code == 200, r.text
    return r.json()


def test_arms_are_stable_across_restarts_no_raw_id_is_kept_and_sigterm_drains(
        trained: Path, tmp_path: Path) -> None:
    cfg = write_config(tmp_path / "exp.yaml", trained)
    users = [f"secret-user-{i:04d}" for i in range(24)]
    rows = candidates(trained, 20)
    arms = [("control", 0.5), ("treatment", 0.5)]
    runs: list[list[str]] = []
    for run in range(2):  # one server, then a restart on the same event store
        with _serve(cfg, tmp_path / f"serve{run}.log") as server:
            got = [_rank(server, u, rows)["arm"] for u in users for _ in range(2)]
            code = stop(server)  # SIGTERM: drain, write the meta, end
        assert code in (0, -signal.SIGTERM), server.log_text()
        runs.append(got)
        assert got[::2] == got[1::2]  # the same user, the same arm
        assert got[::2] == [assign(u, NAME, arms) for u in users]
        assert "written {'exposures': 48, 'feedback': 0}" in server.log_text()
    assert runs[0] == runs[1]  # and after the restart
    assert set(runs[0]) == {"control", "treatment"}
    events = read_events(tmp_path / "events.db")
    assert events.exposures.num_rows == 2 * 48
    assert events.meta["written"] == {"exposures": 96, "feedback": 0}
    assert events.meta["dropped"] == {"exposures": 0, "feedback": 0}
    assert events.meta["arms"] == {"control": 0.5, "treatment": 0.5}
    assert sorted(set(events.exposures.column("unit").to_pylist())) == sorted(
        unit_of(u, NAME) for u in users)
    stored = b"".join(p.read_bytes() for p in tmp_path.glob("events.db*"))
    logs = "".join((tmp_path / f"serve{r}.log").read_text() for r in range(2))
    for u in users:
        assert u.encode() not in stored and u not in logs
    assert b"secret-user" not in stored and "secret-user" not in logs


def test_a_stuck_writer_never_blocks_a_request(trained: Path, tmp_path: Path) -> None:
    """The real server with a queue of 2 while its SQLite file is locked by another writer
    (the test holds an exclusive transaction): every rank request is answered 200 at once,
    the events beyond the queue are dropped and counted (/metrics, then the meta), and once
    the lock is released the rest is written: sent = written + dropped."""
    cfg = write_config(tmp_path / "exp.yaml", trained, queue=2)
    rows = candidates(trained, 20)
    with _serve(cfg, tmp_path / "serve.log") as server:
        lock = sqlite3.connect(tmp_path / "events.db", isolation_level=None)
        lock.execute("BEGIN EXCLUSIVE")
        try:
            answers = [_rank(server, f"u{i}", rows) for i in range(10)]
            with server.client() as c:
                metrics = c.get("/metrics").text
        finally:
            lock.execute("ROLLBACK")  # within the writer's busy wait (30 s): its batch goes in
            lock.close()
        code = stop(server)
    assert code in (0, -signal.SIGTERM), server.log_text()
    assert len({a["request_id"] for a in answers}) == 10
    dropped = float(re.search(r'^shopmtl_experiment_events_dropped_total\{kind="exposures"\} '
                              r"(\S+)$", metrics, re.M).group(1))
    assert dropped >= 10 - 1 - 2  # one batch in the writer's hands, two queued
    events = read_events(tmp_path / "events.db")
    assert events.meta["dropped"]["exposures"] == dropped
    assert events.exposures.num_rows == events.meta["written"]["exposures"] == 10 - dropped


def test_an_event_store_of_another_experiment_is_refused(trained: Path, tmp_path: Path) -> None:
    with EventStore(tmp_path / "events.db") as store:
        store.set_meta("experiment", "someone-else")
    proc = cli("serve", "--experiment", str(write_config(tmp_path / "exp.yaml", trained)))
    assert_one_error_line(proc, "events.db", "holds another experiment", code=2)


def test_cli_refusals_are_one_line(tmp_path: Path) -> None:
    assert_one_error_line(cli("serve"), "a model directory, --experiment CONFIG", code=2)
    proc = cli("abtest", "play", "http://127.0.0.1:9", "--experiment", NAME, "--world",
               str(tmp_path / "missing.json"))
    assert_one_error_line(proc, "--world", "missing.json", "no such file", code=2)


def test_the_example_config_loads() -> None:
    cfg = load_experiment(EXAMPLES / "abtest" / "serve.yaml")
    assert cfg.shares == {"pctr": 0.5, "gmv": 0.5} and cfg.control == "pctr"
    assert cfg.events is not None and cfg.events.name == "events.db"
    assert cfg.k_for("ad_slot") == 4 and cfg.k_for("elsewhere") is None


# -- must-show 4: the whole loop over HTTP ----------------------------------------------------

REQUESTS = 600  # shop requests played through the service (about 10 s on a loaded machine)


def test_the_shop_against_the_service_end_to_end(trained: Path, tmp_path: Path) -> None:
    """The service with two arms, the simulated shop's users over loopback (each request ranked
    by the service, answered from the world's true probabilities, its clicks and conversions
    posted back), the events in SQLite, then ``analyze``: the units split as the shares say
    (SRM ok), every event sent is stored or counted as dropped, and none was dropped."""
    from shopmtl.abtest.analyze import analyze
    from shopmtl.abtest.http import HttpRanker, play_http
    from shopmtl.abtest.shop import Shop, read_world

    shop = Shop(read_world(trained / "data" / "world.json"))  # the models' world
    cfg = write_config(tmp_path / "exp.yaml", trained)
    with _serve(cfg, tmp_path / "serve.log") as server:
        with server.client() as client, HttpRanker(server.url, NAME, client=client) as ranker:
            reqs = list(shop.requests(REQUESTS, seed=1))
            sent = play_http(shop, reqs, ranker, seed=1)
        assert stop(server) in (0, -signal.SIGTERM), server.log_text()
    events = read_events(tmp_path / "events.db")
    stored = {"exposures": events.exposures.num_rows, "feedback": events.feedback.num_rows}
    dropped = events.meta["dropped"]
    assert sent.exposures == REQUESTS and sent.feedback > 0
    assert sent.exposures == stored["exposures"] + dropped["exposures"]
    assert sent.feedback == stored["feedback"] + dropped["feedback"]
    assert dropped == {"exposures": 0, "feedback": 0}
    assert events.meta["written"] == stored
    assert set(events.exposures.column("status").to_pylist()) == {200}
    # the service's arm of every request is the salted hash's
    arms = [("control", 0.5), ("treatment", 0.5)]
    by_unit = dict(zip(events.exposures.column("unit").to_pylist(),
                       events.exposures.column("arm").to_pylist(), strict=True))
    assert by_unit == {unit_of(str(r.user), NAME): assign(str(r.user), NAME, arms)
                       for r in reqs}
    results = analyze(events)
    srm = results["srm"]
    assert srm["ok"], srm
    assert srm["expected"] == {"control": 0.5, "treatment": 0.5}
    assert sum(srm["counts"].values()) == len(by_unit)
    ctr = results["arms"]["treatment"]["metrics"]["ctr"]["all"]
    assert ctr["n_requests"] > 0 and 0 < ctr["control"] < 1 and 0 < ctr["value"] < 1
