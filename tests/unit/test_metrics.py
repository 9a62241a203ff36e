"""The metrics middleware and series (yun.util.metrics): labels by route template, bounded."""

from __future__ import annotations

import asyncio
import itertools

import httpx
import pytest
from fastapi import APIRouter, FastAPI, HTTPException
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from yun.util import metrics
from yun.util.metrics import install_metrics
from yun.util.queues import KeyedQueues

_names = itertools.count()


def _component() -> str:
    """A component label of its own per test: the registry is the process's."""
    return f"unit-{next(_names)}"


def _app(component: str, *, expose: bool = True) -> FastAPI:
    app = FastAPI()
    router = APIRouter(prefix="/api/v1")

    @router.get("/vms/{ref}")
    async def vm(ref: str) -> dict[str, str]:
        if ref == "taken":
            raise HTTPException(409, "taken")
        if ref == "broken":
            raise RuntimeError("handler bug")
        return {"ref": ref}

    app.include_router(router)
    install_metrics(app, component, expose=expose)
    return app


def _count(component: str, method: str, route: str, status: str) -> float:
    value = REGISTRY.get_sample_value("yun_http_requests_total", {
        "component": component, "method": method, "route": route, "status": status})
    return value or 0.0


def _client(app: FastAPI) -> httpx.AsyncClient:
    # raise_app_exceptions off: a handler's bug is answered 500 as uvicorn would.
    return httpx.AsyncClient(transport=httpx.ASGITransport(app, raise_app_exceptions=False),
                             base_url="http://test")


async def test_requests_are_counted_by_route_template_and_status() -> None:
    component = _component()
    async with _client(_app(component)) as client:
        for ref in ("web-1", "web-2", "taken", "broken"):
            await client.get(f"/api/v1/vms/{ref}")
        await client.post("/api/v1/vms/web-1")  # 405: the route matched, not the method
    route = "/api/v1/vms/{ref}"
    assert _count(component, "GET", route, "200") == 2
    assert _count(component, "GET", route, "409") == 1
    assert _count(component, "GET", route, "500") == 1
    assert _count(component, "POST", route, "405") == 1
    # Never the raw path.
    assert _count(component, "GET", "/api/v1/vms/web-1", "200") == 0
    histogram_count = REGISTRY.get_sample_value("yun_http_request_duration_seconds_count", {
        "component": component, "method": "GET", "route": route})
    assert histogram_count == 4


async def test_unmatched_paths_and_odd_methods_share_one_label() -> None:
    component = _component()
    async with _client(_app(component)) as client:
        for path in ("/nope", "/api/v1/vms/web-1/extra", "/x/y/z"):
            assert (await client.get(path)).status_code == 404
        await client.request("BREW", "/api/v1/vms/web-1")
    assert _count(component, "GET", "unmatched", "404") == 3
    samples = [s for m in REGISTRY.collect() if m.name == "yun_http_requests"
               for s in m.samples if s.labels.get("component") == component]
    assert {s.labels["method"] for s in samples} <= {"GET", "OTHER"}
    assert {s.labels["route"] for s in samples} == {"unmatched", "/api/v1/vms/{ref}"}


async def test_metrics_route_serves_the_text_format_with_process_figures() -> None:
    component = _component()
    async with _client(_app(component)) as client:
        await client.get("/api/v1/vms/a")
        resp = await client.get("/metrics")
    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith("text/plain")
    families = {f.name: f for f in text_string_to_metric_families(resp.text)}
    for name in ("yun_http_requests", "yun_http_request_duration_seconds",
                 "process_cpu_seconds", "process_resident_memory_bytes",
                 "yun_flow_duration_seconds", "yun_db_transaction_seconds"):
        assert name in families, name
    rss = next(s.value for s in families["process_resident_memory_bytes"].samples)
    assert rss > 10 * 1024 * 1024
    mine = [s for s in families["yun_http_requests"].samples
            if s.labels.get("component") == component]
    assert any(s.labels["route"] == "/api/v1/vms/{ref}" and s.value == 1 for s in mine)


async def test_expose_off_serves_no_metrics_and_records_nothing() -> None:
    component = _component()
    async with _client(_app(component, expose=False)) as client:
        await client.get("/api/v1/vms/a")
        assert (await client.get("/metrics")).status_code == 404
    assert _count(component, "GET", "/api/v1/vms/{ref}", "200") == 0


def test_timed_flow_observes_outcome_and_running_count() -> None:
    kind = f"unit.flow.{next(_names)}"
    with metrics.timed_flow(kind) as flow:
        assert REGISTRY.get_sample_value("yun_flows_running", {"kind": kind}) == 1
        flow["outcome"] = "succeeded"
    with pytest.raises(ValueError), metrics.timed_flow(kind):
        raise ValueError("step failed")
    assert REGISTRY.get_sample_value("yun_flows_running", {"kind": kind}) == 0
    for outcome in ("succeeded", "error"):
        assert REGISTRY.get_sample_value("yun_flow_duration_seconds_count",
                                         {"kind": kind, "outcome": outcome}) == 1


