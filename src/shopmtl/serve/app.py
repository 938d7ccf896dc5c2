"""``create_app(model_dir)``: the FastAPI app of a model directory; ``run``: ``shopmtl serve``.

The model is loaded once, when the app is built, and its endpoints come from its contracts
(``serve.endpoints``). Starting the server starts the warm-up in a thread: every endpoint
answers its contract's example once (the first text request builds the text bank, loads the
encoder: seconds), and only then do ``/readyz`` and the model paths open (503 ``not_ready``
before); ``/livez`` answers from the first moment. Each served model scores through one
``serve.batch.Scorer``: one model call at a time (a joint model's text bank is shared state,
and scoring is CPU-bound, so threads would gain nothing), the table rows of concurrent
requests combined into one call (``batch_rows``; 0: off). ``POST /admin/reload`` (behind the
admin key, checked by the gate) and SIGHUP swap in another model directory
(``serve.reload``); the routes stay the ones built here.
Handlers are plain functions, run by FastAPI in its thread pool, so the event loop keeps
answering health checks, metrics and 429s while the model works. A model answer is encoded
once, by ``JSONResponse`` (no second pass through FastAPI's ``jsonable_encoder`` and response
validation: the answer is plain JSON values already, and that pass cost about 1 ms of a
100-candidate answer).

``shopmtl serve --workers N`` (``serve.workers``) runs N worker processes, each building
this app with ``worker`` set (its index in ``X-Shopmtl-Worker``, the metrics of every worker
in ``/metrics``, a reload that passed here published to the other workers).

Logging: one line per request (method, route, status, time: ``serve.gate``), the warm-up and
the errors by type; never a request's text, its query string, ids or the client's address
(uvicorn's access log is off).
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import logging
import os
import signal
import sys
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from shopmtl.abtest.events import describe
from shopmtl.data.ingest import DataError
from shopmtl.deps import require
from shopmtl.serve.batch import MAX_ROWS
from shopmtl.serve.endpoints import Endpoint
from shopmtl.serve.errors import (
    CODES,
    STORE_DOWN,
    code_of,
    data_error_fields,
    error_json,
    validation_message,
)
from shopmtl.serve.experiment import FEEDBACK_PATH, Experiment, add_routes
from shopmtl.serve.gate import SERVED_KEY, Gate, ServeState
from shopmtl.serve.metrics import ServeMetrics
from shopmtl.serve.reload import (
    Reloader,
    ReloadError,
    Served,
    load_served,
    model_version,
)

MAX_BODY = 1 << 20  # bytes of one request body (1 MiB: 1,000 candidates with titles fit)
GRACEFUL_S = 30  # seconds in-flight requests get to finish after SIGTERM
RELOAD_PATH = "/admin/reload"
ADMIN_KEY_ENV = "SHOPMTL_ADMIN_KEY"
MIN_ADMIN_KEY = 16  # characters of an admin key
MAX_PATH = 4096  # characters of a reload's path
__all__ = ["create_app", "model_version", "run"]
log = logging.getLogger("shopmtl.serve")


def create_app(model_path: str | Path | None, *, max_in_flight: int = 8,
               max_body: int = MAX_BODY, admin_key: str | None = None, features: Any = None,
               experiment: Any = None, batch_rows: int = MAX_ROWS, worker: Any = None) -> Any:
    """The FastAPI app serving ``model_path`` (any directory ``shopmtl.load`` reads).
    ``max_in_flight`` model requests are answered at once, the next ones get 429;
    ``max_body`` bytes bound a request body (413 beyond). ``admin_key``: the key of
    ``POST /admin/reload`` (``Authorization: Bearer <key>``); None disables it (403).
    ``features``: a feature store (``serve.features``: ``SnapshotStore``, ``RedisStore``)
    that fills the user and item columns a table-row request lacks by its ids; None: a
    request gives every field itself. ``experiment``: an ``abtest.experiment.ExperimentConfig``
    whose arms load their own models (``serve.experiment``: its rank and feedback routes beside
    the model's); ``model_path`` may then be None (the experiment's routes only).
    ``batch_rows``: the most table rows of concurrent requests scored in one model call
    (``serve.batch``); 0 scores each request on its own. ``worker``: a ``serve.workers.Worker``
    when this app is one of several worker processes (None: the only one)."""
    if model_path is None and experiment is None:
        raise ValueError("give a model directory, an experiment, or both")
    if max_in_flight < 1 or max_body < 1:
        raise ValueError("max_in_flight and max_body must be >= 1")
    if batch_rows < 0:
        raise ValueError("batch_rows must be >= 0 (0: no combining)")
    if admin_key is not None:
        check_admin_key(admin_key)
    fastapi = require("fastapi", "serve", "the HTTP service")

    from shopmtl.serve.features import KINDS, Features

    path = Path(model_path) if model_path is not None else None
    store = Features(features) if features is not None else None

    def on_call(requests: int, rows: int) -> None:  # a model call of the Scorer (once served)
        state.metrics.model_call(requests, rows)

    load = {"features": store, "batch_rows": batch_rows, "on_call": on_call}
    served = load_served(path, **load) if path is not None else no_model(experiment)
    model = served.model
    exp = Experiment(experiment) if experiment is not None else None
    exp_routes = [exp.path, FEEDBACK_PATH] if exp is not None else []
    routes = frozenset([*served.endpoints, *exp_routes, "/livez", "/readyz", "/metrics",
                        "/openapi.json", "/docs", RELOAD_PATH])
    metrics = ServeMetrics(served.version, served.kind,
                           worker.metrics_dir if worker is not None else None)
    state = ServeState(served, metrics, routes, max_in_flight, max_body,
                       admin_key=admin_key.encode() if admin_key is not None else None,
                       worker=worker.index if worker is not None else None)
    if exp is not None:
        exp.attach_metrics(state.metrics.registry, multiprocess=worker is not None)
    if store is not None:
        state.metrics.features(KINDS)
        store.on_miss = lambda kind, n: state.metrics.feature_misses.labels(kind).inc(n)

    @contextlib.asynccontextmanager
    async def lifespan(_app: Any) -> AsyncIterator[None]:
        if exp is not None:
            exp.start()
        threading.Thread(target=startup, daemon=True, name="shopmtl-warm-up").start()
        try:
            yield
        finally:  # after uvicorn answered the requests in flight: every event is written
            if exp is not None:
                exp.close()

    def startup() -> None:
        if exp is not None and not warm_experiment(exp, state):
            return
        reloader.startup()
        if worker is not None and state.ready.is_set():
            worker.serving(state.version)

    app = fastapi.FastAPI(
        title="shopmtl", version=served.version, lifespan=lifespan,
        description=(f"A shopmtl {model.kind} model ({', '.join(model.tasks)})" if model
                     is not None else f"Experiment {experiment.name}") + ". Every response "
        "carries X-Model-Version; every error is {\"error\": {\"code\", \"message\", "
        "\"fields\"}}; 429 with Retry-After when busy.")

    def swapped(new: Served) -> None:  # OpenAPI's info.version follows the served model
        app.version = new.version
        app.openapi_schema = None
        if worker is not None:
            worker.serving(new.version)

    reloader = Reloader(state, path, on_swap=swapped, load=load)
    errors = error_responses()
    for ep in served.endpoints.values():
        app.add_api_route(ep.path, handler(fastapi, ep, state), methods=["POST"],
                          summary=ep.summary, description=ep.description, tags=["model"],
                          responses=errors)
    if exp is not None:
        add_routes(fastapi, app, exp)
    _health_routes(fastapi, app, state)
    _admin_routes(fastapi, app, reloader, worker)
    _error_handlers(fastapi, app)
    app.add_middleware(Gate, state=state)
    app.state.serve = state
    app.state.reloader = reloader
    app.state.experiment = exp
    return app


def no_model(experiment: Any) -> Served:
    """The ``Served`` of an experiment-only service: no model, no model endpoints; its
    version (the X-Model-Version header) is the experiment config's short sha256."""
    version = "exp-" + hashlib.sha256(repr(experiment).encode()).hexdigest()[:12]
    return Served(None, None, version, {})


