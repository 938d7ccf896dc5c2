"""The PostgreSQL event store against a real server (a throwaway cluster, tests/abtest/pg.py):
the same tables and the same events as SQLite, two servers' experiments writing into one
database at once and one analysis over both, and bad URLs or an unreachable server as one-line
errors that never show the password."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from types import SimpleNamespace

import psycopg
import pytest
import yaml

from shopmtl.abtest.analyze import analyze
from shopmtl.abtest.assign import assign, unit_of
from shopmtl.abtest.events import (
    ARROW,
    EventStore,
    EventStoreError,
    Exposure,
    Feedback,
    read_events,
)
from shopmtl.abtest.experiment import load_experiment
from shopmtl.config import ConfigError
from shopmtl.serve.experiment import Experiment
from tests.abtest import eventgen
from tests.abtest.pg import Cluster, cluster
from tests.helpers import assert_one_error_line, cli
from tests.serve.server import Server, free_port, stop, wait_ready

SECRET = "s3cr3t-Do-Not-Show"
PG_TYPES = {"string": "text", "double": "double precision", "int64": "bigint"}


@pytest.fixture(scope="module")
def pg() -> Iterator[Cluster]:
    with cluster() as c:
        yield c


def test_postgres_round_trip_equals_sqlite(pg: Cluster, tmp_path: Path) -> None:
    """The same events written to SQLite and to PostgreSQL read back as the same Events (the
    tables, their column types, the meta); the constraints refuse the same bad rows."""
    spec = eventgen.Spec(users=300, ctr_lift=0.2, latency_shift=2.0, seed=3)
    url = pg.create_database("roundtrip")
    lite = read_events(eventgen.write(tmp_path / "events.db", spec))
    pgev = read_events(eventgen.write(url, spec))  # type: ignore[arg-type]  # a URL
    assert lite.exposures.num_rows > 1000 and lite.feedback.num_rows > 100
    assert pgev.exposures.equals(lite.exposures) and pgev.feedback.equals(lite.feedback)
    assert pgev.meta == lite.meta == {"arms": {"control": 0.5, "treatment": 0.5},
                                      "control": "control", "experiment": "exp"}
    # the one table definition made both databases' tables: same columns, in order
    with psycopg.connect(url) as con:
        for table, schema in ARROW.items():
            cols = con.execute("SELECT column_name, data_type FROM information_schema.columns "
                               "WHERE table_name = %s ORDER BY ordinal_position",
                               (table,)).fetchall()
            assert cols == [(f.name, PG_TYPES[str(f.type)]) for f in schema], table
    con2 = sqlite3.connect(tmp_path / "events.db")
    for table, schema in ARROW.items():
        assert [r[1] for r in con2.execute(f"PRAGMA table_info({table})")] == schema.names
    con2.close()
    with EventStore(url) as store:
        with pytest.raises(psycopg.errors.CheckViolation):
            store.add_feedback([Feedback("r1", 1.0, "purchase", "3", 0)])
        with pytest.raises(psycopg.errors.UniqueViolation):  # r1 is eventgen's first request
            store.add_exposures([Exposure("r1", 1.0, "e", "test", "a", "u", "s", "[]")])
        # a failed batch is one rolled-back transaction: nothing of it is stored
        with pytest.raises(psycopg.errors.UniqueViolation):
            store.add_exposures([Exposure("new", 1.0, "e", "test", "a", "u", "s", "[]"),
                                 Exposure("r2", 1.0, "e", "test", "a", "u", "s", "[]")])
        assert read_events(url).exposures.num_rows == lite.exposures.num_rows
        # the server restarts under a store: the next write fails (the writer counts it as
        # dropped), the one after connects again
        pg.restart()
        with pytest.raises(psycopg.OperationalError):
            store.add_exposures([Exposure("x1", 1.0, "e", "test", "a", "u", "s", "[]")])
        store.add_exposures([Exposure("x2", 1.0, "e", "test", "a", "u", "s", "[]")])
    ids = set(read_events(url).exposures.column("request_id").to_pylist())
    assert "x2" in ids and "x1" not in ids and len(ids) == lite.exposures.num_rows + 1


def _config(path: Path, url: str, queue: int, shares: tuple[float, float] = (0.3, 0.7)) -> Path:
    path.write_text(yaml.safe_dump({
        "name": "pg-exp", "events": url, "queue": queue, "k": 3,
        "arms": [{"name": "control", "share": shares[0], "policy": {"random": 1}},
                 {"name": "treatment", "share": shares[1], "policy": {"random": 2}}]}))
    return path


def _traffic(exp: Experiment, users: range, requests: int, sent: dict[str, int],
             start_after: int | None = None) -> None:
    """``requests`` rank requests of ``users`` in turn, a click on every third answer's first
    item; the writer started after ``start_after`` requests (None: it already runs)."""
    cands = [{"item_id": f"i{j}"} for j in range(8)]
    for i in range(requests):
        if i == start_after:
            exp.start()
        user = f"user{users[i % len(users)]}"
        body = SimpleNamespace(user_id=user, scenario="search", candidates=cands, k=None)
        status, answer = exp.rank(body)
        assert status == 200 and answer["arm"] == assign(user, "pg-exp", exp.arms)
        sent["exposures"] += 1
        if i % 3 == 0:
            exp.feedback(SimpleNamespace(request_id=answer["request_id"], kind="click",
                                         item=answer["shown"][0], position=0, value=0.0))
            sent["feedback"] += 1


def test_two_servers_write_one_database_then_one_analysis(pg: Cluster, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch
                                                          ) -> None:
    """Two servers' experiments (the service's Experiment: its policies, bounded queue and
    writer thread) on one database, at once: one claims the meta, the other agrees; server B's
    writer starts late behind a queue of 40, so it drops. Then `shopmtl abtest analyze URL`
    over both: every request id is stored once, sent = stored + dropped per kind (each
    server's counts under its own meta keys, summed), units split by the shares (SRM ok)."""
    pg.create_database("shared")
    url = pg.url("shared", password=None)  # the password from PGPASSWORD, as docs advise
    monkeypatch.setenv("PGPASSWORD", pg.password)
    a = Experiment(load_experiment(_config(tmp_path / "a.yaml", url, queue=10_000)))
    b = Experiment(load_experiment(_config(tmp_path / "b.yaml", url, queue=40)))
    assert a.server != b.server
    # a third server whose shares differ is refused, the URL in the error redacted
    with pytest.raises(ConfigError, match="arms or shares differ"):
        Experiment(load_experiment(_config(tmp_path / "c.yaml", url, 40, (0.5, 0.5))))
    sent = {s: dict.fromkeys(("exposures", "feedback"), 0) for s in "ab"}
    a.start()
    errors: list[BaseException] = []

    def server(*args: object) -> None:
        try:
            _traffic(*args)  # type: ignore[arg-type]
        except BaseException as e:  # reported by the test, not lost in the thread
            errors.append(e)

    threads = [threading.Thread(target=server, args=(a, range(0, 600), 700, sent["a"])),
               threading.Thread(target=server, args=(b, range(300, 900), 700, sent["b"], 100))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors and not any(t.is_alive() for t in threads), errors
    counts = {"a": a.close(), "b": b.close()}
    assert counts["b"].dropped["exposures"] >= 100 - 40  # the queue of 40 before its writer
    assert counts["a"].dropped == {"exposures": 0, "feedback": 0}  # no request id collided

    events = read_events(url)
    ids = events.exposures.column("request_id").to_pylist()
    assert len(ids) == len(set(ids))
    stored = {"exposures": events.exposures.num_rows, "feedback": events.feedback.num_rows}
    for kind in stored:
        total_sent = sent["a"][kind] + sent["b"][kind]
        assert total_sent == stored[kind] + events.meta["dropped"][kind], kind
        assert events.meta["written"][kind] == stored[kind]
    assert events.meta["servers"] == {
        s.server: {"written": counts[k].written, "dropped": counts[k].dropped}
        for k, s in (("a", a), ("b", b))}
    assert events.meta["arms"] == {"control": 0.3, "treatment": 0.7}
    # each unit's arm is its salted hash's, whichever server answered it
    arm_of = {unit_of(f"user{u}", "pg-exp"): assign(f"user{u}", "pg-exp", a.arms)
              for u in range(900)}
    assert all(arm_of[u] == arm for u, arm in zip(events.exposures.column("unit").to_pylist(),
                                                  events.exposures.column("arm").to_pylist(),
                                                  strict=True))

    out = tmp_path / "report"
    proc = cli("abtest", "analyze", url, "--out", str(out), "--n-boot", "0")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SRM: ok" in proc.stdout
    results = json.loads((out / "results.json").read_text())
    assert results["control"] == "control"
    units = results["srm"]["counts"]
    by_arm: dict[str, set[str]] = {}
    for u, arm in zip(events.exposures.column("unit").to_pylist(),
                      events.exposures.column("arm").to_pylist(), strict=True):
        by_arm.setdefault(arm, set()).add(u)
    assert units == {arm: len(us) for arm, us in by_arm.items()}
    n = sum(units.values())
    assert n >= 600 and abs(units["treatment"] / n - 0.7) < 0.06  # 4 standard errors
    assert analyze(events, n_boot=0)["srm"]["counts"] == units  # the same events in-process


@contextmanager
def _serve(cfg: Path, log: Path) -> Iterator[Server]:
    """``shopmtl serve --experiment CFG`` on a free port (not waited for); stopped always."""
    port = free_port()
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "shopmtl", "serve", "--experiment",
                                 str(cfg), "--port", str(port)], stdout=out,
                                stderr=subprocess.STDOUT,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
    server = Server(f"http://127.0.0.1:{port}", proc, log)
    try:
        yield server
    finally:
        stop(server)


def test_two_server_processes_share_one_database(pg: Cluster, tmp_path: Path) -> None:
    """Two real `shopmtl serve --experiment` processes, started at once on one database (the
    tables and the meta created by whichever comes first), each answering its own users;
    SIGTERM drains both: every exposure and click stored, each server's counts under its own
    key, and neither log shows the URL's password."""
    url = pg.create_database("processes")  # the password in the URL: the logs must hide it
    cfg = _config(tmp_path / "exp.yaml", url, queue=1000)
    cands = [{"item_id": f"i{j}"} for j in range(6)]
    with ExitStack() as stack:
        servers = [stack.enter_context(_serve(cfg, tmp_path / f"s{i}.log")) for i in range(2)]
        for server in servers:
            wait_ready(server)
        for i, server in enumerate(servers):
            with server.client() as c:
                for u in range(40):
                    r = c.post("/v1/experiments/pg-exp/rank", json={
                        "user_id": f"user{i}-{u}", "scenario": "search", "candidates": cands})
                    assert r.status_code == 200, r.text
                    if u % 4 == 0:
                        assert c.post("/v1/feedback", json={
                            "request_id": r.json()["request_id"], "kind": "click",
                            "item": r.json()["shown"][0], "position": 0}).status_code == 202
        for server in servers:
            assert stop(server) in (0, -signal.SIGTERM), server.log_text()
    events = read_events(url)
    assert (events.exposures.num_rows, events.feedback.num_rows) == (80, 20)
    assert events.meta["written"] == {"exposures": 80, "feedback": 20}
    assert events.meta["dropped"] == {"exposures": 0, "feedback": 0}
    assert sorted(s["written"]["exposures"] for s in events.meta["servers"].values()) == [40, 40]
    logs = "".join(s.log_text() for s in servers)
    assert pg.password not in logs and "shop:***@127.0.0.1" in logs


def test_bad_url_or_unreachable_server_is_one_line_without_the_password(
        pg: Cluster, tmp_path: Path) -> None:
    dead = free_port()  # nobody listens there
    cases = {
        f"postgresql://shop:{SECRET}@127.0.0.1:{dead}/db": "Connection refused",
        pg.url("postgres", password=SECRET): "password authentication failed",
        f"postgresql://shop:{SECRET}@127.0.0.1:notaport/db": "invalid integer value",
        f"postgresql://shop@127.0.0.1:{pg.port}/db?password={SECRET}": "password authentication",
    }
    for url, reason in cases.items():
        for call in (EventStore, read_events):
            with pytest.raises(EventStoreError) as err:
                call(url)
            text = str(err.value)
            assert reason in text and SECRET not in text and "\n" not in text, text
            assert "***" in text, text
    proc = cli("abtest", "analyze", f"postgresql://shop:{SECRET}@127.0.0.1:{dead}/db",
               "--out", str(tmp_path / "r"))
    line = assert_one_error_line(proc, "127.0.0.1", "Connection refused", code=1)
    assert SECRET not in line
    # a database without the tables is not an event store
    empty = pg.create_database("empty")
    with pytest.raises(ValueError, match="not a shopmtl event store"):
        read_events(empty)
    # a config holding a password prints (and hashes: X-Model-Version) without it
    cfg = load_experiment(_config(tmp_path / "ok.yaml", pg.url("db", SECRET), 10))
    assert str(cfg.events) == pg.url("db", SECRET) and SECRET not in repr(cfg)
    # the config checks a URL's form without echoing it
    for events, match in ((f"mysql://u:{SECRET}@h/db", "mysql:// URL is not supported"),
                          (f"postgresql://u:{SECRET}@h:99999/db", "not a valid URL"),
                          (f"postgresql://u:{SECRET}@h:5432", "DATABASE")):
        path = tmp_path / "exp.yaml"
        path.write_text(yaml.safe_dump({"name": "e", "events": events, "arms": [
            {"name": "a", "share": 0.5, "policy": {"random": 1}},
            {"name": "b", "share": 0.5, "policy": {"random": 2}}]}))
        with pytest.raises(ConfigError, match=match) as err:
            load_experiment(path)
        assert SECRET not in str(err.value)
    # the server refuses to start on an unreachable store: one line, exit 1, no password
    cfg = _config(tmp_path / "dead.yaml", f"postgresql://shop:{SECRET}@127.0.0.1:{dead}/db", 10)
    line = assert_one_error_line(cli("serve", "--experiment", str(cfg)), "Connection refused",
                                 code=1)
    assert SECRET not in line


def test_without_psycopg_a_url_is_the_extras_one_line(tmp_path: Path) -> None:
    from tests.test_extras import cli_without

    proc = cli_without(["psycopg"], "abtest", "analyze",
                       f"postgresql://shop:{SECRET}@127.0.0.1:{free_port()}/db",
                       "--out", str(tmp_path / "r"))
    line = assert_one_error_line(proc, "pip install 'shopmtl[abtest-pg]'", code=1)
    assert SECRET not in line
