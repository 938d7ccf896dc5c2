"""bench/serve_load.py's load client (``RawHTTP``, ``drive``) against the real server: it reads
each answer's status and whole body off one keep-alive connection, so the load table counts
what the server said."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

import shopmtl
from tests.serve.server import serving

BENCH = Path(__file__).resolve().parents[2] / "bench"


@pytest.fixture
def serve_load(monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.syspath_prepend(str(BENCH))  # the bench scripts import each other by name
    import serve_load

    return serve_load


def test_the_raw_client_reads_status_and_body_and_drive_counts_them(
        serve_load: Any, zoo_dir: Path, zoo_model: shopmtl.Model, tmp_path: Path) -> None:
    example = dict(zoo_model.contract("click").example)
    good = json.dumps({"context": {}, "candidates": [example] * 3}).encode()
    bad = json.dumps({"context": {}, "candidates": [{**example, "price": "x"}]}).encode()
    with serving(zoo_dir, tmp_path / "serve.log") as server:
        host, port = server.url.removeprefix("http://").split(":")

        async def twice() -> list[tuple[int, float, bytes]]:
            http = serve_load.RawHTTP(host, int(port))
            try:  # the same connection: a good answer, a refusal, a good answer again
                return [await http.post(http.request("/v1/recommend", b))
                        for b in (good, bad, good)]
            finally:
                await http.aclose()

        answers = asyncio.run(twice())
        got = asyncio.run(serve_load.drive(server.url, [good], 2, 1.0))
    assert [a[0] for a in answers] == [200, 422, 200]
    assert len(json.loads(answers[0][2])["items"]) == 3
    assert json.loads(answers[1][2])["error"]["code"] == "invalid_request"
    assert answers[0][2] == answers[2][2]
    assert got["codes"].get("200", 0) > 0 and set(got["codes"]) == {"200"}
    assert len(got["latency_ok_s"]) == got["codes"]["200"]
