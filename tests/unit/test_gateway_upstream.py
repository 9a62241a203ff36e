"""What the gateway sends the control server: exact paths, the signed context, headers.

Regression tests for the defects fuzzing found in the old gateway: user input pasted
into internal URLs (``?``, ``#``, ``..``, control characters) and unbounded integers.
"""

from __future__ import annotations

import uuid

import httpx
import pytest

from tests.problems import assert_problem
from tests.unit.test_gateway_harness import (
    BEARER,
    CLIENT_IP,
    GATEWAY_CREDENTIAL,
    alice,
    make_gateway,
    problem,
    received_context,
    task_json,
    vm_json,
)
from yun.gateway.upstream import fill_path
from yun.proto.context import AnonymousContext, RequestContext
from yun.proto.errors import Unprocessable

BAD_REFS = [
    "x%3Fname%3Ddemo",     # '?': once reached the control server as /vms/x?name=demo
    "x%23",                # '#': once cut the internal path
    "%2E%2E",              # '..': once climbed a level
    ".hidden",
    "x%00y", "x%01y", "x%0A", "x%7F", "x%20y", "x%25y", "x%5Cy", "x%26y=1",
    "%C3%A9t%C3%A9",       # non-ASCII
    "a" * 64,              # longer than 63
]




@pytest.mark.parametrize("ref", BAD_REFS)
@pytest.mark.parametrize("suffix", ["", "/console-log", "/tags"])
async def test_bad_refs_are_refused_before_the_control_server(ref: str, suffix: str) -> None:
    gw = make_gateway()
    resp = await gw.http.get(f"/api/v1/vms/{ref}{suffix}", headers=BEARER)
    body = assert_problem(resp, 422, "path.ref")
    assert [e["field"] for e in body["errors"]] == ["path.ref"]
    assert gw.control.calls() == []


async def test_a_fragment_after_a_uuid_never_reaches_the_vm() -> None:
    # GET /api/v1/vms/<uuid>%23/console-log once reached GET /vms/<uuid> and answered 500.
    gw = make_gateway()
    resp = await gw.http.get(f"/api/v1/vms/{uuid.uuid4()}%23/console-log", headers=BEARER)
    assert_problem(resp, 422, "path.ref")
    assert gw.control.calls() == []


@pytest.mark.parametrize("path", [
    f"/api/v1/tasks/{str(uuid.uuid4()).upper()}",
    "/api/v1/tasks/not-a-uuid",
    f"/api/v1/tasks/{uuid.uuid4().hex}",
    f"/api/v1/role-assignments/{uuid.uuid4()}%3F",
])
async def test_uuid_parameters_must_be_canonical(path: str) -> None:
    gw = make_gateway()
    method = "DELETE" if "role-assignments" in path else "GET"
    resp = await gw.http.request(method, path, headers=BEARER)
    assert_problem(resp, 422, "_uuid")
    assert gw.control.calls() == []


@pytest.mark.parametrize("query", [
    "offset=17610447854232507516977152",   # once a 502 OverflowError
    "offset=-1", "offset=1000001", "limit=0", "limit=1001", "limit=99999999999999999999",
    "q=" + "x" * 4097, "sort=" + "x" * 257, "cursor=" + "x" * 1025, "count=maybe",
])
async def test_list_parameters_are_bounded(query: str) -> None:
    gw = make_gateway()
    resp = await gw.http.get(f"/api/v1/vms?{query}", headers=BEARER)
    body = assert_problem(resp, 422, f"query.{query.split('=')[0]}")
    assert body["errors"][0]["field"] == f"query.{query.split('=')[0]}"
    assert gw.control.calls() == []


@pytest.mark.parametrize("query", ["wait=601", "wait=-1", "wait=nan", "wait=inf",
                                   "wait=1e309"])
async def test_wait_is_bounded(query: str) -> None:
    gw = make_gateway()
    resp = await gw.http.get(f"/api/v1/tasks/{uuid.uuid4()}?{query}", headers=BEARER)
    assert_problem(resp, 422, "query.wait")
    resp = await gw.http.post(f"/api/v1/vms/web/start?{query}", headers=BEARER)
    assert_problem(resp, 422, "query.wait")
    assert gw.control.calls() == []


