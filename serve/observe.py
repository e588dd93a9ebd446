"""What an operator watches: Prometheus metrics, request ids in headers and log lines, JSON logs.

- ``Metrics``: one ``prometheus_client`` registry per API app, served at ``GET /metrics`` (no key: scrape
  it from inside the cluster). Requests by route and HTTP code, 429s, time to first token and the gaps
  between streamed chunks (inter-token latency), prompt and output tokens, requests in flight, all
  labelled by tenant and adapter (``tenant/persona`` or ``base``: versions are not labels, so series do
  not grow with every registration). At each scrape the engine's own state is read from the backend
  (``stats()``): queue depth, running rows, free rows, adapters resident, and the adapter tiers' hits,
  loads (misses), evictions and load latency. Behind Ray Serve that is one replica's view per scrape.
- ``RequestIds``: ASGI middleware. ``X-Request-Id`` from the client is kept (a new one otherwise), sent
  back, and set in a context variable that a log-record factory writes into every record of that
  request (``%(request_id)s``; threads the request starts copy it). Behind Ray Serve the proxy already
  keeps or makes the id and sends it back; the app reads the same header and only logs it, and the
  engine replicas log Serve's request id, which is the same one.
- ``install_log_context(json_lines)``: a server process's ``adapterfab`` log lines with their request
  id, as text or one JSON object per line (time, level, logger, message, request_id, exception):
  ``ServeConfig.json_logs``.
"""

from __future__ import annotations

import contextvars
import json
import logging
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

REQUEST_ID_HEADER = "x-request-id"
MAX_REQUEST_ID = 128  # a longer client id is cut, so nobody fills the logs through it
request_id: contextvars.ContextVar[str] = contextvars.ContextVar("adapterfab_request_id", default="-")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s"
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_TIER_COUNTERS = {"device_hits": "hit", "cpu_hits": "hit", "disk_hits": "hit", "device_loads": "load",
                  "store_loads": "load", "device_evictions": "eviction", "cpu_evictions": "eviction"}


class RequestIds:
    """ASGI middleware: the request's id from ``X-Request-Id`` (or a new one), in the context variable
    ``request_id`` for the request's log lines, and sent back when ``echo``."""

    def __init__(self, app: Any, echo: bool = True):
        self.app, self.echo = app, echo

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = dict(scope.get("headers") or []).get(REQUEST_ID_HEADER.encode(), b"").decode("latin-1")
        rid = "".join(c for c in given if c.isprintable())[:MAX_REQUEST_ID] or uuid.uuid4().hex
        token = request_id.set(rid)

        async def send_with_id(message: dict) -> None:
            if message["type"] == "http.response.start" and self.echo:
                message["headers"] = [*message.get("headers", []), (b"x-request-id", rid.encode("latin-1"))]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            request_id.reset(token)


def current_request_id() -> str:
    """The id of the request this code serves: ours (the API's middleware), else Ray Serve's (a replica
    the ingress called: Serve carries the proxy's id along handle calls), else ``-``."""
    rid = request_id.get()
    if rid == "-":
        serve_context = sys.modules.get("ray.serve.context")
        if serve_context is not None:
            try:
                rid = serve_context._get_serve_request_context().request_id or "-"
            except Exception:  # noqa: BLE001 - a private API of Serve's: without it, no id
                pass
    return rid


def install_record_factory() -> None:
    """Every record of the ``adapterfab`` loggers (through any handler) gets ``request_id``; idempotent.
    Other loggers' records are left alone: libraries pass ``extra={"request_id": ...}`` of their own
    (Ray Serve does), and logging refuses an extra that would overwrite an attribute."""
    old = logging.getLogRecordFactory()
    if getattr(old, "_adapterfab", False):
        return

    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = old(*args, **kwargs)
        if record.name == "adapterfab" or record.name.startswith("adapterfab."):
            record.request_id = current_request_id()
        return record

    factory._adapterfab = True  # type: ignore[attr-defined]
    logging.setLogRecordFactory(factory)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {"time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}",
               "level": record.levelname, "logger": record.name, "message": record.getMessage(),
               "request_id": getattr(record, "request_id", None) or current_request_id()}
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)


def install_log_context(json_lines: bool = False, logger: str = "adapterfab", stream: Any = None) -> None:
    """In a server process: ``logger``'s records through one handler of ours, each with its request id,
    as text (``time level name [request_id] message``) or JSON lines. Idempotent."""
    install_record_factory()
    log = logging.getLogger(logger)
    handler = next((h for h in log.handlers if getattr(h, "_adapterfab", False)), None)
    if handler is None:
        handler = logging.StreamHandler(stream)
        handler._adapterfab = True  # type: ignore[attr-defined]
        log.addHandler(handler)
        log.propagate = False  # once, not again through the root logger's handler
        if log.level == logging.NOTSET:
            log.setLevel(logging.INFO)
    handler.setFormatter(JsonFormatter() if json_lines else logging.Formatter(TEXT_FORMAT))