def warm_experiment(exp: Experiment, state: ServeState) -> bool:
    """Each arm's policy scores its model's example once before the service says ready; a
    failure keeps /readyz at 503 (False)."""
    try:
        exp.warm_up()
    except Exception as e:
        state.warm_error = f"experiment arm: {type(e).__name__}"
        log.error("experiment warm-up failed (%s); /readyz stays 503", type(e).__name__)
        return False
    log.info("experiment %s: %d arms warm (%s), events to %s", exp.cfg.name, len(exp.arms),
             ", ".join(f"{a} {s:g}" for a, s in exp.arms),
             exp.cfg.events.name if isinstance(exp.cfg.events, Path) else
             describe(exp.cfg.events) if exp.cfg.events is not None else
             "nowhere (events: none, a dry run: nothing is logged)")
    return True


def check_admin_key(key: str) -> None:
    """An admin key is at least ``MIN_ADMIN_KEY`` characters, printable ASCII without spaces
    (it travels in an HTTP header)."""
    if len(key) < MIN_ADMIN_KEY or not all(33 <= ord(c) < 127 for c in key):
        raise ValueError(f"the admin key must be at least {MIN_ADMIN_KEY} printable ASCII "
                         "characters without spaces (e.g. `openssl rand -hex 32`)")


def admin_key_from(key_file: str | Path | None) -> str | None:
    """``--admin-key-file`` (its content, surrounding whitespace stripped) or else the
    ``SHOPMTL_ADMIN_KEY`` environment variable; None when neither is set."""
    if key_file is not None:
        key = Path(key_file).read_text().strip()
    else:
        key = os.environ.get(ADMIN_KEY_ENV, "").strip()
        if not key:
            return None
    check_admin_key(key)
    return key


