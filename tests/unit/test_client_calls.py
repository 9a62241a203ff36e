"""How the SDK encodes calls and reads answers: quoted paths, list parameters, pages
followed by cursor, long operations, errors. The HTTP layer is an httpx.MockTransport:
what is under test is the client's side of the wire, for both clients."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from yun.client import (
    ApiError,
    AsyncClient,
    Client,
    InvalidReference,
    TaskFailed,
    TaskTimeout,
    TokenAuth,
)
from yun.proto.identity import QuotaResource, QuotaUpdate, RoleInfo
from yun.proto.resources import Accepted, Task, TaskState, VmCreate

NOW = "2026-01-01T00:00:00Z"
Handler = Callable[[httpx.Request], httpx.Response]


def vm(name: str, state: str = "running") -> dict[str, Any]:
    return {"uuid": f"uuid-{name}", "name": name, "created_at": NOW, "updated_at": NOW,
            "state": state, "vcpus": 1, "memory_mb": 256, "disk_gb": 1, "image_uuid": "i"}


def task(state: str = "pending", error: str | None = None) -> dict[str, Any]:
    return {"uuid": "t-1", "kind": "vm.create", "resource_type": "vm", "resource_uuid": "v",
            "state": state, "error": error, "created_at": NOW, "updated_at": NOW}


class FakeApi:
    """Answers by ``(method, path)`` (the decoded path after /api/v1); keeps requests."""

    def __init__(self, routes: dict[tuple[str, str], Any]) -> None:
        self.routes = routes
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        request.read()
        self.requests.append(request)
        route = (request.method, request.url.path.removeprefix("/api/v1"))
        answer = self.routes.get(route)
        if answer is None:
            return httpx.Response(404, json={"title": "Not found", "status": 404,
                                             "detail": f"no route {route}"})
        if callable(answer):
            answer = answer(request)
        if isinstance(answer, httpx.Response):
            return answer
        return httpx.Response(200, json=answer)

    def client(self) -> Client:
        return Client("http://gw:8080", TokenAuth("t"), transport=httpx.MockTransport(self))


# --- paths and parameters ---------------------------------------------------------------


UNRESERVED = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-._~")


@pytest.mark.parametrize("ref", ["a/b", "a?b=c", "50%", "x y", "vé", "a#b", "...", "a/../b"])
def test_path_parameters_are_one_quoted_segment(ref: str) -> None:
    api = FakeApi({})
    client = api.client()
    for call in (lambda: client.vms.get(ref), lambda: client.images.tags.get(ref),
                 lambda: client.projects.get_quota(ref), lambda: client.tasks.get(ref),
                 lambda: client.vms.start(ref)):
        with pytest.raises(ApiError):
            call()
    quoted = "".join(chr(b) if chr(b) in UNRESERVED else f"%{b:02X}" for b in ref.encode())
    assert [r.url.raw_path.split(b"?")[0].decode() for r in api.requests] == [
        f"/api/v1/vms/{quoted}", f"/api/v1/images/{quoted}/tags",
        f"/api/v1/projects/{quoted}/quota", f"/api/v1/tasks/{quoted}",
        f"/api/v1/vms/{quoted}/start"]


@pytest.mark.parametrize("ref", ["", ".", ".."])
def test_a_reference_that_would_change_the_route_is_refused(ref: str) -> None:
    api = FakeApi({})
    with pytest.raises(InvalidReference):
        api.client().projects.get_quota(ref)  # "/projects/../quota" would be "/quota"
    assert api.requests == []


def test_list_parameters_are_sent_only_when_given() -> None:
    api = FakeApi({("GET", "/vms"): {"items": [], "limit": 5, "total": 0}})
    client = api.client()
    client.vms.list()
    client.vms.list(q="state=running", sort="-created_at", limit=5, offset=10, count=True)
    plain, full = (dict(r.url.params) for r in api.requests)
    assert plain == {"limit": "100"}
    assert full == {"q": "state=running", "sort": "-created_at", "limit": "5", "offset": "10",
                    "count": "true"}


def test_mutations_carry_the_idempotency_key_and_only_the_fields_set() -> None:
    api = FakeApi({
        ("PUT", "/projects/web/quota"): {"project_uuid": "p", "project_name": "web",
                                         "lines": [{"resource": "vms", "limit": 3,
                                                    "used": 1}]},
        ("PATCH", "/vms/web1/tags"): {"tags": {"env": "prod", "sys:node": "n1"}},
    })
    client = api.client()
    quota = client.projects.set_quota("web", QuotaUpdate(limits={QuotaResource.VMS: 3}),
                                      idempotency_key="k-1")
    assert quota.lines[0].limit == 3
    tags = client.vms.tags.set("web1", {"env": "prod"})
    assert tags == {"env": "prod", "sys:node": "n1"}  # platform tags are read back as they are
    put, patch = api.requests
    assert put.headers["Idempotency-Key"] == "k-1"
    assert json.loads(put.content) == {"limits": {"vms": 3}}
    assert "Idempotency-Key" not in patch.headers
    assert json.loads(patch.content) == {"set": {"env": "prod"}}


def test_a_list_answer_and_text_answers_are_typed() -> None:
    api = FakeApi({
        ("GET", "/roles"): [{"name": "reader", "scope": "project", "description": "reads"}],
        ("GET", "/vms/w/console-log"): lambda r: httpx.Response(
            200, text="boot…\nYUN-GUEST-READY\n", headers={"content-type": "text/plain"}),
    })
    client = api.client()
    assert client.roles.list() == [RoleInfo(name="reader", scope="project",  # type: ignore[arg-type]
                                            description="reads")]
    assert client.vms.console_log("w", max_bytes=10).endswith("READY\n")
    assert api.requests[1].url.params["max_bytes"] == "10"


# --- pages ------------------------------------------------------------------------------


def paged(request: httpx.Request) -> dict[str, Any]:
    """Three pages of VMs, chained by an opaque cursor."""
    cursor = request.url.params.get("cursor")
    assert "offset" not in request.url.params
    names = {None: (["a", "b"], "c:2"), "c:2": (["c", "d"], "c/4 +"), "c/4 +": (["e"], None)}
    items, after = names[cursor]
    return {"items": [vm(n) for n in items], "limit": 2, "next_cursor": after}


def test_iterate_follows_next_cursor_to_the_end() -> None:
    api = FakeApi({("GET", "/vms"): paged})
    client = api.client()
    assert [v.name for v in client.vms.iterate(q="x=1", sort="name", page_size=2)] == \
        ["a", "b", "c", "d", "e"]
    assert [r.url.params.get("cursor") for r in api.requests] == [None, "c:2", "c/4 +"]
    assert all(r.url.params["q"] == "x=1" and r.url.params["limit"] == "2"
               for r in api.requests)


async def test_async_iterate_follows_next_cursor() -> None:
    api = FakeApi({("GET", "/vms"): paged})
    async with AsyncClient("http://gw", transport=httpx.MockTransport(api)) as client:
        names = [v.name async for v in client.vms.iterate(page_size=2)]
        first = await client.vms.list(limit=2)
    assert names == ["a", "b", "c", "d", "e"]
    assert first.next_cursor == "c:2" and [v.name for v in first.items] == ["a", "b"]


# --- long operations --------------------------------------------------------------------


def tasks_in(*states: str, error: str | None = None) -> Callable[[httpx.Request], Any]:
    """A task route answering the given states in turn."""
    answers = iter(states)

    def answer(request: httpx.Request) -> dict[str, Any]:
        assert float(request.url.params["wait"]) > 0  # the API is asked to hold the poll
        state = next(answers)
        return task(state, error if state == "failed" else None)

    return answer


def accepted_answer(request: httpx.Request) -> httpx.Response:
    return httpx.Response(202, json={"task": task(), "resource": vm("w", "building")})


def test_without_wait_the_accepted_answer_is_returned() -> None:
    api = FakeApi({("POST", "/vms"): accepted_answer})
    answer = api.client().vms.create(VmCreate(name="w", image="deb"))
    assert isinstance(answer, Accepted) and answer.task is not None
    assert answer.resource["state"] == "building"
    assert json.loads(api.requests[0].content) == {"name": "w", "image": "deb"}


def test_wait_follows_the_task_until_it_ends() -> None:
    api = FakeApi({("POST", "/vms"): accepted_answer,
                   ("GET", "/tasks/t-1"): tasks_in("running", "succeeded")})
    result = api.client().vms.create(VmCreate(name="w", image="deb"), wait=30)
    assert isinstance(result, Task) and result.state is TaskState.SUCCEEDED
    assert len(api.requests) == 3


def test_a_failed_task_raises_task_failed() -> None:
    api = FakeApi({("POST", "/vms/w/start"): accepted_answer,
                   ("GET", "/tasks/t-1"): tasks_in("failed", error="no node has room")})
    with pytest.raises(TaskFailed) as info:
        api.client().vms.start("w", wait=True)
    assert info.value.task.error == "no node has room"


def test_a_task_still_running_at_the_deadline_raises_task_timeout() -> None:
    api = FakeApi({("POST", "/vms/w/reboot"): accepted_answer,
                   ("GET", "/tasks/t-1"): lambda r: task("running")})
    with pytest.raises(TaskTimeout) as info:
        api.client().vms.reboot("w", wait=0.05)
    assert info.value.task.state is TaskState.RUNNING


def test_nothing_to_do_returns_the_message_even_when_waiting() -> None:
    api = FakeApi({("POST", "/vms/w/start"): {"task": None, "resource": vm("w"),
                                              "message": "the VM already runs"}})
    answer = api.client().vms.start("w", wait=True)
    assert isinstance(answer, Accepted) and answer.task is None
    assert answer.message == "the VM already runs"
    assert len(api.requests) == 1


def test_a_delete_answers_none_or_a_followed_task() -> None:
    api = FakeApi({("DELETE", "/images/base"): lambda r: (
        accepted_answer(r) if r.url.params.get("cascade") else httpx.Response(204)),
        ("GET", "/tasks/t-1"): tasks_in("succeeded")})
    client = api.client()
    assert client.images.delete("base") is None
    done = client.images.delete("base", cascade=True, wait=True)
    assert isinstance(done, Task) and done.state is TaskState.SUCCEEDED
    assert "cascade" not in api.requests[0].url.params
    assert api.requests[1].url.params["cascade"] == "true"


async def test_async_wait_and_task_failure() -> None:
    api = FakeApi({("DELETE", "/vms/w"): accepted_answer,
                   ("GET", "/tasks/t-1"): tasks_in("rolling_back", "failed", error="disk")})
    async with AsyncClient("http://gw", transport=httpx.MockTransport(api)) as client:
        with pytest.raises(TaskFailed):
            await client.vms.delete("w", wait=True)
        seen: list[str] = []
        api.routes[("GET", "/tasks/t-1")] = tasks_in("succeeded")
        final = await client.tasks.wait("t-1", 5, on_update=lambda t: seen.append(t.state))
    assert final.state is TaskState.SUCCEEDED and seen == ["succeeded"]


# --- uploads and login ------------------------------------------------------------------


def test_upload_streams_a_file_and_reports_progress(tmp_path: Path) -> None:
    image = tmp_path / "disk.qcow2"
    image.write_bytes(b"Q" * (3 * 1024 * 1024 + 5))
    api = FakeApi({("POST", "/images"): lambda r: httpx.Response(201, json={
        "uuid": "i", "name": "disk", "created_at": NOW, "updated_at": NOW,
        "status": "active", "size": len(r.content)})})
    sent: list[int] = []
    got = api.client().images.upload(image, "disk", description="d", idempotency_key="up-1",
                                     progress=sent.append)
    request = api.requests[0]
    assert got.size == image.stat().st_size == sent[-1]
    assert sent == sorted(sent) and len(sent) == 4
    assert dict(request.url.params) == {"name": "disk", "description": "d",
                                        "visibility": "project",
                                        "size": str(3 * 1024 * 1024 + 5)}
    assert request.headers["Idempotency-Key"] == "up-1"
    assert request.headers["Content-Type"] == "application/octet-stream"
    with pytest.raises(FileNotFoundError):
        api.client().images.upload(tmp_path / "missing", "disk")


def test_login_returns_a_client_with_the_token() -> None:
    api = FakeApi({
        ("POST", "/auth/tokens"): lambda r: httpx.Response(201, json={
            "uuid": "tok", "user_uuid": "u", "created_at": NOW,
            "expires_at": "2026-01-02T00:00:00Z", "token": "secret", "user_name": "alice"}),
        ("GET", "/auth/whoami"): lambda r: {
            "user_uuid": "u", "user_name": r.headers["Authorization"], "department_uuid": None,
            "project_uuid": None, "project_name": None, "roles": ["reader"], "auth": "token"},
    })
    client, issued = Client.login("http://gw/api/v1/", "alice", "pw", "web",
                                  transport=httpx.MockTransport(api))
    assert issued.token == "secret" and client.url == "http://gw"
    assert client.auth.whoami().user_name == "Bearer secret"
    login = api.requests[0]
    assert "Authorization" not in login.headers
    assert json.loads(login.content) == {"username": "alice", "password": "pw",
                                         "project": "web"}


# --- errors -----------------------------------------------------------------------------


def test_a_problem_answer_becomes_an_api_error() -> None:
    problem = {"type": "https://yun.dev/problems/invalid-request", "title": "Invalid request",
               "status": 422, "detail": "1 field is not valid",
               "errors": [{"loc": ["body", "name"], "msg": "too long"}]}
    api = FakeApi({("POST", "/vms"): lambda r: httpx.Response(
        422, json=problem, headers={"content-type": "application/problem+json",
                                    "X-Yun-Request-Id": "req-9"})})
    with pytest.raises(ApiError) as info:
        api.client().vms.create(VmCreate(name="w", image="deb"))
    err = info.value
    assert (err.status, err.title, err.detail, err.request_id) == (
        422, "Invalid request", "1 field is not valid", "req-9")
    assert err.errors == problem["errors"]
    assert str(err) == "Invalid request (422): 1 field is not valid"


def test_a_non_json_error_is_reported_clearly() -> None:
    api = FakeApi({("GET", "/vms"): lambda r: httpx.Response(
        502, text="<html><body>Bad gateway</body></html>",
        headers={"content-type": "text/html"})})
    with pytest.raises(ApiError) as info:
        api.client().vms.list()
    assert info.value.status == 502 and info.value.title == "Bad Gateway"
    assert "text/html" in info.value.detail and "Bad gateway" in info.value.detail


def test_an_answer_that_does_not_fit_the_model_is_an_api_error() -> None:
    api = FakeApi({("GET", "/vms/w"): {"name": "w"}})
    with pytest.raises(ApiError) as info:
        api.client().vms.get("w")
    assert info.value.title == "Unexpected answer" and "uuid" in info.value.detail


def test_an_unreachable_gateway_is_status_zero() -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    def slow(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("timed out", request=request)

    with pytest.raises(ApiError) as info:
        Client("http://gw:8080/", transport=httpx.MockTransport(refuse)).vms.list()
    assert info.value.status == 0 and info.value.title == "Gateway unreachable"
    assert "http://gw:8080" in info.value.detail and "refused" in info.value.detail
    with pytest.raises(ApiError) as info:
        Client("http://gw:8080/", transport=httpx.MockTransport(slow)).tasks.get("t")
    assert (info.value.status, info.value.title) == (0, "Timeout")
