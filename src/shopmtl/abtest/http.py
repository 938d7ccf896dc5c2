"""The simulator's users against a running service (``shopmtl serve --experiment``): the whole
loop over HTTP (assign, serve, respond, log, analyse), docs/ABTEST.md.

- ``HttpRanker(url, experiment)``: the Shop's pluggable ranker ``(request) -> (arm,
  request_id, shown)`` as one ``POST /v1/experiments/{name}/rank`` (the request's user,
  scenario, candidate rows and k); ``shown`` are candidate indices, best first.
- ``HttpRanker.feedback(request_id, response)``: the user's clicks and conversions of that
  answer as ``POST /v1/feedback`` (one per event; a conversion's value is its GMV).
- ``play_http(shop, requests, ranker, seed)``: each request ranked by the service, answered by
  the shop's users (``Shop.respond``: the world's true probabilities with the scenario's
  position bias) and their feedback posted. The service writes every event; what was sent is
  counted here, so sent = stored + dropped can be checked against the store's meta.

The raw user id travels to the service (it is the service's input), never to a log or the
store: the service keeps ``unit_of(user, salt)``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from shopmtl.deps import require


class ServiceError(RuntimeError):
    """The service refused a request: its status and error code (never the request)."""


@dataclass
class Sent:
    """What the client sent and the service accepted, by kind (the store's meta counts the
    same kinds: exposures, feedback), and the arms the service answered."""

    exposures: int = 0
    feedback: int = 0
    arms: dict[str, int] = field(default_factory=dict)


class HttpRanker:
    """``(request) -> (arm, request_id, shown)`` through the service at ``url``. ``client``:
    an ``httpx.Client`` to reuse (default: one of its own, kept alive between calls)."""

    def __init__(self, url: str, experiment: str, client: Any = None, timeout: float = 30
                 ) -> None:
        httpx = require("httpx", "serve", "the HTTP client of the simulator")
        self.path = f"/v1/experiments/{experiment}/rank"
        self._own = client is None
        self.client = client if client is not None else httpx.Client(base_url=url,
                                                                      timeout=timeout)
        self.sent = Sent()

    def __call__(self, request: Any) -> tuple[str, str, np.ndarray]:
        body = {"user_id": str(request.user), "scenario": request.scenario,
                "candidates": request.candidates.to_pylist(), "k": int(request.k)}
        r = self.client.post(self.path, json=body)
        self.sent.exposures += 1  # a refused rank request is an exposure too (its status)
        if r.status_code != 200:
            raise ServiceError(f"{self.path}: HTTP {r.status_code} ({_code(r)})")
        got = r.json()
        self.sent.arms[got["arm"]] = self.sent.arms.get(got["arm"], 0) + 1
        return got["arm"], got["request_id"], np.asarray(got["shown_index"], np.int64)

    def feedback(self, request_id: str, response: Any) -> int:
        """Post the clicks and conversions of ``response`` (``Shop.respond``'s ``Response``:
        per shown position ``items``, ``clicks``, ``conversions``, ``gmv``): the count posted."""
        events = [("click", int(p), 0.0) for p in np.flatnonzero(response.clicks)]
        events += [("conversion", int(p), float(response.gmv[p]))
                   for p in np.flatnonzero(response.conversions)]
        for kind, pos, value in events:
            r = self.client.post("/v1/feedback", json={
                "request_id": request_id, "kind": kind, "item": str(int(response.items[pos])),
                "position": pos, "value": value})
            self.sent.feedback += 1
            if r.status_code != 202:
                raise ServiceError(f"/v1/feedback: HTTP {r.status_code} ({_code(r)})")
        return len(events)

    def close(self) -> None:
        if self._own:
            self.client.close()

    def __enter__(self) -> HttpRanker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _code(r: Any) -> str:
    try:
        return str(r.json()["error"]["code"])
    except (ValueError, KeyError, TypeError):
        return "no error body"


def play_http(shop: Any, requests: Iterable[Any], ranker: HttpRanker, seed: int = 0) -> Sent:
    """Each request through the service, the shop's user's response, its feedback posted
    (one request at a time, as a user browses). Returns what was sent."""
    rng = np.random.default_rng([shop.cfg.seed, 9, seed])
    for request in requests:
        _arm, request_id, shown = ranker(request)
        ranker.feedback(request_id, shop.respond(request, shown, rng))
    return ranker.sent
