"""The gateway's fixes, end to end against the real control server (``SimCluster``).

Written by the gateway's author for the lead to run once ``SimCluster`` logs in
(``cluster.api`` authenticated as the super admin, ``cluster.login(user, password,
project)`` returning a token). Each test is the end-to-end form of a unit test in
``tests/unit/test_gateway_*.py``.
"""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import httpx
import pytest

from tests.integration.conftest import upload
from tests.problems import assert_problem
from yun.proto import signing
from yun.testing.cluster import SimCluster

pytestmark = pytest.mark.skipif(not hasattr(SimCluster, "login"),
                                reason="SimCluster cannot log in yet")




async def test_refs_that_would_change_the_internal_url_are_422(cluster: SimCluster) -> None:
    assert cluster.api is not None
    vm_uuid = uuid.uuid4()
    for path in ["/api/v1/vms/x%3Fname%3Ddemo", f"/api/v1/vms/{vm_uuid}%23/console-log",
                 "/api/v1/vms/%2E%2E", "/api/v1/vms/x%01", "/api/v1/images/x%3F/tags",
                 "/api/v1/nodes/%2e%2e%5cvms"]:
        body = assert_problem(await cluster.api.get(path), 422, "path.ref")
        assert body["errors"][0]["field"] == "path.ref", path
    for path in ["/api/v1/vms?offset=17610447854232507516977152",
                 f"/api/v1/tasks/{uuid.uuid4()}?wait=1e400"]:
        assert_problem(await cluster.api.get(path), 422)


async def test_openapi_is_honest_and_405_says_allow(cluster: SimCluster) -> None:
    assert cluster.api is not None
    spec = (await cluster.api.get("/openapi.json")).json()
    responses = spec["paths"]["/api/v1/vms/{ref}"]["get"]["responses"]
    for status in ("400", "401", "403", "404", "413", "422", "429", "503"):
        assert "application/problem+json" in responses[status]["content"], status
    resp = await cluster.api.put("/api/v1/vms")
    assert_problem(resp, 405)
    assert resp.headers["Allow"] == "GET, POST"


async def test_big_and_malformed_bodies(cluster: SimCluster) -> None:
    assert cluster.api is not None
    resp = await cluster.api.post("/api/v1/departments", content=b"{" + b" " * (2 << 20) + b"}",
                                  headers={"Content-Type": "application/json"})
    assert_problem(resp, 413, "request body larger than 1048576 bytes")
    resp = await cluster.api.post("/api/v1/departments", content=b'{"name": "\xff"}',
                                  headers={"Content-Type": "application/json"})
    assert_problem(resp, 400, "not valid UTF-8")
    assert_problem(await cluster.api.get("/api/v1/vms?q=%FF"), 400, "query string")


async def test_key_pair_requests(cluster: SimCluster) -> None:
    assert cluster.api is not None
    made = await cluster.api.post("/api/v1/keys", json={"name": "ci"})
    assert made.status_code == 201, made.text
    key = made.json()
    http = httpx.AsyncClient(base_url=cluster.api.base_url)
    try:
        def sign(path: str, query: list[tuple[str, str]]) -> dict[str, str]:
            return signing.sign_headers(key["access_key"], key["secret"], "GET", path, query,
                                        b"")

        query = [("limit", "5"), ("q", "status=up")]
        headers = sign("/api/v1/nodes", query)
        resp = await http.get("/api/v1/nodes", params=query, headers=headers)
        assert resp.status_code == 200, resp.text
        assert_problem(await http.get("/api/v1/nodes", params=query, headers=headers), 401,
                       "replayed request")
        wrong = signing.sign_headers(key["access_key"], "not-the-secret", "GET",
                                     "/api/v1/nodes", [], b"")
        assert_problem(await http.get("/api/v1/nodes", headers=wrong), 401,
                       "signature does not match")
        disabled = await cluster.api.patch(f"/api/v1/keys/{key['uuid']}",
                                           json={"enabled": False})
        assert disabled.status_code == 200, disabled.text
        resp = await http.get("/api/v1/nodes", headers=sign("/api/v1/nodes", []))
        assert resp.status_code == 401, resp.text
    finally:
        await http.aclose()


async def test_a_revoked_token_stops_working_at_once(cluster: SimCluster) -> None:
    token = await cluster.login("admin", cluster.admin_password)
    async with cluster.client(token) as http:
        who = await http.get("/api/v1/auth/whoami")
        assert who.status_code == 200, who.text
        mine = (await http.get("/api/v1/auth/tokens", params={"limit": 1000})).json()["items"]
        newest = max(mine, key=lambda t: t["created_at"])
        assert (await http.delete(f"/api/v1/auth/tokens/{newest['uuid']}")).status_code == 204
        assert_problem(await http.get("/api/v1/auth/whoami"), 401)


async def test_request_ids_reach_the_audit_log(cluster: SimCluster) -> None:
    assert cluster.api is not None
    resp = await cluster.api.post("/api/v1/departments", json={"name": "traced"},
                                  headers={"X-Request-Id": "it-trace-1"})
    assert resp.status_code == 201, resp.text
    assert resp.headers["X-Request-Id"] == "it-trace-1"
    page = (await cluster.api.get("/api/v1/audit", params={"limit": 1000})).json()
    records = [r for r in page["items"] if r["request_id"] == "it-trace-1"]
    assert records and records[0]["source_ip"] == "127.0.0.1"


async def test_a_retried_keyed_upload_answers_the_same_image(
        cluster: SimCluster, small_qcow2: Path) -> None:
    assert cluster.api is not None
    data = await asyncio.to_thread(small_qcow2.read_bytes)
    headers = {"Idempotency-Key": "upload-1", "Content-Type": "application/octet-stream"}
    first = await cluster.api.post("/api/v1/images", params={"name": "keyed"}, content=data,
                                   headers=headers)
    assert first.status_code == 201, first.text
    again = await cluster.api.post("/api/v1/images", params={"name": "keyed"}, content=data,
                                   headers=headers)
    assert again.status_code == 201, again.text
    assert again.json()["uuid"] == first.json()["uuid"]
    assert again.headers.get("Idempotent-Replayed") == "true"
    other = await upload(cluster, small_qcow2, name="unkeyed")
    assert other["status"] == "active"
