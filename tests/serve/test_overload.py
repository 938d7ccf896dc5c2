"""The real server under more requests than it may answer at once: the extra ones get 429 with
``Retry-After`` at once (never a 5xx, never a queue), health and metrics still answer; and
SIGTERM lets the requests in flight finish before the process exits."""

from __future__ import annotations

import re
import signal
import threading
import time
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


def in_flight(server: Server) -> float:
    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    return float(re.search(r"^shopmtl_http_in_flight (\S+)$", text, re.M).group(1))


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


def test_sigterm_lets_the_requests_in_flight_finish(zoo_dir: Path, tmp_path: Path,
                                                    big: dict[str, Any]) -> None:
    """Four requests queue on the model; SIGTERM once the server counts them in flight: each
    is answered 200 before the process ends."""
    with serving(zoo_dir, tmp_path / "serve.log", "--max-in-flight", "4") as server:
        results: list[httpx.Response] = []
        done = threading.Event()

        def fire() -> None:
            results.extend(burst(server, big, 4, 1))
            done.set()

        thread = threading.Thread(target=fire)
        thread.start()
        deadline = time.monotonic() + 30
        seen = 0.0
        while not done.is_set() and time.monotonic() < deadline:
            seen = in_flight(server)
            if seen >= 2:
                break
        assert seen >= 2, "the requests were never seen in flight together"
        server.proc.terminate()
        thread.join(60)
        # uvicorn re-raises the signal once shut down: the process ends "killed by SIGTERM"
        assert server.proc.wait(60) in (0, -signal.SIGTERM), server.log_text()
    assert [r.status_code for r in results] == [200] * 4
    assert all(len(r.json()["items"]) == 1_000 for r in results)
    log = server.log_text()
    assert log.index("Shutting down") < log.rindex("POST /v1/recommend 200")
