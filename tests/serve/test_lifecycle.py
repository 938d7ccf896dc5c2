"""The service's life: model requests are refused (503 ``not_ready``) until the model
answered its warm-up, /livez answers from the start; SIGTERM stops the real server listening
and lets the request in flight finish before the process ends."""

from __future__ import annotations

import json
import re
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

import shopmtl
from tests.serve.server import Server, serving
from tests.serve.test_answers import recommend_body


def in_flight(server: Server) -> float:
    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    return float(re.search(r"^shopmtl_http_in_flight (\S+)$", text, re.M).group(1))


def wait_for(what: str, check: Callable[[], bool], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"never: {what}"
        time.sleep(0.02)


def test_model_requests_wait_for_the_warm_up(zoo_dir: Path, zoo_model: shopmtl.Model) -> None:
    """The app in this process (the warm-up starts with the server, so it can be held back):
    before it, /livez is 200 and /readyz and the model paths 503 ``not_ready`` with
    Retry-After; once the server started and the warm-up answered, both open."""
    from starlette.testclient import TestClient

    from shopmtl.serve import create_app

    app = create_app(zoo_dir)
    body = {"rows": [zoo_model.contract("click").example]}
    cold = TestClient(app)  # no server start: no warm-up
    assert cold.get("/livez").status_code == 200
    for r in (cold.get("/readyz"), cold.post("/v1/score", json=body)):
        assert r.status_code == 503 and r.headers["retry-after"] == "1"
        assert r.json()["error"]["code"] == "not_ready"
        assert "warming up" in r.json()["error"]["message"]
    with TestClient(app) as warm:  # the server starts: the warm-up runs
        wait_for("ready", lambda: warm.get("/readyz").status_code == 200)
        assert warm.post("/v1/score", json=body).status_code == 200
        assert "shopmtl_ready 1.0" in warm.get("/metrics").text


def test_sigterm_lets_a_request_in_flight_finish(zoo_dir: Path, zoo_model: shopmtl.Model,
                                                 tmp_path: Path) -> None:
    """A request whose body is half sent when SIGTERM arrives: the server stops listening,
    reads the rest, answers it 200, and only then ends."""
    body = json.dumps(recommend_body(zoo_model, 50)).encode()
    go = threading.Event()

    def upload() -> Iterator[bytes]:  # chunked: the second half waits for the shutdown
        yield body[:len(body) // 2]
        go.wait(60)
        yield body[len(body) // 2:]

    answer: list[httpx.Response] = []
    with serving(zoo_dir, tmp_path / "serve.log") as server:
        def ask() -> None:
            with server.client() as c:
                answer.append(c.post("/v1/recommend", content=upload(),
                                     headers={"content-type": "application/json"}))

        thread = threading.Thread(target=ask)
        thread.start()
        try:
            wait_for("the request in flight", lambda: in_flight(server) == 1)
            server.proc.terminate()
            wait_for("the shutdown", lambda: "Shutting down" in server.log_text())
            with pytest.raises(httpx.TransportError):  # no new connection is accepted
                httpx.get(f"{server.url}/livez", timeout=5)
            assert server.proc.poll() is None  # still answering the one in flight
        finally:
            go.set()
            thread.join(60)
        # uvicorn re-raises the signal once shut down: the process ends "killed by SIGTERM"
        assert server.proc.wait(60) in (0, -signal.SIGTERM), server.log_text()
    assert answer and answer[0].status_code == 200, server.log_text()
    assert len(answer[0].json()["items"]) == 50
    log = server.log_text()
    assert log.index("Shutting down") < log.index("POST /v1/recommend 200"), log