class CountRequests:
    """ASGI middleware: every response counted by route and status code, with the tenant and adapter
    the handler put in ``request.state`` (``-`` before authentication)."""

    def __init__(self, app: Any, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = [500]

        async def send_status(message: dict) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            state = scope.get("state") or {}
            self.metrics.requests.labels(state.get("tenant", "-"), state.get("adapter", "-"),
                                         state.get("route", "other"), str(status[0])).inc()


class _EngineCollector:
    """The engine's and tiers' numbers of the last ``stats()`` read, as Prometheus families."""

    def __init__(self) -> None:
        self.stats: dict[str, Any] = {}

    def collect(self) -> Iterable[Any]:
        batching = self.stats.get("batching") or {}
        for key, name, doc in (("waiting", "queue_depth", "requests waiting for a batch row"),
                               ("running", "running_rows", "requests decoding now"),
                               ("free_rows", "free_rows", "batch rows free")):
            if key in batching:
                g = GaugeMetricFamily(f"adapterfab_engine_{name}", doc)
                g.add_metric([], float(batching[key]))
                yield g
        tiers = self.stats.get("tiers") or {}
        if not tiers:
            return
        c = CounterMetricFamily("adapterfab_tier_events", "adapter tier hits, loads (misses) and evictions",
                                labels=["tier", "event"])
        for key, event in _TIER_COUNTERS.items():
            if key in tiers:
                c.add_metric([key.split("_")[0], event], float(tiers[key]))
        yield c
        g = GaugeMetricFamily("adapterfab_tier_resident", "adapters resident per tier", labels=["tier"])
        for tier in ("device", "cpu"):
            g.add_metric([tier], float(tiers.get(f"{tier}_resident", 0)))
        yield g
        lat = GaugeMetricFamily("adapterfab_tier_load_seconds", "adapter load latency (last 1,000 loads)",
                                labels=["quantile"])
        for q in ("p50", "p99"):
            if tiers.get(f"load_{q}_s") is not None:
                lat.add_metric([q], float(tiers[f"load_{q}_s"]))
        yield lat


class Metrics:
    """The API's metrics; ``render()`` reads the engine's stats (when the backend has ``stats``) first."""

    def __init__(self, stats: Callable[[], Awaitable[dict[str, Any]]] | None = None):
        self.registry = CollectorRegistry()
        r = self.registry
        who = ["tenant", "adapter"]
        self.requests = Counter("adapterfab_requests", "API requests by route and HTTP status code",
                                ["tenant", "adapter", "route", "code"], registry=r)
        self.rate_limited = Counter("adapterfab_rate_limited", "requests refused with 429", ["tenant"], registry=r)
        self.ttft = Histogram("adapterfab_time_to_first_token_seconds", "request arrival to its first text",
                              who, buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("adapterfab_inter_token_latency_seconds", "gap between a stream's text chunks",
                             who, buckets=LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("adapterfab_request_seconds", "request arrival to its last token", who,
                             buckets=LATENCY_BUCKETS, registry=r)
        self.output_tokens = Counter("adapterfab_output_tokens", "tokens generated", who, registry=r)
        self.prompt_tokens = Counter("adapterfab_prompt_tokens", "prompt tokens read", who, registry=r)
        self.stream_errors = Counter("adapterfab_stream_errors", "errors sent in-band after a stream began",
                                     ["tenant", "adapter", "code"], registry=r)
        self.in_flight = Gauge("adapterfab_requests_in_flight", "generation requests being answered", who,
                               registry=r)
        self._engine = _EngineCollector()
        r.register(self._engine)
        self._stats = stats

    async def render(self) -> bytes:
        if self._stats is not None:
            try:
                self._engine.stats = await self._stats()
            except Exception:  # noqa: BLE001 - the API's own metrics still answer
                logging.getLogger("adapterfab.serve.api").warning("engine stats unavailable", exc_info=True)
                self._engine.stats = {}
        return generate_latest(self.registry)

    def watch(self, tenant: str, adapter: str, t0: float, replayable: bool = False) -> Watch:
        return Watch(self, tenant, adapter, t0, replayable)


class Watch:
    """One generation request's timing: first text, the gaps between chunks, tokens, the end.
    ``replayable``: a request whose attempts may be thrown away (``replayed``: its replica died before
    anything reached the client) records its first text's time only when it has answered, so that it
    counts the attempt that answered, once."""

    def __init__(self, m: Metrics, tenant: str, adapter: str, t0: float, replayable: bool = False):
        self.m, self.labels, self.t0, self.replayable = m, (tenant, adapter), t0, replayable
        self.last: float | None = None
        self.first: float | None = None  # a replayable request's first text, recorded when it ends
        m.in_flight.labels(*self.labels).inc()
        self.open = True

    def text(self) -> None:
        now = time.monotonic()
        if self.last is None:
            if self.replayable:
                self.first = now
            else:
                self.m.ttft.labels(*self.labels).observe(now - self.t0)
        else:
            self.m.itl.labels(*self.labels).observe(now - self.last)
        self.last = now

    def replayed(self) -> None:
        """The attempt so far is thrown away and the request generated again: the next text is its first."""
        self.first = self.last = None

    def done(self, prompt_tokens: int, output_tokens: int) -> None:
        self.m.prompt_tokens.labels(*self.labels).inc(prompt_tokens)
        self.m.output_tokens.labels(*self.labels).inc(output_tokens)
        self.close(ok=True)

    def failed(self, code: int) -> None:
        self.m.stream_errors.labels(*self.labels, str(code)).inc()

    def close(self, ok: bool = False) -> None:
        if self.open:
            self.open = False
            self.m.in_flight.labels(*self.labels).dec()
            if ok and self.first is not None:  # a replayable request that failed answered nothing
                self.m.ttft.labels(*self.labels).observe(self.first - self.t0)
            if ok:
                self.m.e2e.labels(*self.labels).observe(time.monotonic() - self.t0)
