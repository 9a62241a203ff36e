"""The platform's own metrics (F-MON): every series, and ``/metrics`` on every component.

One registry per process (prometheus-client's default one, which also carries the
process collector: ``process_cpu_seconds_total``, ``process_resident_memory_bytes``,
``process_open_fds`` ...). Components that share a process (the many nodes of
``yun serve sim-nodes``, or a whole test cloud) share it: each series says which kind of
component recorded it in its ``component`` label, never which instance, so 10,000 sim
nodes make one set of series, not 10,000.

Every label takes values from a bounded set: a route *template* (``/api/v1/vms/{ref}``),
never a path; a flow kind and step name; an outcome. Never an id, a name or a secret.

HTTP: :func:`install_metrics` adds :class:`MetricsMiddleware` (per request: one counter
and one histogram observation, about 5 µs) and the ``GET /metrics`` route to an app.

The API the control server's code calls (each a prometheus-client object; ``labels()``
takes the label values in the order listed)::

    FLOW_SECONDS.labels(kind, outcome).observe(seconds)        # a flow ended
    FLOW_STEP_SECONDS.labels(kind, step, outcome).observe(s)   # a step ended
    FLOWS_RUNNING.labels(kind).inc() / .dec()                  # flows in this process
    DB_TRANSACTION_SECONDS.labels(mode).observe(seconds)       # mode: "read" | "write"
    JOURNAL_BATCH_SIZE.observe(entries)                        # journal rows in one write

or the context managers :func:`timed_flow` and :func:`timed_transaction`. Outcomes are
:data:`OUTCOMES` (``succeeded``, ``failed``, ``rolled_back``, ``cancelled``, ``error``).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Iterator, MutableMapping
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, Counter, Gauge, Histogram
from prometheus_client.exposition import generate_latest

if TYPE_CHECKING:
    from fastapi import FastAPI

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

#: The ``outcome`` values of the flow and step series.
OUTCOMES = ("succeeded", "failed", "rolled_back", "cancelled", "error")

# Latency buckets from 1 ms (an in-memory answer) to 60 s (a task waited on).
_REQUEST_BUCKETS = (.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60)
# Flows and steps: a sim step takes milliseconds, a real VM start tens of seconds.
_FLOW_BUCKETS = (.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900)
_DB_BUCKETS = (.0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5)
_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)

# --- HTTP (every component) ------------------------------------------------------------

HTTP_REQUESTS = Counter(
    "yun_http_requests", "HTTP requests answered, by route template and status",
    ["component", "method", "route", "status"])
HTTP_SECONDS = Histogram(
    "yun_http_request_duration_seconds",
    "Time from a request's arrival to the end of its answer, by route template",
    ["component", "method", "route"], buckets=_REQUEST_BUCKETS)

# --- Control server: flows and database (called from the flow engine and DB session) ----

FLOW_SECONDS = Histogram(
    "yun_flow_duration_seconds", "Duration of a flow (task) from start to its end",
    ["kind", "outcome"], buckets=_FLOW_BUCKETS)
FLOW_STEP_SECONDS = Histogram(
    "yun_flow_step_duration_seconds", "Duration of one step of a flow (forward or undo)",
    ["kind", "step", "outcome"], buckets=_FLOW_BUCKETS)
FLOWS_RUNNING = Gauge(
    "yun_flows_running", "Flows being run by this process now", ["kind"])
DB_TRANSACTION_SECONDS = Histogram(
    "yun_db_transaction_seconds", "Duration of a database transaction, begin to commit",
    ["mode"], buckets=_DB_BUCKETS)
JOURNAL_BATCH_SIZE = Histogram(
    "yun_journal_batch_size", "Flow journal entries written in one database write",
    buckets=_SIZE_BUCKETS)

# --- Control server: placement, queues, node reports -----------------------------------

PLACEMENT_SECONDS = Histogram(
    "yun_placement_duration_seconds",
    "Time from a VM's request entering placement to its answer (queue wait included)",
    ["outcome"], buckets=(*_DB_BUCKETS, 10, 30))
PLACEMENT_BATCH_SIZE = Histogram(
    "yun_placement_batch_size", "VMs placed in one placement transaction",
    buckets=_SIZE_BUCKETS)
QUEUE_KEYS = Gauge(
    "yun_queue_keys", "Resources with an operation running or waiting (per-resource queues)",
    ["queue"])
QUEUE_WAITERS = Gauge(
    "yun_queue_waiters", "Operations waiting for their resource's turn (behind another)",
    ["queue"])
NODE_REPORT_SECONDS = Histogram(
    "yun_node_report_duration_seconds", "Control-server time spent handling one node report",
    ["outcome"], buckets=_DB_BUCKETS)
NODE_REPORT_GAP_SECONDS = Histogram(
    "yun_node_report_gap_seconds",
    "Time between two reports of the same node handled by this control server (the "
    "report interval plus lag: growth beyond the interval is reports falling behind)",
    buckets=(.5, 1, 2, 5, 10, 15, 20, 30, 45, 60, 120, 300))

# --- Process (every component) ---------------------------------------------------------

GC_SECONDS = Counter(
    "yun_gc_seconds", "CPU time spent in the cyclic garbage collector, by generation "
    "collected (prometheus-client's python_gc_* series count collections, not their time)",
    ["generation"])
_gc_started: list[float] = []


def _time_collections(phase: str, info: dict[str, int]) -> None:
    if phase == "start":
        _gc_started[:] = [time.process_time()]
    elif _gc_started:
        GC_SECONDS.labels(str(info["generation"])).inc(time.process_time() - _gc_started[0])


def watch_collector() -> None:
    """Record the collector's time in :data:`GC_SECONDS` (once per process)."""
    import gc
    if _time_collections not in gc.callbacks:
        gc.callbacks.append(_time_collections)