def _depth(name: str) -> tuple[float | None, float | None]:
    return (REGISTRY.get_sample_value("yun_queue_keys", {"queue": name}),
            REGISTRY.get_sample_value("yun_queue_waiters", {"queue": name}))


async def test_keyed_queue_depth_follows_holders_and_waiters() -> None:
    name = f"unit-queue-{next(_names)}"
    queues = KeyedQueues(name)
    release = asyncio.Event()
    entered: list[str] = []

    async def use(key: str, tag: str) -> None:
        async with queues.hold(key):
            entered.append(tag)
            await release.wait()

    first = asyncio.create_task(use("vm-a", "a1"))
    second = asyncio.create_task(use("vm-a", "a2"))
    third = asyncio.create_task(use("vm-b", "b1"))
    cancelled = asyncio.create_task(use("vm-a", "a3"))
    await asyncio.sleep(0.01)
    assert _depth(name) == (2, 2)  # two keys; a2 and a3 wait behind a1
    cancelled.cancel()
    await asyncio.gather(cancelled, return_exceptions=True)
    assert _depth(name) == (2, 1)  # a cancelled waiter no longer counts
    release.set()
    await asyncio.gather(first, second, third)
    assert entered == ["a1", "b1", "a2"]
    assert _depth(name) == (0, 0)
    assert queues.keys() == []


def test_report_gaps_observe_time_between_reports_and_count_silent_nodes() -> None:
    now = [1000.0]
    gaps = metrics.ReportGaps(clock=lambda: now[0])
    before = REGISTRY.get_sample_value("yun_node_report_gap_seconds_count") or 0
    gaps.seen("node-a")  # a first report has no gap
    gaps.seen("node-b")
    now[0] += 10
    gaps.seen("node-a")
    gaps.seen("node-b")
    assert REGISTRY.get_sample_value("yun_node_report_gap_seconds_count") == before + 2
    assert gaps.counts() == (2, 0)
    now[0] += 59  # within 6 gaps of 10 s
    gaps.seen("node-b")
    assert gaps.counts() == (2, 0)
    now[0] += 2  # node-a: 61 s since its last report
    assert gaps.counts() == (1, 1)
    now[0] += metrics.FORGET_AFTER  # both silent an hour: forgotten
    assert gaps.counts() == (0, 0)
    gaps.seen("node-c")  # a first report, no gap known yet: the minimum applies
    now[0] += metrics.SILENT_AFTER_MIN + 1
    assert gaps.counts() == (0, 1)


def test_nodes_reporting_gauge_reads_the_process_tracker() -> None:
    node = f"unit-node-{next(_names)}"
    before = REGISTRY.get_sample_value("yun_nodes_reporting") or 0
    metrics.REPORT_GAPS.seen(node)
    assert REGISTRY.get_sample_value("yun_nodes_reporting") == before + 1


async def test_router_app_serves_metrics_without_a_signed_request() -> None:
    # The intelligent router is not part of SimCluster: its app alone.
    from yun.proto.auth import Verifier
    from yun.router.api import create_router_app

    async def on_notice(notice: object) -> None:
        raise AssertionError("no notice is sent here")

    app = create_router_app(Verifier(lambda: ["router"]), on_notice, lambda: {})
    async with _client(app) as client:
        assert (await client.get("/healthz")).status_code == 200
        # A signed route refuses an unsigned call, and is still counted by its template.
        assert (await client.post("/internal/v1/notice", json={})).status_code == 401
        resp = await client.get("/metrics")
    assert resp.status_code == 200
    families = {f.name: f for f in text_string_to_metric_families(resp.text)}
    samples = [s for s in families["yun_http_requests"].samples
               if s.labels.get("component") == "router"]
    assert {(s.labels["route"], s.labels["status"]) for s in samples} >= {
        ("/healthz", "200"), ("/internal/v1/notice", "401")}


async def test_gateway_serves_metrics_only_when_exposed() -> None:
    from tests.unit.test_gateway_harness import make_gateway

    hidden = make_gateway()
    async with hidden.http:
        assert (await hidden.http.get("/metrics")).status_code == 404

    # A burst of two: the scrape is one more request of its address.
    gateway = make_gateway(expose_metrics=True, rate_limit=0.001, rate_burst=2)
    route = ("gateway", "GET", "/api/v1/vms", "401")
    refused = ("gateway", "GET", "unmatched", "429")  # refused before routing
    before = _count(*route), _count(*refused)
    async with gateway.http:
        assert (await gateway.http.get("/api/v1/vms")).status_code == 401
        resp = await gateway.http.get("/metrics")
        assert resp.status_code == 200, resp.text
        assert (await gateway.http.get("/api/v1/vms")).status_code == 429
    assert (_count(*route), _count(*refused)) == (before[0] + 1, before[1] + 1)
    families = {f.name: f for f in text_string_to_metric_families(resp.text)}
    assert any(s.labels == dict(zip(("component", "method", "route", "status"), route,
                                    strict=True))
               for s in families["yun_http_requests"].samples)