async def test_console_log_max_bytes_is_bounded() -> None:
    gw = make_gateway()
    for value in ("0", str(1 << 21), "1" * 40):
        resp = await gw.http.get(f"/api/v1/vms/web/console-log?max_bytes={value}",
                                 headers=BEARER)
        assert_problem(resp, 422, "query.max_bytes")
    assert gw.control.calls() == []


async def test_the_control_server_gets_the_exact_path_and_a_signed_context() -> None:
    gw = make_gateway()
    vm = vm_json("web-1.a_b")
    gw.control.on("GET", "/internal/v1/vms/web-1.a_b", 200, vm)
    resp = await gw.http.get("/api/v1/vms/web-1.a_b",
                             headers={**BEARER, "X-Request-Id": "trace-42"})
    assert resp.status_code == 200, resp.text
    assert resp.json()["uuid"] == vm["uuid"]
    assert resp.headers["X-Request-Id"] == "trace-42"
    [seen] = gw.control.calls()
    assert (seen.method, seen.raw_path, seen.query) == ("GET", "/internal/v1/vms/web-1.a_b", "")
    assert seen.headers["x-yun-request-id"] == "trace-42"
    assert seen.headers["authorization"] == f"Yun {GATEWAY_CREDENTIAL}"
    context = received_context(seen)
    assert isinstance(context, RequestContext)
    assert context == alice(request_id="trace-42", source_ip=CLIENT_IP)
    assert "idempotency-key" not in seen.headers


async def test_list_parameters_are_forwarded_as_given() -> None:
    gw = make_gateway()
    gw.control.on("GET", "/internal/v1/vms", 200, {"items": [], "limit": 5, "offset": 0})
    resp = await gw.http.get("/api/v1/vms", headers=BEARER, params={
        "q": "vcpus>=2 and tag:env=prod", "sort": "-created_at", "limit": 5,
        "cursor": "abc", "count": "true"})
    assert resp.status_code == 200, resp.text
    [seen] = gw.control.calls()
    assert httpx.QueryParams(seen.query) == httpx.QueryParams({
        "q": "vcpus>=2 and tag:env=prod", "sort": "-created_at", "limit": "5", "offset": "0",
        "cursor": "abc", "count": "true"})


async def test_idempotency_key_is_forwarded_and_the_replay_mark_relayed() -> None:
    gw = make_gateway()
    accepted = {"task": task_json(), "resource": vm_json()}
    gw.control.on("POST", "/internal/v1/vms", 202, accepted, {"Idempotent-Replayed": "true"})
    resp = await gw.http.post("/api/v1/vms", headers={**BEARER, "Idempotency-Key": "k-1"},
                              json={"name": "web", "image": "debian"})
    assert resp.status_code == 202, resp.text
    assert resp.headers["Idempotent-Replayed"] == "true"
    [seen] = gw.control.calls()
    assert seen.headers["idempotency-key"] == "k-1"
    assert seen.json() == {"name": "web", "image": "debian"}  # defaults left to the server
    long_key = await gw.http.post("/api/v1/vms", headers={**BEARER, "Idempotency-Key": "k" * 256},
                                  json={"name": "web", "image": "debian"})
    assert_problem(long_key, 422, "idempotency-key")


async def test_power_actions_relay_200_when_nothing_had_to_be_done() -> None:
    gw = make_gateway()
    gw.control.on("POST", "/internal/v1/vms/web/start", 200,
                  {"task": None, "resource": vm_json(), "message": "web is already running"})
    resp = await gw.http.post("/api/v1/vms/web/start?wait=5", headers=BEARER)
    assert resp.status_code == 200, resp.text
    assert resp.json()["task"] is None and "already" in resp.json()["message"]
    assert [s.raw_path for s in gw.control.calls()] == ["/internal/v1/vms/web/start"]


async def test_wait_waits_for_the_task() -> None:
    gw = make_gateway()
    task = task_json("running")
    gw.control.on("POST", "/internal/v1/vms/web/stop", 202, {"task": task, "resource": {}})
    gw.control.on("GET", f"/internal/v1/tasks/{task['uuid']}", 200, {**task, "state": "succeeded"})
    resp = await gw.http.post("/api/v1/vms/web/stop?wait=2.5", headers=BEARER,
                              json={"force": True})
    assert resp.status_code == 202, resp.text
    assert resp.json()["task"]["state"] == "succeeded"
    stop, wait = gw.control.calls()
    assert stop.json() == {"force": True}
    assert (wait.raw_path, wait.query) == (f"/internal/v1/tasks/{task['uuid']}", "wait=2.5")


