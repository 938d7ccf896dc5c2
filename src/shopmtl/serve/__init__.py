"""The HTTP service (``shopmtl serve MODEL_DIR``): a model directory's tasks as JSON endpoints.

- ``serve.app``: ``create_app`` (load the model, build the routes, warm-up, readiness, error
  handlers) and ``run`` (uvicorn);
- ``serve.endpoints``: the endpoints built from the model's contracts, answered through
  ``Model.predict`` (the one scoring path);
- ``serve.gate``: readiness, the in-flight and body bounds, the admin key, the version
  header, metrics, logs;
- ``serve.reload``: the served model and its hot reload (``POST /admin/reload``, SIGHUP);
- ``serve.errors``: the one error shape, never a request value;
- ``serve.metrics``: Prometheus metrics;
- ``serve.workers``: ``--workers N``: N worker processes under uvicorn's supervisor, their
  metrics shared, a reload published to every one.

An app layer (tests/test_layering.py): it imports the layers below and ``modeldir``; nothing
imports it but the CLI. Its optional packages (the ``serve`` extra) are imported where used,
so importing this package needs none of them.
"""

from __future__ import annotations

from typing import Any


def create_app(model_path: Any, **kw: Any) -> Any:
    """``serve.app.create_app``: the FastAPI app of a model directory."""
    from shopmtl.serve.app import create_app as build

    return build(model_path, **kw)


__all__ = ["create_app"]
