"""The real server under more requests than it may answer at once: the extra ones get 429 with
``Retry-After`` at once (never a 5xx, never a queue), health and metrics still answer."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

import shopmtl
from tests.serve.server import Server, serving
from tests.serve.test_answers import recommend_body

CLIENTS = 8
PER_CLIENT = 6


def burst(server: Server, body: dict[str, Any], clients: int, each: int
          ) -> list[httpx.Response]:
    """``clients`` threads, each posting ``body`` to /v1/recommend ``each`` times."""
    def client(_: int) -> list[httpx.Response]:
        with server.client() as c:
            return [c.post("/v1/recommend", json=body) for _ in range(each)]

    with ThreadPoolExecutor(clients) as pool:
        return [r for rs in pool.map(client, range(clients)) for r in rs]


@pytest.fixture(scope="module")
def big(zoo_model: shopmtl.Model) -> dict[str, Any]:
    return recommend_body(zoo_model, 1_000)  # the most candidates a request may hold


def test_beyond_max_in_flight_requests_get_429_never_5xx(zoo_dir: Path, tmp_path: Path,
                                                        big: dict[str, Any]) -> None:
    with serving(zoo_dir, tmp_path / "serve.log", "--max-in-flight", "1") as server:
        answers = burst(server, big, CLIENTS, PER_CLIENT)
        with server.client() as c:
            ready = c.get("/readyz")
            metrics = c.get("/metrics").text
    codes = [r.status_code for r in answers]
    assert len(codes) == CLIENTS * PER_CLIENT
    assert not [c for c in codes if c >= 500], codes
    assert set(codes) == {200, 429}, codes
    for r in answers:
        if r.status_code == 429:
            assert r.headers["retry-after"] == "1"
            assert r.json()["error"]["code"] == "overloaded"
            assert r.headers["x-model-version"]
        else:
            assert len(r.json()["items"]) == 1_000
    assert ready.status_code == 200
    n429 = codes.count(429)
    assert f'shopmtl_http_requests_total{{code="429",endpoint="/v1/recommend"}} {n429}.0' \
        in metrics
