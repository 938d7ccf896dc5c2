"""Shared by the service tests: posting, the reference comparison, request builders."""

from __future__ import annotations

import hashlib
import math
from pathlib import Path
from typing import Any

import httpx

from tests.serve.server import Server

TOL = 1e-6


def version_of(model_dir: Path) -> str:
    """What ``X-Model-Version`` must say: the manifest's short sha256, computed here."""
    return hashlib.sha256((model_dir / "manifest.json").read_bytes()).hexdigest()[:12]


def post(server: Server, path: str, body: Any, status: int = 200, **params: Any) -> Any:
    with server.client() as c:
        r = c.post(path, json=body, params=params)
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    return r.json()


def close(a: Any, b: Any, where: str = "answer") -> None:
    """``a`` equals ``b``, floats within ``TOL``."""
    if isinstance(a, dict) and isinstance(b, dict):
        assert a.keys() == b.keys(), f"{where}: {sorted(a)} != {sorted(b)}"
        for k in a:
            close(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, list) and isinstance(b, list):
        assert len(a) == len(b), f"{where}: {len(a)} != {len(b)} items"
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            close(x, y, f"{where}[{i}]")
    elif isinstance(a, float) or isinstance(b, float):
        assert not isinstance(a, bool) and not isinstance(b, bool), where
        assert math.isclose(a, b, rel_tol=0, abs_tol=TOL), f"{where}: {a} != {b}"
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def full_row(fields: list[str], given: dict[str, Any]) -> dict[str, Any]:
    """A table row as the service completes it: every column, absent = empty."""
    return {f: given.get(f) for f in fields}


def raw_post(server: Server, path: str, content: bytes, **params: Any) -> httpx.Response:
    """A body sent as bytes (JSON a Python client would never write: ``NaN``, truncated)."""
    with server.client() as c:
        return c.post(path, content=content, params=params,
                      headers={"content-type": "application/json"})
