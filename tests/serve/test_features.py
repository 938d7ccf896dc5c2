"""Features by id: ``shopmtl features`` writes a snapshot (the latest value per user of the
user columns and per item of the item columns); ``shopmtl serve --features SNAPSHOT`` (in
memory) or ``--features-redis URL`` (a real ``redis-server``, started and stopped here) fills
an ids-only request from it and answers exactly as the same request with every feature given
by hand (``shopmtl.load(dir).predict``); an id the store lacks leaves its columns empty (the
unknown row) and is counted in ``shopmtl_feature_misses_total{kind}``."""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pyarrow.parquet as pq
import pytest

import shopmtl
from shopmtl.data.ingest import DataError
from shopmtl.serve.features import (
    QUICKSTART_ITEM_COLUMNS,
    QUICKSTART_USER_COLUMNS,
    SnapshotStore,
    redis_key,
)
from tests.helpers import cli, small_world, world_config_yaml
from tests.serve.helpers import close, post
from tests.serve.server import Server, free_port, serving

USER_COLS = list(QUICKSTART_USER_COLUMNS)
ITEM_COLS = list(QUICKSTART_ITEM_COLUMNS)
TASKS = ("click", "conversion", "ad_click")


@dataclass
class World:
    data: Path  # the world's folder
    model: Path
    snapshot: Path
    users: dict[str, dict[str, Any]]  # user id -> the train file's last row's user columns
    items: dict[str, dict[str, Any]]
    fields: list[str]  # the contract's input fields


def cell(v: Any) -> Any:
    """A file's cell as a request field: categoricals are text, price a number."""
    return v if v is None or isinstance(v, (str, float)) else str(v)


def last_rows(path: Path, key: str, cols: list[str]) -> dict[str, dict[str, Any]]:
    """The last row per key in file order, by a plain loop (the reference)."""
    out: dict[str, dict[str, Any]] = {}
    for r in pq.read_table(path, columns=[key, *cols]).to_pylist():
        out[str(r[key])] = {c: r[c] for c in cols}
    return out


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    tmp = tmp_path_factory.mktemp("features")
    small_world(tmp / "w", rows=20_000)
    cfg = world_config_yaml(tmp / "w", tmp / "a.yaml", epochs=1, seed=0, prior_guard=False)
    cli("train", str(cfg), "--out", str(tmp / "run"), check=True)
    train = tmp / "w" / "train.parquet"
    cli("features", str(train), "--out", str(tmp / "snap"), check=True)  # the defaults
    model = tmp / "run" / "model"
    fields = [f.name for f in shopmtl.load(model).contract("click").inputs]
    return World(tmp / "w", model, tmp / "snap", last_rows(train, "user_id", USER_COLS),
                 last_rows(train, "item_id", ITEM_COLS), fields)


def full(world: World, given: dict[str, Any]) -> dict[str, Any]:
    """``given`` completed by hand from the file's last rows (fields given win), as a row of
    every contract field (absent = empty)."""
    row = dict(given)
    for key, table in (("user_id", world.users), ("item_id", world.items)):
        for c, v in table.get(row.get(key), {}).items():
            row.setdefault(c, cell(v))
    return {f: row.get(f) for f in world.fields}


def reference(world: World, rows: list[dict[str, Any]]) -> list[dict[str, float]]:
    table = shopmtl.load(world.model).predict(rows)
    return [{t: r[t] for t in TASKS} for r in table.to_pylist()]


def some_ids(world: World, n_users: int = 3, n_items: int = 6) -> tuple[list[str], list[str]]:
    return sorted(world.users)[:n_users], sorted(world.items)[:n_items]


def misses(server: Server, kind: str) -> float:
    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    m = re.search(rf'^shopmtl_feature_misses_total{{kind="{kind}"}} (\S+)$', text, re.M)
    assert m, text
    return float(m.group(1))


def by_candidate(answer: dict[str, Any]) -> list[dict[str, float]]:
    items = sorted(answer["items"], key=lambda it: it["candidate"])
    return [it["predictions"] for it in items]


# -- the snapshot ---------------------------------------------------------------------------