async def test_control_server_errors_pass_through_and_malformed_answers_are_502() -> None:
    gw = make_gateway()
    gw.control.on("GET", "/internal/v1/vms/gone", *problem(404, "no VM 'gone' in project web"))
    assert_problem(await gw.http.get("/api/v1/vms/gone", headers=BEARER), 404, "no VM 'gone'")
    gw.control.on("GET", "/internal/v1/vms/odd", 200, {"name": "no uuid, no state"})
    assert_problem(await gw.http.get("/api/v1/vms/odd", headers=BEARER), 502, "malformed Vm")


async def test_a_relayed_answer_is_the_public_model_of_the_control_servers_bytes() -> None:
    """Checked and rewritten from the bytes received: what the public model lacks is not
    relayed, and text outside ASCII arrives as sent."""
    gw = make_gateway()
    vm = {**vm_json("wéb-1"), "internal_only": "not for users"}
    gw.control.on("GET", "/internal/v1/vms/web", 200, vm)
    resp = await gw.http.get("/api/v1/vms/web", headers=BEARER)
    assert resp.status_code == 200 and resp.headers["content-type"] == "application/json"
    body = resp.json()
    assert body["name"] == "wéb-1" and body["uuid"] == vm["uuid"]
    assert "internal_only" not in body
    page = {"items": [vm_json(f"vm-{i}") for i in range(3)], "total": None, "limit": 3,
            "offset": 0, "next_cursor": "c"}
    gw.control.on("GET", "/internal/v1/vms", 200, page)
    listed = (await gw.http.get("/api/v1/vms?limit=3", headers=BEARER)).json()
    assert [v["name"] for v in listed["items"]] == ["vm-0", "vm-1", "vm-2"]
    assert listed["next_cursor"] == "c"


async def test_no_control_server_is_503() -> None:
    gw = make_gateway()
    gw.control.tokens.clear()
    gw.membership.controls = []
    resp = await gw.http.get("/api/v1/vms", headers=BEARER)
    assert_problem(resp, 503, "no control server is available; try again shortly")


async def test_login_forwards_an_anonymous_context() -> None:
    gw = make_gateway()
    issued = {"uuid": str(uuid.uuid4()), "user_uuid": str(uuid.uuid4()),
              "created_at": "2026-01-01T00:00:00Z", "expires_at": "2026-01-02T00:00:00Z",
              "token": "t", "user_name": "alice"}
    gw.control.on("POST", "/internal/v1/auth/tokens", 201, issued)
    resp = await gw.http.post("/api/v1/auth/tokens", headers={"X-Request-Id": "login-1"},
                              json={"username": "alice", "password": "pw"})
    assert resp.status_code == 201, resp.text
    [seen] = gw.control.calls()
    context = received_context(seen)
    assert context == AnonymousContext(request_id="login-1", source_ip=CLIENT_IP)


@pytest.mark.parametrize("value", ["x?a=b", "x#y", "..", ".", "a/b", "x\n", "", "a" * 64,
                                   "x\x00", "é"])
def test_fill_path_refuses_what_is_not_a_ref(value: str) -> None:
    with pytest.raises(Unprocessable) as caught:
        fill_path("/vms/{ref}/start", {"ref": value})
    assert caught.value.errors == [{"field": "path.ref", "message": caught.value.detail}]


def test_fill_path_quotes_and_checks_uuids() -> None:
    assert fill_path("/vms/{ref}/start", {"ref": "web-1.a_b"}) == "/vms/web-1.a_b/start"
    task = str(uuid.uuid4())
    assert fill_path("/tasks/{task_uuid}", {"task_uuid": task}) == f"/tasks/{task}"
    for bad in (task.upper(), task.replace("-", ""), "web"):
        with pytest.raises(Unprocessable):
            fill_path("/tasks/{task_uuid}", {"task_uuid": bad})
    with pytest.raises(ValueError):
        fill_path("/vms/{ref}?x=1", {"ref": "web"})
