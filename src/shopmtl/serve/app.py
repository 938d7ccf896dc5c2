"""``create_app(model_dir)``: the FastAPI app of a model directory; ``run``: ``shopmtl serve``.

The model is loaded once, when the app is built, and its endpoints come from its contracts
(``serve.endpoints``). Starting the server starts the warm-up in a thread: every endpoint
answers its contract's example once (the first text request builds the text bank, loads the
encoder: seconds), and only then do ``/readyz`` and the model paths open (503 ``not_ready``
before); ``/livez`` answers from the first moment. One lock serialises the model: a joint
model's text bank is shared state, and scoring is CPU-bound, so threads would gain nothing.
Handlers are plain functions, run by FastAPI in its thread pool, so the event loop keeps
answering health checks, metrics and 429s while the model works.

Logging: one line per request (method, route, status, time: ``serve.gate``), the warm-up and
the errors by type; never a request's text, its query string, ids or the client's address
(uvicorn's access log is off).
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import logging
import sys
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from shopmtl.data.ingest import DataError
from shopmtl.deps import require
from shopmtl.serve.endpoints import Endpoint, build_endpoints
from shopmtl.serve.errors import (
    CODES,
    code_of,
    data_error_fields,
    error_json,
    validation_message,
)
from shopmtl.serve.gate import Gate, ServeState
from shopmtl.serve.metrics import ServeMetrics

MAX_BODY = 1 << 20  # bytes of one request body (1 MiB: 1,000 candidates with titles fit)
GRACEFUL_S = 30  # seconds in-flight requests get to finish after SIGTERM
log = logging.getLogger("shopmtl.serve")


def model_version(path: Path) -> str:
    """The model directory's version: the short sha256 of its ``manifest.json`` (which holds
    the sha256 of every file, so any change to the model changes it)."""
    manifest = path / "manifest.json"
    if not manifest.is_file():
        return "unknown"
    return hashlib.sha256(manifest.read_bytes()).hexdigest()[:12]


def create_app(model_path: str | Path, *, max_in_flight: int = 8, max_body: int = MAX_BODY
               ) -> Any:
    """The FastAPI app serving ``model_path`` (any directory ``shopmtl.load`` reads).
    ``max_in_flight`` model requests are answered at once, the next ones get 429;
    ``max_body`` bytes bound a request body (413 beyond)."""
    if max_in_flight < 1 or max_body < 1:
        raise ValueError("max_in_flight and max_body must be >= 1")
    fastapi = require("fastapi", "serve", "the HTTP service")
    from shopmtl.modeldir import load

    path = Path(model_path)
    model = load(path)
    version = model_version(path)
    endpoints = build_endpoints(model)
    lock = threading.Lock()
    routes = frozenset([*(e.path for e in endpoints), "/livez", "/readyz", "/metrics",
                        "/openapi.json", "/docs"])
    state = ServeState(version, ServeMetrics(version, model.kind), routes, max_in_flight,
                       max_body)

    @contextlib.asynccontextmanager
    async def lifespan(_app: Any) -> AsyncIterator[None]:
        threading.Thread(target=warm_up, args=(state, endpoints, lock), daemon=True,
                         name="shopmtl-warm-up").start()
        yield

    app = fastapi.FastAPI(
        title="shopmtl", version=version, lifespan=lifespan,
        description=f"A shopmtl {model.kind} model ({', '.join(model.tasks)}). Every response "
        "carries X-Model-Version; every error is {\"error\": {\"code\", \"message\", "
        "\"fields\"}}; 429 with Retry-After when busy.")
    errors = error_responses()
    for ep in endpoints:
        app.add_api_route(ep.path, handler(fastapi, ep, lock), methods=["POST"],
                          summary=ep.summary, description=ep.description, tags=["model"],
                          responses=errors)
    _health_routes(fastapi, app, state)
    _error_handlers(fastapi, app)
    app.add_middleware(Gate, state=state)
    app.state.serve = state
    return app


def error_responses() -> dict[int | str, dict[str, Any]]:
    """The error answers of a model path, for OpenAPI: the one error shape (FastAPI would
    otherwise publish its own 422 body, which this service never sends). 400 is a body that
    cannot be read as JSON text at all (bytes that are not UTF-8: FastAPI's own refusal);
    malformed JSON text is a 422."""
    from typing import Literal

    pd = require("pydantic", "serve", "the HTTP request models")
    detail = pd.create_model(
        "ErrorDetail", code=(Literal[tuple(sorted(set(CODES.values())))], ...),
        message=(str, pd.Field(description="what is wrong, in words (never a request value)")),
        fields=(list[str], pd.Field(description="the places: body.rows.0.price, query.top_k")))
    body = pd.create_model("Error", error=(detail, ...))
    return {status: {"model": body, "description": f"`{code}`"}
            for status, code in CODES.items() if status in (400, 413, 422, 429, 503)}


def handler(fastapi: Any, ep: Endpoint, lock: threading.Lock) -> Callable[..., Any]:
    """The route function of ``ep``: its body model as the JSON body (with the contract's
    example in OpenAPI), the ``top_k``/``all_classes`` query options where it has labels."""
    def answer(body: Any, top_k: int = 1, all_classes: bool = False) -> dict[str, Any]:
        options = {"top_k": top_k, "all_classes": all_classes} if ep.max_top_k else {}
        with lock:
            return ep.answer(body, **options)

    kw = inspect.Parameter.KEYWORD_ONLY
    params = [inspect.Parameter("body", kw, annotation=ep.body,
                                default=fastapi.Body(examples=[ep.example]))]
    if ep.max_top_k:
        params += [
            inspect.Parameter("top_k", kw, annotation=int, default=fastapi.Query(
                1, ge=1, le=ep.max_top_k, description="multiclass tasks: the K most likely "
                "labels, with their probabilities")),
            inspect.Parameter("all_classes", kw, annotation=bool, default=fastapi.Query(
                False, description="multiclass tasks: also the probability of every label"))]
    answer.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    answer.__name__ = "post_" + ep.path.strip("/").replace("/", "_")
    return answer


def warm_up(state: ServeState, endpoints: list[Endpoint], lock: threading.Lock) -> None:
    """Answer each endpoint's example once; ready only when all answered."""
    for ep in endpoints:
        try:
            body = ep.body.model_validate(ep.example)
            with lock:
                ep.answer(body)
        except Exception as e:  # the model cannot answer its own example: never ready
            state.warm_error = f"{ep.path}: {type(e).__name__}"
            log.error("warm-up failed on %s (%s); /readyz stays 503", ep.path,
                      type(e).__name__)
            return
    state.ready.set()
    state.metrics.ready.set(1)
    log.info("ready: model %s answered the warm-up on %d endpoints", state.version,
             len(endpoints))


def _health_routes(fastapi: Any, app: Any, state: ServeState) -> None:
    responses = fastapi.responses

    @app.get("/livez", tags=["health"], summary="The process is up")
    def livez() -> dict[str, str]:
        return {"status": "alive"}

    @app.get("/readyz", tags=["health"], summary="The model answered its warm-up")
    def readyz() -> Any:
        if state.ready.is_set():
            return {"status": "ready", "model_version": state.version}
        why = f"the warm-up failed ({state.warm_error})" if state.warm_error else "warming up"
        return responses.JSONResponse(error_json("not_ready", f"not ready: {why}"),
                                      status_code=503, headers={"Retry-After": "1"})

    @app.get("/metrics", tags=["health"], summary="Prometheus metrics",
             response_class=responses.PlainTextResponse)  # documented as text, not JSON
    def metrics() -> Any:
        data, ctype = state.metrics.render()
        return responses.Response(data, media_type=ctype)


def _error_handlers(fastapi: Any, app: Any) -> None:
    """Validation errors, HTTP errors and the model's DataError in the one error shape."""
    from starlette.exceptions import HTTPException

    JSONResponse = fastapi.responses.JSONResponse

    @app.exception_handler(fastapi.exceptions.RequestValidationError)
    async def invalid(_request: Any, exc: Any) -> Any:
        message, fields = validation_message(exc.errors())
        return JSONResponse(error_json("invalid_request", message, fields), status_code=422)

    @app.exception_handler(HTTPException)
    async def http_error(_request: Any, exc: Any) -> Any:
        detail = exc.detail if isinstance(exc.detail, str) else "request refused"
        return JSONResponse(error_json(code_of(exc.status_code), detail),
                            status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(DataError)
    async def refused(_request: Any, exc: Any) -> Any:
        message = str(exc)
        return JSONResponse(error_json("invalid_request", message, data_error_fields(message)),
                            status_code=422)


def run(model_path: str | Path, *, host: str = "127.0.0.1", port: int = 8000,
        max_in_flight: int = 8, max_body: int = MAX_BODY) -> None:
    """``shopmtl serve``: the app under uvicorn, one process; SIGTERM stops accepting and lets
    in-flight requests finish (up to ``GRACEFUL_S``)."""
    uvicorn = require("uvicorn", "serve", "shopmtl serve")
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = create_app(model_path, max_in_flight=max_in_flight, max_body=max_body)
    log.info("serving %s (model %s) on http://%s:%d", model_path, app.state.serve.version,
             host, port)
    uvicorn.run(app, host=host, port=port, access_log=False, server_header=False,
                timeout_graceful_shutdown=GRACEFUL_S, log_level="info")
