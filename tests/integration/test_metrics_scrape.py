"""``GET /metrics`` on every component of a running cloud (issue 10, F-MON).

Every component's answer parses with prometheus-client's own parser and carries the
named series. The internal ports answer a scraper without a signed request, but only
over TLS with a client certificate of the domain CA (what a Prometheus scraper is given);
the gateway serves /metrics only with ``expose_metrics`` on.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.conftest import started, upload
from yun.proto.components import ComponentType
from yun.testing.cluster import SimCluster

Families = dict[str, Any]


@pytest.fixture
async def cloud(tmp_path: Path) -> AsyncIterator[SimCluster]:
    async with started(SimCluster(tmp_path, nodes=1,
                                  gateway_options={"expose_metrics": True})) as c:
        yield c


def _parse(text: str) -> Families:
    return {f.name: f for f in text_string_to_metric_families(text)}


def _samples(families: Families, name: str, sample: str | None = None,
             **labels: str) -> list[Any]:
    """The samples called ``sample`` (default: the counter's ``_total``, a gauge's
    name) of family ``name`` whose labels include ``labels``."""
    family = families[name]
    wanted = sample or (name + "_total" if family.type == "counter" else name)
    return [s for s in family.samples if s.name == wanted
            and all(s.labels.get(k) == v for k, v in labels.items())]


async def _scrape(url: str, tls: Any) -> Families:
    async with httpx.AsyncClient(verify=tls, timeout=30) as client:
        resp = await client.get(url.rstrip("/") + "/metrics")
    assert resp.status_code == 200, resp.text
    assert resp.headers["content-type"].startswith("text/plain; version=")
    return _parse(resp.text)


async def test_every_component_serves_its_metrics(cloud: SimCluster, small_qcow2: Path,
                                                   tmp_path: Path) -> None:
    c = cloud
    assert c.api and c.domain and c.control and c.storage and c.gateway
    await upload(c, small_qcow2)
    resp = await c.api.post("/api/v1/vms", json={"name": "m1", "image": "img",
                                                 "memory_mb": 64, "disk_gb": 1})
    assert resp.status_code == 202, resp.text
    task = await c.wait_task(resp.json()["task"]["uuid"])
    assert task["state"] == "succeeded", task
    assert (await c.api.get("/api/v1/vms/m1")).status_code == 200

    # A scraper: a certificate of the domain CA, no signed request.
    _, tls = c.member(ComponentType.NODE, "prometheus")
    node = c.node_services[0]
    internal = {"domain": c.domain.url, "control": c.control.url,
                "storage": c.storage.url, "node": node.url}
    scraped = dict(zip(internal, await asyncio.gather(
        *(_scrape(url, tls) for url in internal.values())), strict=True))
    # Without a client certificate an internal port refuses the connection itself.
    async with httpx.AsyncClient(verify=False, timeout=10) as anonymous:
        with pytest.raises(httpx.HTTPError):
            await anonymous.get(c.control.url + "/metrics")
    async with httpx.AsyncClient(timeout=30) as client:
        resp = await client.get(c.gateway.url + "/metrics")  # the public port: plain HTTP
    assert resp.status_code == 200, resp.text
    scraped["gateway"] = _parse(resp.text)

    for component, families in scraped.items():
        for name in ("yun_http_requests", "yun_http_request_duration_seconds",
                     "process_cpu_seconds", "process_resident_memory_bytes"):
            assert name in families, (component, name)
        assert _samples(families, "process_resident_memory_bytes")[0].value > 0
        # Each component counted requests of its own (at least the scrape before).
        assert _samples(families, "yun_http_requests", component=component), component

    gateway = scraped["gateway"]
    creates = _samples(gateway, "yun_http_requests", component="gateway", method="POST",
                       route="/api/v1/vms", status="202")
    assert creates and creates[0].value >= 1
    assert _samples(gateway, "yun_http_requests", component="gateway", method="GET",
                    route="/api/v1/vms/{ref}", status="200")
    upstream = _samples(gateway, "yun_gateway_upstream_duration_seconds",
                        "yun_gateway_upstream_duration_seconds_count",
                        method="POST", route="/vms", status="202")
    assert upstream and upstream[0].value >= 1

    # No series anywhere names a VM: labels are templates and bounded sets.
    for families in scraped.values():
        for family in families.values():
            for sample in family.samples:
                assert "m1" not in sample.labels.values(), sample

    control = scraped["control"]
    assert _samples(control, "yun_http_requests", component="control", method="POST",
                    route="/internal/v1/vms", status="202")
    placed = _samples(control, "yun_placement_duration_seconds",
                      "yun_placement_duration_seconds_count", outcome="placed")
    assert placed and placed[0].value >= 1
    assert _samples(control, "yun_placement_batch_size", "yun_placement_batch_size_count")
    reports = _samples(control, "yun_node_report_duration_seconds",
                       "yun_node_report_duration_seconds_count", outcome="ok")
    assert reports and reports[0].value >= 1
    assert _samples(control, "yun_nodes_reporting")[0].value >= 1
    for name in ("yun_queue_keys", "yun_queue_waiters", "yun_flow_duration_seconds",
                 "yun_flow_step_duration_seconds", "yun_flows_running",
                 "yun_db_transaction_seconds", "yun_journal_batch_size"):
        assert name in control, name
    created = _samples(control, "yun_flow_duration_seconds", "yun_flow_duration_seconds_count",
                       kind="vm.create", outcome="succeeded")
    assert created and created[0].value >= 1
    steps = _samples(control, "yun_flow_step_duration_seconds",
                     "yun_flow_step_duration_seconds_count", kind="vm.create",
                     step="provision", outcome="succeeded")
    assert steps and steps[0].value >= 1
    for mode in ("write", "read"):
        done = _samples(control, "yun_db_transaction_seconds",
                        "yun_db_transaction_seconds_count", mode=mode)
        assert done and done[0].value >= 1, mode
    batches = _samples(control, "yun_journal_batch_size", "yun_journal_batch_size_count")
    assert batches and batches[0].value >= 1

    node_families = scraped["node"]
    assert _samples(node_families, "yun_http_requests", component="node", method="PUT",
                    route="/internal/v1/domains/{vm_uuid}")