def error_responses() -> dict[int | str, dict[str, Any]]:
    """The error answers of a model path, for OpenAPI: the one error shape (FastAPI would
    otherwise publish its own 422 body, which this service never sends). 400 is a body that
    cannot be read as JSON text at all (bytes that are not UTF-8: FastAPI's own refusal);
    malformed JSON text is a 422."""
    from typing import Literal

    pd = require("pydantic", "serve", "the HTTP request models")
    detail = pd.create_model(
        "ErrorDetail", code=(Literal[tuple(sorted({*CODES.values(), STORE_DOWN}))], ...),
        message=(str, pd.Field(description="what is wrong, in words (never a request value)")),
        fields=(list[str], pd.Field(description="the places: body.rows.0.price, query.top_k")))
    body = pd.create_model("Error", error=(detail, ...))
    return {status: {"model": body, "description": f"`{code}`"}
            for status, code in CODES.items() if status in (400, 413, 422, 429, 503)}


def handler(fastapi: Any, ep: Endpoint, state: ServeState) -> Callable[..., Any]:
    """The route function of ``ep``'s path: its body model as the JSON body (with the
    contract's example in OpenAPI), the ``top_k``/``all_classes`` query options where it has
    labels. The answer comes from the request's ``Served`` (read by the gate when the request
    arrived: a reload meanwhile does not change it); a reload keeps the request schemas equal,
    so the body validated here is the one the served endpoint reads."""
    from starlette.requests import Request

    path = ep.path
    JSONResponse = fastapi.responses.JSONResponse

    def answer(request: Request, body: Any, top_k: int = 1, all_classes: bool = False
               ) -> dict[str, Any]:
        served = request.scope.get(SERVED_KEY) or state.current
        now = served.endpoints[path]
        options = {"top_k": top_k, "all_classes": all_classes} if now.max_top_k else {}
        # a Response passes FastAPI untouched: encoded once (the module docstring); the
        # annotation stays the dict, as OpenAPI describes it
        return JSONResponse(now.answer(body, **options))  # type: ignore[return-value]

    kw = inspect.Parameter.KEYWORD_ONLY
    params = [inspect.Parameter("request", kw, annotation=Request),
              inspect.Parameter("body", kw, annotation=ep.body,
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


def _admin_routes(fastapi: Any, app: Any, reloader: Reloader, worker: Any) -> None:
    """``POST /admin/reload``: the gate has checked the admin key; the reload runs in a
    worker thread (the event loop and the served model keep answering). With ``worker``
    (``serve.workers``), a reload that passed is published to the other workers and the
    answer waits until they serve it too (``workers``: total, told, serving the new one)."""
    from starlette.concurrency import run_in_threadpool

    JSONResponse = fastapi.responses.JSONResponse
    schema = {"type": "object", "additionalProperties": False, "properties": {"path": {
        "type": "string", "minLength": 1, "maxLength": MAX_PATH,
        "description": "the model directory to serve next, as the server's file system "
        "names it (default: the one the server was started with, read again)"}}}
    admin_errors = {
        401: {"description": "`unauthorized`: no or a wrong `Authorization: Bearer <key>`"},
        403: {"description": "`admin_disabled`: the server has no admin key"},
        409: {"description": "`reload_in_progress` (another reload is running) or "
              "`reload_incompatible` (other endpoints or request schemas: restart instead)"},
        422: {"description": "`reload_failed` (the model did not load: a missing directory, a "
              "file that fails the manifest; or it failed its warm-up) or `invalid_request`"}}

    async def reload(request: Any) -> Any:
        raw = await request.body()
        try:
            given = json.loads(raw) if raw.strip() else {}
        except ValueError:
            given = None
        path = given.get("path") if isinstance(given, dict) else None
        if (not isinstance(given, dict) or set(given) - {"path"}
                or (path is not None and not (isinstance(path, str) and 0 < len(path) <= MAX_PATH
                                              and "\0" not in path))):
            return JSONResponse(error_json(
                "invalid_request", f"the body is {{}} or {{\"path\": <a model directory, 1.."
                f"{MAX_PATH} characters>}}", ["body"]), status_code=422)
        try:
            if worker is None:
                old, new = await run_in_threadpool(reloader.reload, path, "admin")
            else:  # this worker's reload, then every other worker's (serve.workers)
                old, new, counts = await run_in_threadpool(worker.reload_all, reloader, path,
                                                            "admin")
        except ReloadError as e:
            return JSONResponse(error_json(e.code, e.message), status_code=e.status)
        request.scope[SERVED_KEY] = new  # this answer's X-Model-Version: the new model
        answer = {"status": "reloaded", "model_version": new.version,
                  "previous_version": old.version, "kind": new.kind}
        if worker is not None:
            answer["workers"] = counts
        return answer

    reload.__annotations__["request"] = fastapi.Request
    app.add_api_route(RELOAD_PATH, reload, methods=["POST"], tags=["admin"],
                      summary="Hot reload: serve another model directory",
                      description="Loads the model (its manifest's hashes checked), checks that "
                      "its endpoints and request schemas are the served ones, warms it up, "
                      "then swaps it in; the served model answers meanwhile and keeps serving "
                      "when the reload is refused. Needs `Authorization: Bearer <admin key>`.",
                      responses=admin_errors, openapi_extra={"requestBody": {
                          "required": False, "content": {"application/json": {"schema": schema}}}})


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

    from shopmtl.serve.features import FeatureStoreError

    @app.exception_handler(FeatureStoreError)
    async def store_down(_request: Any, exc: Any) -> Any:
        log.error("feature store: %s", exc)
        return JSONResponse(error_json(STORE_DOWN, str(exc)), status_code=503,
                            headers={"Retry-After": "1"})

    @app.exception_handler(DataError)
    async def refused(_request: Any, exc: Any) -> Any:
        message = str(exc)
        return JSONResponse(error_json("invalid_request", message, data_error_fields(message)),
                            status_code=422)


def run(model_path: str | Path | None, *, host: str = "127.0.0.1", port: int = 8000,
        max_in_flight: int = 8, max_body: int = MAX_BODY,
        admin_key_file: str | Path | None = None, features: str | Path | None = None,
        features_redis: str | None = None, experiment: str | Path | None = None,
        batch_rows: int = MAX_ROWS) -> None:
    """``shopmtl serve``: the app under uvicorn, one process (``--workers N``:
    ``serve.workers.run_workers``); SIGTERM stops accepting and lets
    in-flight requests finish (up to ``GRACEFUL_S``); SIGHUP reloads the model directory the
    server was started with (a hot reload, no key needed: whoever can signal the process
    runs it). The admin key: ``admin_key_from(admin_key_file)``. ``features``: a snapshot
    folder held in memory, or ``features_redis``: a Redis URL (``serve.features``).
    ``experiment``: an experiment config (``abtest.experiment``); SIGTERM then also writes
    every queued event and the counts to its store. ``batch_rows``: ``create_app``'s."""
    uvicorn = require("uvicorn", "serve", "shopmtl serve")
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from shopmtl.serve.features import open_store

    key = admin_key_from(admin_key_file)
    store = open_store(features, features_redis)
    if store is not None:
        log.info("feature store: %s (user columns %s; item columns %s)",
                 "snapshot in memory" if features is not None else "Redis",
                 ", ".join(store.spec.columns["user"]), ", ".join(store.spec.columns["item"]))
    exp_cfg = None
    if experiment is not None:
        from shopmtl.abtest.experiment import load_experiment

        exp_cfg = load_experiment(experiment)
    app = create_app(model_path, max_in_flight=max_in_flight, max_body=max_body,
                     admin_key=key, features=store, experiment=exp_cfg,
                     batch_rows=batch_rows)
    log.info("serving %s (model %s) on http://%s:%d; admin endpoints %s",
             model_path or "no model directory", app.state.serve.version, host, port,
             "on (admin key set)" if key else "disabled (no admin key)")
    if exp_cfg is not None:
        log.info("experiment %s on %s", exp_cfg.name, app.state.experiment.path)
    if hasattr(signal, "SIGHUP"):
        signal.signal(signal.SIGHUP, lambda _sig, _frame: sighup(app.state.reloader))
    uvicorn.run(app, host=host, port=port, access_log=False, server_header=False,
                timeout_graceful_shutdown=GRACEFUL_S, log_level="info")


def sighup(reloader: Reloader) -> None:
    """SIGHUP: reload the startup directory in a thread (a signal handler must not block the
    event loop); the outcome is logged and counted, as for ``POST /admin/reload``."""
    def work() -> None:
        with contextlib.suppress(ReloadError):  # logged and counted by the reloader
            reloader.reload(None, "SIGHUP")

    threading.Thread(target=work, daemon=True, name="shopmtl-reload").start()