def test_snapshot_holds_the_last_row_per_id(world: World, tmp_path: Path) -> None:
    manifest = json.loads((world.snapshot / "manifest.json").read_text())
    assert manifest["user"]["columns"] == USER_COLS and manifest["item"]["columns"] == ITEM_COLS
    store = SnapshotStore(world.snapshot)
    for kind, table in (("user", world.users), ("item", world.items)):
        keys = sorted(table)
        rows, missing = store.lookup(kind, [*keys, "no-such-id"])
        assert missing == 1 and rows[-1] == {}
        for k, got in zip(keys, rows, strict=False):
            assert got == {c: v for c, v in table[k].items() if v is not None}, (kind, k)
    # --order-by day: the row of the latest day per id (ties: the last of them in the file)
    train = world.data / "train.parquet"
    cli("features", str(train), "--out", str(tmp_path / "by_day"), "--order-by", "day",
        "--user-columns", "segment,hist_leaf", "--item-columns", "price", check=True)
    latest: dict[str, tuple[int, Any]] = {}
    for r in pq.read_table(train, columns=["user_id", "day", "hist_leaf"]).to_pylist():
        if str(r["user_id"]) not in latest or r["day"] >= latest[str(r["user_id"])][0]:
            latest[str(r["user_id"])] = (r["day"], r["hist_leaf"])
    by_day = SnapshotStore(tmp_path / "by_day")
    keys = sorted(latest)
    rows, _ = by_day.lookup("user", keys)
    assert [r.get("hist_leaf") for r in rows] == [latest[k][1] for k in keys]
    # written again: replaced in place, no temporary folder left; a changed file is refused
    cli("features", str(train), "--out", str(tmp_path / "by_day"), check=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["by_day"]
    assert SnapshotStore(tmp_path / "by_day").spec.columns["user"] == tuple(USER_COLS)
    with (tmp_path / "by_day" / "user.parquet").open("ab") as f:
        f.write(b"x")
    with pytest.raises(DataError, match="sha256"):
        SnapshotStore(tmp_path / "by_day")
    bad = cli("features", str(train), "--out", str(tmp_path / "x"), "--user-columns", "nope")
    assert bad.returncode == 1 and "no column(s) ['nope']" in bad.stderr


# -- the service with the snapshot in memory ------------------------------------------------


@pytest.fixture(scope="module")
def snap_server(world: World, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    log = tmp_path_factory.mktemp("serve") / "features.log"
    with serving(world.model, log, "--features", str(world.snapshot)) as server:
        yield server


def test_ids_only_requests_answer_as_the_full_request(world: World, snap_server: Server
                                                      ) -> None:
    users, items = some_ids(world)
    for user, scenario in zip(users, ("home_feed", "search", "ad_slot"), strict=True):
        context = {"user_id": user, "scenario": scenario}
        cands = [{"item_id": it, "position": str(p % 3)} for p, it in enumerate(items)]
        got = post(snap_server, "/v1/recommend", {"context": context, "candidates": cands})
        want = reference(world, [full(world, {**context, **c}) for c in cands])
        close(by_candidate(got), want)
        # the same request with every feature given by hand: the same answer
        hand = [{k: v for k, v in full(world, {**context, **c}).items()
                 if v is not None and k not in ("scenario",)} for c in cands]
        got_hand = post(snap_server, "/v1/recommend",
                        {"context": {"scenario": scenario}, "candidates": hand})
        close(got_hand, got)
    # /v1/score: ids-only rows; a field given in the request wins over the store's
    rows = [{"user_id": users[0], "item_id": items[1], "scenario": "search"},
            {"user_id": users[1], "item_id": items[2], "scenario": "ad_slot", "price": 99.5,
             "segment": "0"}]
    got = post(snap_server, "/v1/score", {"rows": rows})["predictions"]
    close(got, reference(world, [full(world, r) for r in rows]))
    assert misses(snap_server, "user") == 0 and misses(snap_server, "item") == 0


def test_an_unknown_id_is_the_empty_cells_and_a_miss(world: World, snap_server: Server
                                                     ) -> None:
    users, items = some_ids(world)
    before_u, before_i = misses(snap_server, "user"), misses(snap_server, "item")
    context = {"user_id": "no-such-user", "scenario": "home_feed"}
    cands = [{"item_id": it} for it in items[:3]]
    got = post(snap_server, "/v1/recommend", {"context": context, "candidates": cands})
    want = reference(world, [full(world, {**context, **c}) for c in cands])
    assert all(full(world, {**context, **c})[col] is None for c in cands for col in USER_COLS)
    close(by_candidate(got), want)
    assert misses(snap_server, "user") == before_u + 1  # one id, counted once
    # an unknown item: its columns empty; price is required (no fill), so it must be given
    r = post(snap_server, "/v1/score", {"rows": [{"user_id": users[0], "item_id": "no-item",
                                                  "scenario": "search"}]}, status=422)
    assert r["error"]["code"] == "invalid_request" and "price" in r["error"]["message"]
    row = {"user_id": users[0], "item_id": "no-item", "scenario": "search", "price": 12.0}
    got = post(snap_server, "/v1/score", {"rows": [row]})["predictions"]
    close(got, reference(world, [full(world, row)]))
    assert full(world, row)["brand"] is None
    assert misses(snap_server, "item") == before_i + 2
    assert "no-such-user" not in snap_server.log_text()


# -- Redis ----------------------------------------------------------------------------------


@pytest.fixture
def redis_url(tmp_path: Path) -> Iterator[str]:
    """A real redis-server on a free loopback port, no persistence; always stopped."""
    exe = shutil.which("redis-server")
    if exe is None:
        raise AssertionError("redis-server is not installed: the Redis store is tested "
                             "against a real one (apt-get install redis-server; .ci/run "
                             "installs it)")
    port = free_port()
    proc = subprocess.Popen([exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", "--dir", str(tmp_path)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError("redis-server did not start") from None
                time.sleep(0.1)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def test_redis_store_answers_and_follows_online_updates(world: World, redis_url: str,
                                                        tmp_path: Path) -> None:
    import redis

    cli("features", str(world.snapshot), "--to-redis", redis_url, check=True)
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    users, items = some_ids(world)
    user = users[0]
    assert client.hgetall(redis_key("user", user))["segment"] == str(
        world.users[user]["segment"])
    context = {"user_id": user, "scenario": "home_feed"}
    cands = [{"item_id": it} for it in items]
    body = {"context": context, "candidates": cands}
    with serving(world.model, tmp_path / "redis.log", "--features-redis", redis_url) as server:
        got = post(server, "/v1/recommend", body)
        close(by_candidate(got), reference(world, [full(world, {**context, **c})
                                                   for c in cands]))
        # a feature updated online: the next answer follows it
        segment = str((int(world.users[user]["segment"]) + 1) % 6)
        client.hset(redis_key("user", user), "segment", segment)
        changed = post(server, "/v1/recommend", body)
        want = reference(world, [full(world, {**context, "segment": segment, **c})
                                 for c in cands])
        close(by_candidate(changed), want)
        assert by_candidate(changed) != by_candidate(got)
        before = misses(server, "user")
        post(server, "/v1/recommend", {"context": {"user_id": "nobody", "scenario": "search"},
                                       "candidates": cands})
        assert misses(server, "user") == before + 1
        # Redis gone: 503 with its own code, never a 500; the server stays up
        client.shutdown(nosave=True)
        with server.client() as c:
            r = c.post("/v1/recommend", json=body)
        assert r.status_code == 503, r.text
        assert r.json()["error"]["code"] == "feature_store_unavailable"
        assert r.headers["retry-after"] == "1"
        assert server.proc.poll() is None


def test_a_hot_reload_keeps_the_store(world: World) -> None:
    """In process: after POST /admin/reload the new model's endpoints fill from the same
    store (the reload builds them with it; their schemas stay the loose ones)."""
    from starlette.testclient import TestClient

    from shopmtl.serve import create_app

    key = "test-admin-key-0123456789abcdef"
    app = create_app(world.model, admin_key=key, features=SnapshotStore(world.snapshot))
    users, items = some_ids(world)
    rows = [{"user_id": users[0], "item_id": items[0], "scenario": "home_feed"}]
    want = reference(world, [full(world, r) for r in rows])
    with TestClient(app) as c:
        deadline = time.monotonic() + 60
        while c.get("/readyz").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        close(c.post("/v1/score", json={"rows": rows}).json()["predictions"], want)
        r = c.post("/admin/reload", headers={"Authorization": f"Bearer {key}"})
        assert r.status_code == 200, r.text
        close(c.post("/v1/score", json={"rows": rows}).json()["predictions"], want)
