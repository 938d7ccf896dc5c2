"""serve.batch: concurrent requests' table rows scored in one model call, each request handed
exactly its own answer (or its own error), on the real zoo model; and the service's
``--batch-rows`` end to end."""

from __future__ import annotations

import threading
import time
from typing import Any

import numpy as np
import pytest

import shopmtl
from shopmtl.data.ingest import DataError
from shopmtl.serve.batch import Scorer, predict_tasks
from tests.serve.server import serving

TASKS = ("click", "conversion", "ad_click")


def requests_of(model: shopmtl.Model, n: int, size: int) -> list[list[dict[str, Any]]]:
    """``n`` requests of ``size`` rows: the contract's example with other prices and items."""
    example = dict(model.contract("click").example)
    rng = np.random.default_rng(0)
    return [[{**example, "price": float(rng.uniform(1, 200)), "item_id": str(rng.integers(100)),
              "scenario": ("home_feed", "search")[int(rng.integers(2))]}
             for _ in range(size)] for _ in range(n)]


def concurrently(scorer: Scorer, requests: list[list[dict[str, Any]]],
                 tasks: tuple[str, ...] = TASKS) -> list[Any]:
    """Each request from its own thread while the test holds the model, released once all
    are queued: the first thread to get the model then scores what is queued."""
    out: list[Any] = [None] * len(requests)

    def one(i: int) -> None:
        try:
            out[i] = scorer.predict(requests[i], tasks)
        except Exception as e:
            out[i] = e

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(requests))]
    with scorer.lock:
        for t in threads:
            t.start()
        deadline = time.monotonic() + 30
        while len(scorer._queue) < len(requests):
            assert time.monotonic() < deadline, "the requests never queued"
            time.sleep(0.001)
    for t in threads:
        t.join(30)
    return out


def calls_of(scorer: Scorer) -> list[tuple[int, int]]:
    calls: list[tuple[int, int]] = []
    scorer.on_call = lambda requests, rows: calls.append((requests, rows))
    return calls


def test_concurrent_requests_are_one_call_and_each_gets_its_own_rows(
        zoo_model: shopmtl.Model) -> None:
    scorer = Scorer(zoo_model)
    calls = calls_of(scorer)
    requests = requests_of(zoo_model, 6, 7)
    got = concurrently(scorer, requests)
    assert calls == [(6, 42)]  # one model call for all six
    for rows, answer in zip(requests, got, strict=True):
        alone = predict_tasks(zoo_model, rows, TASKS)
        assert answer.keys() == alone.keys()
        for t in TASKS:
            np.testing.assert_allclose(answer[t], alone[t], rtol=0, atol=1e-6)


def test_a_bad_request_gets_its_own_error_and_the_others_their_answers(
        zoo_model: shopmtl.Model) -> None:
    """The combined call fails on one request's row: each is scored alone, the bad one's
    error counts rows in its own request (row 2, not 2 + the rows before it)."""
    scorer = Scorer(zoo_model)
    calls = calls_of(scorer)
    requests = requests_of(zoo_model, 4, 5)
    requests[2][2]["scenario"] = "no_such_scenario"
    got = concurrently(scorer, requests)
    assert isinstance(got[2], DataError)
    assert "row 2" in str(got[2]) and "scenario" in str(got[2])
    for i in (0, 1, 3):
        alone = predict_tasks(zoo_model, requests[i], TASKS)
        np.testing.assert_allclose(got[i]["click"], alone["click"], rtol=0, atol=1e-6)
    assert calls == [(1, 5)] * 3  # the three good ones, alone after the failed combined call


def test_a_call_holds_at_most_max_rows_and_other_task_lists_are_other_calls(
        zoo_model: shopmtl.Model) -> None:
    scorer = Scorer(zoo_model, max_rows=10)
    calls = calls_of(scorer)
    requests = requests_of(zoo_model, 5, 4) + requests_of(zoo_model, 1, 12)
    got = concurrently(scorer, requests)
    assert all(isinstance(g, dict) for g in got)
    assert sorted(calls) == [(1, 4), (1, 12), (2, 8), (2, 8)]  # 12 > 10 rows: alone
    ads = Scorer(zoo_model)
    calls = calls_of(ads)
    mixed = concurrently(ads, requests_of(zoo_model, 2, 3), ("ad_click",))
    assert [sorted(m) for m in mixed] == [["ad_click"], ["ad_click"]]
    assert calls == [(2, 6)]


def test_no_combining_scores_each_request_alone(zoo_model: shopmtl.Model) -> None:
    scorer = Scorer(zoo_model, max_rows=0)
    calls = calls_of(scorer)
    threads = [threading.Thread(target=scorer.predict, args=(r, TASKS))
               for r in requests_of(zoo_model, 3, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert calls == [(1, 2)] * 3
    with pytest.raises(ValueError, match="max_rows"):
        Scorer(zoo_model, max_rows=-1)


def test_the_service_combines_concurrent_recommend_requests(zoo_dir: Any, zoo_model: Any,
                                                            tmp_path: Any) -> None:
    """The real server with ``--batch-rows``: concurrent /v1/recommend requests answer as
    ``Model.predict`` does, and /metrics counts the model calls and their rows."""
    import httpx

    from tests.serve.helpers import full_row

    example = dict(zoo_model.contract("click").example)
    item = ("item_id", "price")
    bodies = [{"context": {k: v for k, v in example.items() if k not in item},
               "candidates": [{"item_id": str(i + j), "price": 10.0 + i + j} for j in range(20)]}
              for i in range(8)]
    fields = [f.name for f in zoo_model.contract("click").inputs]
    with serving(zoo_dir, tmp_path / "serve.log", "--batch-rows", "64") as server:
        answers: list[Any] = [None] * len(bodies)

        def one(i: int) -> None:
            with httpx.Client(base_url=server.url, timeout=30) as c:
                answers[i] = c.post("/v1/recommend", json=bodies[i])

        threads = [threading.Thread(target=one, args=(i,)) for i in range(len(bodies))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        metrics = httpx.get(f"{server.url}/metrics").text
    for body, r in zip(bodies, answers, strict=True):
        assert r.status_code == 200
        rows = [full_row(fields, {**body["context"], **c}) for c in body["candidates"]]
        want = zoo_model.predict(rows).column("click").to_pylist()
        got = {it["candidate"]: it["predictions"]["click"] for it in r.json()["items"]}
        np.testing.assert_allclose([got[i] for i in range(len(rows))], want, rtol=0, atol=1e-6)
    # the warm-up's calls and these 8 requests' 160 rows (in however many calls they came)
    rows = [float(line.split()[-1]) for line in metrics.splitlines()
            if line.startswith("shopmtl_model_call_rows_total")]
    assert rows and rows[0] >= 160
    assert "shopmtl_model_call_requests_bucket" in metrics