# --- Gateway ----------------------------------------------------------------------------

UPSTREAM_SECONDS = Histogram(
    "yun_gateway_upstream_duration_seconds",
    "Time of one forwarded call to a control server, by internal route template",
    ["method", "route", "status"], buckets=_REQUEST_BUCKETS)


@contextmanager
def timed_flow(kind: str) -> Iterator[dict[str, str]]:
    """Count a flow of ``kind`` as running for the block and observe its duration.

    The block sets ``outcome`` in the yielded dict (default ``error``: the block raised)::

        with timed_flow("vm.create") as flow:
            ...
            flow["outcome"] = "succeeded"
    """
    result = {"outcome": "error"}
    running = FLOWS_RUNNING.labels(kind)
    running.inc()
    start = time.perf_counter()
    try:
        yield result
    finally:
        running.dec()
        FLOW_SECONDS.labels(kind, result["outcome"]).observe(time.perf_counter() - start)


@contextmanager
def timed_transaction(mode: str) -> Iterator[None]:
    """Observe the block's duration as one database transaction (``read`` or ``write``)."""
    start = time.perf_counter()
    try:
        yield
    finally:
        DB_TRANSACTION_SECONDS.labels(mode).observe(time.perf_counter() - start)


class ReportGaps:
    """When each node last reported to this control server, and the gap before that.

    Each report observes the gap since the node's previous one; at scrape time the
    nodes are counted as reporting (last report within :data:`SILENT_AFTER_GAPS` of
    their own gaps, at least :data:`SILENT_AFTER_MIN` s: the rule by which the control
    server marks a node down) or silent. A node silent for :data:`FORGET_AFTER` s is
    forgotten (removed, or reporting to another control server now). Memory: two floats
    per node; a count walks them all (about 1 ms per 10,000 nodes, once per scrape).
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._last: dict[str, tuple[float, float]] = {}  # node -> (last report, gap)

    def seen(self, node_id: str) -> None:
        """A report of ``node_id`` arrived now: observe the gap since its previous one."""
        now = self._clock()
        previous = self._last.get(node_id)
        gap = 0.0
        if previous is not None:
            gap = now - previous[0]
            NODE_REPORT_GAP_SECONDS.observe(gap)
        self._last[node_id] = (now, gap)

    def counts(self) -> tuple[int, int]:
        """(nodes reporting, nodes silent) now."""
        now = self._clock()
        reporting = silent = 0
        forgotten = []
        for node_id, (last, gap) in self._last.items():
            age = now - last
            if age <= max(SILENT_AFTER_MIN, SILENT_AFTER_GAPS * gap):
                reporting += 1
            elif age > FORGET_AFTER:
                forgotten.append(node_id)
            else:
                silent += 1
        for node_id in forgotten:
            del self._last[node_id]
        return reporting, silent


#: Silent after this many of its own report gaps (and at least SILENT_AFTER_MIN s), as
#: the control server's liveness rule (DOWN_AFTER_REPORTS, DOWN_AFTER_MIN).
SILENT_AFTER_GAPS = 6
SILENT_AFTER_MIN = 6.0
FORGET_AFTER = 3600.0

#: The control server's tracker (one per process: gaps of a node are per process too).
REPORT_GAPS = ReportGaps()
NODES_REPORTING = Gauge(
    "yun_nodes_reporting",
    "Nodes whose reports reach this control server (0 on other components)")
NODES_SILENT = Gauge(
    "yun_nodes_silent",
    "Nodes that reported to this control server and then fell silent for longer than "
    "6 of their report intervals (forgotten after an hour)")
NODES_REPORTING.set_function(lambda: REPORT_GAPS.counts()[0])
NODES_SILENT.set_function(lambda: REPORT_GAPS.counts()[1])

# --- HTTP middleware and /metrics --------------------------------------------------------

_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
UNMATCHED = "unmatched"


class MetricsMiddleware:
    """Pure ASGI middleware counting each HTTP request by route template and status.

    The route is the template of the route that handled the request (Starlette puts it
    in ``scope["route"]`` when routing), so ``/api/v1/vms/web-1`` counts as
    ``/api/v1/vms/{ref}``; a request no route matched counts as ``unmatched``. A request
    whose handler raised (answered 500 by the outermost error handler) counts as 500.
    """

    def __init__(self, app: ASGIApp, component: str) -> None:
        self.app = app
        self.component = component
        # (method, route, status) -> the two label children: labels() takes a lock and
        # builds a tuple on each call; this dict lookup is what keeps the cost per
        # request at a few microseconds.
        self._children: dict[tuple[str, str, int], tuple[Any, Any]] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500
        start = time.perf_counter()

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            elapsed = time.perf_counter() - start
            route = scope.get("route")
            template = getattr(route, "path", None) or UNMATCHED
            method = scope["method"]
            if method not in _METHODS:  # bounded: also the cache's keys
                method = "OTHER"
            key = (method, template, status)
            children = self._children.get(key)
            if children is None:
                children = self._child(key)
            children[0].inc()
            children[1].observe(elapsed)

    def _child(self, key: tuple[str, str, int]) -> tuple[Any, Any]:
        method, template, status = key
        children = (HTTP_REQUESTS.labels(self.component, method, template, str(status)),
                    HTTP_SECONDS.labels(self.component, method, template))
        self._children[key] = children
        return children


def render() -> tuple[bytes, str]:
    """The process's metrics in the Prometheus text format, and its content type."""
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST


def install_metrics(app: FastAPI, component: str, *, expose: bool = True) -> None:
    """Record ``app``'s requests under ``component`` and serve ``GET /metrics``.

    Call it last in the app factory, so the middleware is the outermost one (it then
    also counts what other middleware refused, e.g. 429). ``expose`` False adds neither
    (a listener where the figures must not be shown).

    ``/metrics`` needs no signed request (a scraper is no domain member), like
    ``/healthz``; on internal ports the TLS handshake still requires a client
    certificate of the domain CA (see docs/OPERATIONS.md, "Metrics").
    """
    if not expose:
        return
    from starlette.requests import Request
    from starlette.responses import Response

    async def metrics(request: Request) -> Response:
        body, content_type = render()
        return Response(body, media_type=content_type)

    app.add_route("/metrics", metrics, methods=["GET"], include_in_schema=False)
    app.add_middleware(MetricsMiddleware, component=component)
