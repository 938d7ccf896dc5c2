"""The service's Prometheus metrics (``/metrics``), in a registry of its own.

A registry per app (not prometheus_client's global one) so that two apps in one process, as a
test builds them, never collide. ``endpoint`` is a route's path or ``other``: a raw path could
carry client text and would grow the label set without bound.

With ``--workers N`` (``serve.workers``) every worker process writes its metrics into the
supervisor's private ``PROMETHEUS_MULTIPROC_DIR`` and ``/metrics`` renders the whole service
from those files (``MultiProcessCollector``): counters and histograms are summed over the
workers (the dead ones' counts included, so a restart loses none); the in-flight and ready
gauges are summed over the live workers (``livesum``: ``shopmtl_ready`` is then the number of
ready workers); the served model, an Info metric that multiprocess mode cannot hold, becomes
the gauge ``shopmtl_model_info{version, kind}``: the number of live workers serving it (the
same sample name and labels as the Info's, so a query reads both).
"""

from __future__ import annotations

from shopmtl.deps import require

# seconds: from a cached single-row answer to a 1,000-candidate list under load
# shopmtl_reloads_total{outcome}: the outcomes of a hot reload (serve.reload)
OUTCOMES = ("ok", "failed", "incompatible", "busy")
CALL_BUCKETS = (1, 2, 4, 8, 16, 32, 64)  # requests of one model call
BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class ServeMetrics:
    """Requests by endpoint and status code, latency by endpoint, requests in flight,
    readiness, the served model (``shopmtl_model_info{version, kind}``, changed by a hot
    reload's swap), the reloads by outcome (``OUTCOMES``), the requests and rows of each model
call of table rows (``serve.batch``) and the feature store's misses
    (``shopmtl_feature_misses_total{kind}``, ``serve.features``)."""

    def __init__(self, version: str, kind: str, multiprocess_dir: str | None = None) -> None:
        pc = require("prometheus_client", "serve", "the /metrics endpoint")
        self._pc = pc
        # the workers' shared files (serve.workers), or None: this process's registry alone
        self.multiprocess_dir = multiprocess_dir
        live = {"multiprocess_mode": "livesum"} if multiprocess_dir is not None else {}
        self.registry = pc.CollectorRegistry(auto_describe=True)
        self.requests = pc.Counter("shopmtl_http_requests", "HTTP requests answered, by "
                                   "endpoint and status code", ["endpoint", "code"],
                                   registry=self.registry)
        self.latency = pc.Histogram("shopmtl_http_request_duration_seconds", "Time from a "
                                    "request's arrival to its answer, by endpoint",
                                    ["endpoint"], buckets=BUCKETS, registry=self.registry)
        self.in_flight = pc.Gauge("shopmtl_http_in_flight", "Model requests being answered "
                                  "(bounded by --max-in-flight)", registry=self.registry, **live)
        self.ready = pc.Gauge("shopmtl_ready", "1 once the model answered its warm-up",
                              registry=self.registry, **live)
        if multiprocess_dir is None:
            self._info = pc.Info("shopmtl_model", "The served model: its manifest's short "
                                 "sha256 and kind", registry=self.registry)
        else:
            self._info = pc.Gauge("shopmtl_model_info", "The served model: its manifest's "
                                  "short sha256 and kind; the number of workers serving it",
                                  ["version", "kind"], registry=self.registry, **live)
        self._served: tuple[str, str] | None = None
        self.model(version, kind)
        self.reloads = pc.Counter("shopmtl_reloads", "Hot reloads (POST /admin/reload, "
                                  "SIGHUP) by outcome: ok, failed (the model did not load or "
                                  "failed its warm-up), incompatible (other endpoints or "
                                  "request schemas), busy (another reload was running)",
                                  ["outcome"], registry=self.registry)
        for outcome in OUTCOMES:
            self.reloads.labels(outcome)
        self.call_requests = pc.Histogram(
            "shopmtl_model_call_requests", "Requests answered by one model call: more than 1 "
            "when the table rows of concurrent requests were combined (serve.batch)",
            buckets=CALL_BUCKETS, registry=self.registry)
        self.call_rows = pc.Counter("shopmtl_model_call_rows", "Table rows scored by model "
                                    "calls", registry=self.registry)
        self.feature_misses = pc.Counter(
            "shopmtl_feature_misses", "Ids the feature store lacked (their user or item "
            "columns left empty: the unknown row), by kind; each distinct id of a request "
            "once", ["kind"], registry=self.registry)

    def features(self, kinds: tuple[str, ...]) -> None:
        """A feature store is configured: its miss counters start at 0."""
        for kind in kinds:
            self.feature_misses.labels(kind)

    def model(self, version: str, kind: str) -> None:
        """The served model's info (replaced, not added to, by a reload)."""
        if self.multiprocess_dir is None:
            self._info.info({"version": version, "kind": kind})
            return
        if self._served is not None and self._served != (version, kind):
            self._info.labels(*self._served).set(0)  # this worker serves it no more
        self._info.labels(version, kind).set(1)
        self._served = (version, kind)

    def model_call(self, requests: int, rows: int) -> None:
        self.call_requests.observe(requests)
        self.call_rows.inc(rows)

    def observe(self, endpoint: str, status: int, seconds: float) -> None:
        self.requests.labels(endpoint, str(status)).inc()
        self.latency.labels(endpoint).observe(seconds)

    def render(self) -> tuple[bytes, str]:
        """The text exposition format and its content type (every worker's, with workers)."""
        if self.multiprocess_dir is None:
            return self._pc.generate_latest(self.registry), self._pc.CONTENT_TYPE_LATEST
        from prometheus_client.multiprocess import MultiProcessCollector

        registry = self._pc.CollectorRegistry()
        MultiProcessCollector(registry, self.multiprocess_dir)
        return self._pc.generate_latest(registry), self._pc.CONTENT_TYPE_LATEST

    def __repr__(self) -> str:
        return f"<ServeMetrics {self.registry!r}>"
