"""The door every request passes: readiness, the in-flight bound, the body bound, the model
version header, metrics and the one log line, as one plain ASGI middleware.

Why one class in front of FastAPI rather than several middlewares: the order matters and is
easier to read in one place. A model request (``/v1/...``) is refused before its body is read
when the model is not warm yet (503, ``not_ready``) or when ``max_in_flight`` requests are
already being answered (429, ``overloaded``, ``Retry-After: 1``): the slot is taken without
waiting, so an overloaded service answers at once and never queues without bound (Triton,
TorchServe and Ray Serve answer a full queue with 503, a server error; 429 says "slow down").
The body is then read up to ``max_body`` bytes (413, ``body_too_large``, beyond it: before any
JSON parsing, so a huge body costs neither memory nor a parse). Health and metrics paths skip
the bounds: a prober must get its answer while the model is busy.

The in-flight count is a plain integer: uvicorn runs this code on one event loop thread, and
the check and the increment have no ``await`` between them, so no two requests can take the
last slot. An exception that escapes the app becomes a 500 here, logged by its type only (its
message could hold a value); the log line of a request holds its method, route, status and
time, never its path's text, query or client address.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import threading
import time
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass, field
from typing import Any

from shopmtl.serve.errors import error_bytes
from shopmtl.serve.metrics import ServeMetrics

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

MODEL_PREFIX = "/v1/"
ADMIN_PREFIX = "/admin/"
VERSION_HEADER = b"x-model-version"
WORKER_HEADER = b"x-shopmtl-worker"  # with --workers N: the answering worker's index, 0..N-1
SERVED_KEY = "shopmtl.served"  # the scope key of the request's Served
log = logging.getLogger("shopmtl.serve")


@dataclass
class ServeState:
    """What the gate and the app share: the served model (swapped by a reload), the bounds,
    readiness, the admin key (None: the admin endpoints are disabled)."""

    current: Any  # the serve.reload.Served answering (its .version: the header)
    metrics: ServeMetrics
    routes: frozenset[str]
    max_in_flight: int = 8
    max_body: int = 1 << 20
    ready: threading.Event = field(default_factory=threading.Event)
    warm_error: str = ""  # why the warm-up failed ("" while warming or once ready)
    in_flight: int = 0
    admin_key: bytes | None = field(default=None, repr=False)
    worker: int | None = None  # with --workers N: this worker's index (serve.workers)

    @property
    def version(self) -> str:
        return self.current.version


class Gate:
    """The ASGI middleware of the module docstring (``app.add_middleware(Gate, state=...)``)."""

    def __init__(self, app: ASGIApp, state: ServeState) -> None:
        self.app, self.state = app, state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        endpoint = path if path in self.state.routes else "other"
        start = time.perf_counter()
        sent = {"status": 0}
        scope[SERVED_KEY] = self.state.current  # this request's model, whatever a reload does
        # an index, never a pid: which worker answered, for a client or a test to tell apart
        extra = (() if self.state.worker is None else
                 ((WORKER_HEADER, str(self.state.worker).encode()),))

        async def send_versioned(message: Message) -> None:
            if message["type"] == "http.response.start":
                sent["status"] = message["status"]
                message["headers"] = [*message.get("headers", ()),
                                      (VERSION_HEADER, scope[SERVED_KEY].version.encode()),
                                      *extra]
            await send(message)

        try:
            if path.startswith(ADMIN_PREFIX) and not await self._admitted(scope, send_versioned):
                return
            await self._guarded(scope, receive, send_versioned, path.startswith(MODEL_PREFIX))
        except Exception as e:  # a bug: answered, logged by type only, never re-raised
            log.error("internal error on %s (%s)", endpoint, type(e).__name__)
            if not sent["status"]:
                await reply(send_versioned, 500, "internal", "internal error")
        finally:
            seconds = time.perf_counter() - start
            status = sent["status"] or 500
            self.state.metrics.observe(endpoint, status, seconds)
            log.info("%s %s %d %.1f ms", scope.get("method", "?"), endpoint, status,
                     1000 * seconds)

    async def _admitted(self, scope: Scope, send: Send) -> bool:
        """An admin request with the admin key; else answered here (403 or 401): False."""
        key = self.state.admin_key
        if key is None:
            await reply(send, 403, "admin_disabled", "the admin endpoints are disabled: start "
                        "the server with --admin-key-file or SHOPMTL_ADMIN_KEY")
            return False
        given = b""
        for name, value in scope.get("headers", ()):
            if name == b"authorization":
                scheme, _, token = value.partition(b" ")
                if scheme.lower() == b"bearer":
                    given = token.strip()
        if given and hmac.compare_digest(hashlib.sha256(given).digest(),
                                         hashlib.sha256(key).digest()):
            return True
        await reply(send, 401, "unauthorized", "a valid admin key is required "
                    "(Authorization: Bearer <key>)", headers=[(b"www-authenticate", b"Bearer")])
        return False

    async def _guarded(self, scope: Scope, receive: Receive, send: Send, model: bool) -> None:
        st = self.state
        if model and not st.ready.is_set():
            why = f"the warm-up failed ({st.warm_error})" if st.warm_error else "warming up"
            await reply(send, 503, "not_ready", f"the model is not ready: {why}", retry=True)
            return
        if model and st.in_flight >= st.max_in_flight:
            await reply(send, 429, "overloaded", f"{st.max_in_flight} requests are being "
                        "answered; retry after a second", retry=True)
            return
        if model:
            st.in_flight += 1
            st.metrics.in_flight.set(st.in_flight)
        try:
            body = await read_body(scope, receive, st.max_body)
            if body is None:
                await reply(send, 413, "body_too_large",
                            f"the request body is larger than {st.max_body} bytes")
                return
            await self.app(scope, replay(body, receive), send)
        finally:
            if model:
                st.in_flight -= 1
                st.metrics.in_flight.set(st.in_flight)


async def read_body(scope: Scope, receive: Receive, limit: int) -> bytes | None:
    """The whole body, or None as soon as it is known to exceed ``limit`` bytes (a declared
    Content-Length is believed first: nothing is read then)."""
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                if int(value) > limit:
                    return None
            except ValueError:
                pass
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":  # the client went away
            return b"".join(chunks)
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def replay(body: bytes, receive: Receive) -> Receive:
    """A ``receive`` that gives the body read once, then waits on the client (disconnects)."""
    done = False

    async def again() -> Message:
        nonlocal done
        if not done:
            done = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return again


async def reply(send: Send, status: int, code: str, message: str, retry: bool = False,
                headers: list[tuple[bytes, bytes]] | None = None) -> None:
    """An error answered by the gate itself, in the service's one error shape."""
    body = error_bytes(code, message)
    headers = [(b"content-type", b"application/json"),
               (b"content-length", str(len(body)).encode()), *(headers or ())]
    if retry:
        headers.append((b"retry-after", b"1"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})
