"""What the CLI prints: `-o` in both positions, the API's JSON, YAML in API order,
tables, errors on stderr; and what the commands send. The API is an
httpx.MockTransport: the CLI's parsing and printing is what is under test."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from typer.testing import CliRunner

from yun.cli import context
from yun.cli.commands.image import upload_key
from yun.cli.main import app

NOW = "2026-01-01T00:00:00Z"
# Every field of a VM, in the order of the API's model.
VM = {"uuid": "3f1c", "name": "web1", "description": "", "tags": {"env": "[bold]prod"},
      "created_at": NOW, "updated_at": "2026-01-01T00:00:01.500000Z", "project_uuid": "p1",
      "state": "running", "vcpus": 2, "memory_mb": 512, "disk_gb": 4, "image_uuid": "i1",
      "cdrom_image_uuid": None, "boot": "disk", "ssh_key_fingerprints": [],
      "user_data_size": None, "user_data_sha256": None, "pool_uuid": "pl1",
      "pool_name": "default", "group_uuid": None, "node_labels": {},
      "qos": {"cpu": "medium", "read_iops_sec": None, "write_iops_sec": None,
              "read_bytes_sec": None, "write_bytes_sec": None, "bandwidth_kbit": None},
      "node_uuid": "n1", "node_name": "node-0", "ip": "10.64.0.10", "mac": "52:54:00:00:00:01",
      "extra_ips": [], "network_mode": "sandbox-private", "public_ip": None,
      "port_forwards": [], "power_state": "running", "task_uuid": None, "error": None}
TASK: dict[str, Any] = {
    "uuid": "t1", "kind": "vm.create", "resource_type": "vm", "resource_uuid": "3f1c",
    "project_uuid": "p1", "state": "pending", "current_step": None, "error": None,
    "steps": [], "created_at": NOW, "updated_at": NOW, "finished_at": None}
Route = Callable[[httpx.Request], Any] | Any


class Api:
    """Answers by ``(method, path)``; keeps the requests."""

    def __init__(self) -> None:
        self.routes: dict[tuple[str, str], Route] = {}
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        request.read()
        self.requests.append(request)
        answer = self.routes.get((request.method, request.url.path.removeprefix("/api/v1")))
        if answer is None:
            return httpx.Response(404, json={"title": "Not found", "status": 404,
                                             "detail": f"no VM {request.url.path!r}"},
                                  headers={"content-type": "application/problem+json"})
        if callable(answer):
            answer = answer(request)
        return answer if isinstance(answer, httpx.Response) else httpx.Response(200, json=answer)


@pytest.fixture
def api(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Api:
    for var in ("YUN_PROFILE", "YUN_OUTPUT", "YUN_ACCESS_KEY", "YUN_SECRET_KEY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    monkeypatch.setenv("YUN_CONFIG", str(tmp_path / "none.toml"))
    monkeypatch.setenv("YUN_API_URL", "http://gw:8080")
    monkeypatch.setenv("YUN_API_TOKEN", "tok")
    monkeypatch.setenv("COLUMNS", "200")
    fake = Api()
    monkeypatch.setattr(context, "TRANSPORT", httpx.MockTransport(fake))
    return fake


def yun(*args: str) -> Any:
    return CliRunner().invoke(app, list(args))


def ok(*args: str) -> Any:
    result = yun(*args)
    assert result.exit_code == 0, result.output
    return result


# --- formats ----------------------------------------------------------------------------


@pytest.mark.parametrize("args", [("-o", "json", "vm", "show", "web1"),
                                  ("vm", "show", "web1", "-o", "json"),
                                  ("--output", "JSON", "vm", "show", "web1"),
                                  ("-o", "yaml", "vm", "show", "web1", "--output", "json")])
def test_json_is_the_api_document_with_o_in_either_position(api: Api, args: tuple[str]) -> None:
    api.routes[("GET", "/vms/web1")] = VM
    result = ok(*args)
    document = json.loads(result.stdout)
    assert document == VM and list(document) == list(VM)
    assert result.stderr == ""


def test_yun_output_sets_the_default_and_a_command_option_wins(
        api: Api, monkeypatch: pytest.MonkeyPatch) -> None:
    api.routes[("GET", "/vms/web1")] = VM
    monkeypatch.setenv("YUN_OUTPUT", "json")
    assert json.loads(ok("vm", "show", "web1").stdout) == VM
    assert "web1" in ok("vm", "show", "web1", "-o", "table").stdout
    assert not ok("vm", "show", "web1", "-o", "table").stdout.lstrip().startswith("{")


def test_yaml_keeps_the_api_order(api: Api) -> None:
    api.routes[("GET", "/vms/web1")] = VM
    text = ok("vm", "show", "web1", "-o", "yaml").stdout
    assert yaml.safe_load(text) == VM
    assert [line.split(":")[0] for line in text.splitlines() if not line.startswith(" ")] \
        == list(VM)


def test_tables_show_values_literally(api: Api) -> None:
    api.routes[("GET", "/vms")] = {"items": [VM], "limit": 100, "total": 1}
    api.routes[("GET", "/vms/web1")] = VM
    out = ok("vm", "list").stdout
    assert "web1" in out and "10.64.0.10" in out and "1 of 1" in out
    assert "env=[bold]prod" in ok("vm", "show", "web1").stdout  # data, not Rich markup


def test_a_page_with_more_says_how_to_continue(api: Api) -> None:
    api.routes[("GET", "/vms")] = {"items": [VM], "limit": 1, "next_cursor": "abc"}
    assert "--cursor abc" in ok("vm", "list", "--limit", "1").stdout


# --- lists ------------------------------------------------------------------------------


def test_list_options_reach_the_api_and_all_follows_cursors(api: Api) -> None:
    pages = {None: ([dict(VM, name="a")], "c1"), "c1": ([dict(VM, name="b")], None)}

    def vms(request: httpx.Request) -> dict[str, Any]:
        items, after = pages[request.url.params.get("cursor")]
        return {"items": items, "limit": 1, "next_cursor": after}

    api.routes[("GET", "/vms")] = vms
    ok("vm", "list", "-q", "state=running and tag:env=prod", "--sort", "-created_at",
       "--limit", "1")
    assert dict(api.requests[-1].url.params) == {
        "q": "state=running and tag:env=prod", "sort": "-created_at", "limit": "1"}
    everything = json.loads(ok("-o", "json", "vm", "list", "--all", "--limit", "1").stdout)
    assert [v["name"] for v in everything["items"]] == ["a", "b"]
    assert everything["next_cursor"] is None and everything["total"] == 2
    ok("vm", "list", "--cursor", "c1")
    assert api.requests[-1].url.params["cursor"] == "c1"


# --- errors -----------------------------------------------------------------------------


def test_an_api_error_is_one_line_on_stderr_and_exit_1(api: Api) -> None:
    result = yun("vm", "show", "ghost")
    assert result.exit_code == 1 and result.stdout == ""
    assert result.stderr == "error: Not found (404): no VM '/api/v1/vms/ghost'\n"


def test_a_problem_lists_its_field_errors(api: Api) -> None:
    api.routes[("POST", "/vms")] = httpx.Response(422, json={
        "title": "Invalid request", "status": 422, "detail": "the body is not valid",
        "errors": [{"loc": ["body", "image"], "msg": "no image 'deb'"}]})
    result = yun("vm", "create", "web1", "--image", "deb")
    assert result.exit_code == 1
    assert result.stderr.splitlines() == ["error: Invalid request (422): the body is not valid",
                                          "  body.image: no image 'deb'"]


def test_invalid_input_is_refused_before_sending(api: Api) -> None:
    result = yun("vm", "create", "x" * 70, "--image", "deb")
    assert result.exit_code == 1 and api.requests == []
    assert "name" in result.stderr and "63" in result.stderr


def test_an_unreachable_gateway_is_reported(api: Api, monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    monkeypatch.setattr(context, "TRANSPORT", httpx.MockTransport(refuse))
    result = yun("vm", "list")
    assert result.exit_code == 1
    assert result.stderr.startswith("error: Gateway unreachable (0): http://gw:8080")


# --- long operations --------------------------------------------------------------------


def test_create_follows_the_task_then_shows_the_vm(api: Api) -> None:
    api.routes[("POST", "/vms")] = httpx.Response(202, json={"task": TASK, "resource": VM})
    api.routes[("GET", "/tasks/t1")] = dict(TASK, state="succeeded")
    api.routes[("GET", "/vms/3f1c")] = VM
    result = ok("vm", "create", "web1", "--image", "deb", "--memory", "512", "--tag", "a=b",
                "-o", "json")
    assert "create web1: done" in result.stderr
    assert json.loads(result.stdout) == VM
    assert json.loads(api.requests[0].content) == {
        "name": "web1", "description": "", "image": "deb", "vcpus": 1, "memory_mb": 512,
        "disk_gb": 1, "tags": {"a": "b"}}


def test_a_failed_task_exits_1_with_its_error(api: Api) -> None:
    api.routes[("POST", "/vms/web1/stop")] = httpx.Response(202, json={"task": TASK,
                                                                       "resource": VM})
    api.routes[("GET", "/tasks/t1")] = dict(TASK, state="failed", error="guest hung")
    result = yun("vm", "stop", "web1", "--force")
    assert result.exit_code == 1
    assert result.stderr.strip() == "error: stop web1 failed: guest hung (task t1)"
    assert json.loads(api.requests[0].content) == {"force": True, "timeout": 60.0}


def test_no_wait_prints_the_accepted_answer(api: Api) -> None:
    api.routes[("DELETE", "/vms/web1")] = httpx.Response(202, json={"task": TASK,
                                                                    "resource": VM})
    result = ok("vm", "delete", "web1", "--no-wait", "-o", "json",
                "--idempotency-key", "del-1")
    assert json.loads(result.stdout) == {"task": TASK, "resource": VM, "message": None}
    assert "task t1 pending" in result.stderr
    assert api.requests[0].headers["Idempotency-Key"] == "del-1"


def test_nothing_to_do_says_why(api: Api) -> None:
    api.routes[("POST", "/vms/web1/start")] = {"task": None, "resource": VM,
                                               "message": "the VM already runs"}
    api.routes[("GET", "/vms/web1")] = VM
    result = ok("vm", "start", "web1")
    assert "start web1: the VM already runs" in result.stderr and "web1" in result.stdout


def test_console_log_is_printed_as_it_is(api: Api) -> None:
    api.routes[("GET", "/vms/web1/console-log")] = httpx.Response(
        200, text="[  0.0] boot\nYUN-GUEST-READY\n", headers={"content-type": "text/plain"})
    assert ok("vm", "console-log", "web1").stdout == "[  0.0] boot\nYUN-GUEST-READY\n"
    assert json.loads(ok("vm", "console-log", "web1", "-o", "json").stdout).endswith("READY\n")


# --- images -----------------------------------------------------------------------------


def image_answer(request: httpx.Request) -> httpx.Response:
    return httpx.Response(201, json={
        "uuid": "i1", "name": request.url.params["name"], "created_at": NOW, "updated_at": NOW,
        "status": "active", "format": "qcow2", "size": len(request.content)})


def test_upload_derives_a_stable_idempotency_key(api: Api, tmp_path: Path) -> None:
    disk = tmp_path / "disk.qcow2"
    disk.write_bytes(b"QFI\xfb" + b"\0" * 5000)
    api.routes[("POST", "/images")] = image_answer
    api.routes[("GET", "/images/i1")] = {"uuid": "i1", "name": "base", "created_at": NOW,
                                         "updated_at": NOW, "status": "active"}
    first = ok("image", "upload", str(disk), "--name", "base", "-o", "json")
    assert json.loads(first.stdout)["size"] == 5004
    ok("image", "upload", str(disk), "--name", "base")
    keys = [r.headers["Idempotency-Key"] for r in api.requests if r.method == "POST"]
    assert keys[0] == keys[1] == upload_key(disk, "base")  # a re-run is the same upload
    assert upload_key(disk, "other") != keys[0]
    os.utime(disk, ns=(1, 1))  # the file changed: a new upload
    assert upload_key(disk, "base") != keys[0]
    ok("image", "upload", str(disk), "--name", "base", "--idempotency-key", "mine",
       "--format", "qcow2")
    assert api.requests[-1].headers["Idempotency-Key"] == "mine"  # not checked: not derived
    assert api.requests[-1].url.params["format"] == "qcow2"


def test_an_upload_replayed_for_a_deleted_image_is_sent_again(api: Api, tmp_path: Path) -> None:
    disk = tmp_path / "disk.iso"
    disk.write_bytes(b"CD001" * 100)
    uploads = iter(["old", "new"])
    api.routes[("POST", "/images")] = lambda r: httpx.Response(201, json={
        "uuid": next(uploads), "name": "iso", "created_at": NOW, "updated_at": NOW,
        "status": "active"})
    # GET /images/old answers 404: that image was deleted since its upload.
    result = ok("image", "upload", str(disk), "--name", "iso", "-o", "json")
    assert json.loads(result.stdout)["uuid"] == "new"
    assert "uploading again" in result.stderr
    first, _, second = api.requests
    assert first.headers["Idempotency-Key"] == upload_key(disk, "iso")
    assert second.headers["Idempotency-Key"].startswith(upload_key(disk, "iso") + "-")


def test_image_delete_with_and_without_cascade(api: Api) -> None:
    api.routes[("DELETE", "/images/base")] = lambda r: (
        httpx.Response(202, json={"task": dict(TASK, kind="image.delete"), "resource": {}})
        if r.url.params.get("cascade") == "true" else httpx.Response(204))
    api.routes[("GET", "/tasks/t1")] = dict(TASK, kind="image.delete", state="succeeded")
    assert "delete image base: done" in ok("image", "delete", "base").stderr
    result = ok("image", "delete", "base", "--cascade", "-o", "json")
    assert json.loads(result.stdout)["state"] == "succeeded"


# --- identity ---------------------------------------------------------------------------


def test_key_create_shows_the_secret_once_with_a_warning(api: Api) -> None:
    api.routes[("POST", "/keys")] = httpx.Response(201, json={
        "uuid": "k1", "name": "ci", "access_key": "AKCI00000001", "user_uuid": "u",
        "project_uuid": "p", "enabled": True, "created_at": NOW, "updated_at": NOW,
        "secret": "the-secret"})
    result = ok("api-key", "create", "ci")
    assert "the-secret" in result.stdout and "shown only this once" in result.stderr
    # The old place still works, and says where the command moved.
    result = ok("key", "create", "ci")
    assert "the-secret" in result.stdout and "yun api-key create" in result.stderr


def test_quota_set_sends_only_the_given_limits(api: Api) -> None:
    api.routes[("PUT", "/projects/web/quota")] = {
        "project_uuid": "p", "project_name": "web",
        "lines": [{"resource": "vms", "limit": 10, "used": 2},
                  {"resource": "vcpus", "limit": -1, "used": 4}]}
    result = ok("quota", "set", "--project", "web", "--vms", "10", "--vcpus", "-1")
    assert json.loads(api.requests[0].content) == {"limits": {"vms": 10, "vcpus": -1}}
    assert "unlimited" in result.stdout
    assert yun("quota", "set", "--project", "web").exit_code == 2  # nothing to set


def test_role_commands(api: Api) -> None:
    api.routes[("GET", "/users/alice")] = {
        "uuid": "11111111-2222-3333-4444-555555555555", "name": "alice", "created_at": NOW,
        "updated_at": NOW, "department_uuid": "d"}
    api.routes[("GET", "/role-assignments")] = {"items": [], "limit": 1000}
    api.routes[("POST", "/role-assignments")] = httpx.Response(201, json={
        "uuid": "a1", "user_uuid": "u", "role": "member", "project_uuid": "p",
        "created_at": NOW})
    ok("role", "assignments", "--user", "alice")
    assert api.requests[-1].url.params["q"] == "user_uuid=11111111-2222-3333-4444-555555555555"
    ok("role", "grant", "alice", "member", "--project", "web")
    assert json.loads(api.requests[-1].content) == {"user": "alice", "role": "member",
                                                    "project": "web", "department": None}
    assert yun("role", "grant", "alice", "emperor").exit_code == 2


# --- ISO and cloud-init -----------------------------------------------------------------

PUB = ("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIMw3GzjzWbPx3oruo2tWGdasM+EE1RCB6mUpqEgskBQn "
       "alice@laptop")
SSH_KEY = {"uuid": "s1", "name": "laptop", "public_key": PUB,
           "fingerprint": "SHA256:xeDqCt2+4M2aJb5P83XNWTNrs5NyFzi2I/9VwMpWp4s",
           "user_uuid": "u", "project_uuid": "p", "created_at": NOW, "updated_at": NOW}


def test_key_add_reads_a_pub_file_and_refuses_a_bad_one_before_any_request(
        api: Api, tmp_path: Path) -> None:
    api.routes[("POST", "/ssh-keys")] = httpx.Response(201, json=SSH_KEY)
    pub = tmp_path / "id_ed25519.pub"
    pub.write_text(PUB + "\n")
    assert "SHA256:xeDq" in ok("key", "add", "laptop", str(pub)).stdout
    assert json.loads(api.requests[0].content) == {"name": "laptop", "public_key": PUB}
    ok("key", "add", "laptop", PUB)  # the key itself
    assert json.loads(api.requests[1].content)["public_key"] == PUB
    private = tmp_path / "id_ed25519"
    private.write_text("-----BEGIN OPENSSH PRIVATE KEY-----\nxx\n")
    for bad, error in ((str(private), "private key"), (str(tmp_path / "nope.pub"),
                                                       "no such file"),
                       ("ssh-rsa AAA", "not valid base64")):
        result = yun("key", "add", "laptop", bad)
        assert result.exit_code == 2 and error in result.output, result.output
    assert len(api.requests) == 2


def test_key_list_and_delete_are_ssh_keys_and_api_keys_moved(api: Api) -> None:
    api.routes[("GET", "/ssh-keys")] = {"items": [SSH_KEY], "limit": 100}
    assert "SHA256:xeDq" in ok("key", "list").stdout
    api.routes[("DELETE", "/ssh-keys/laptop")] = httpx.Response(204)
    assert "SSH key laptop deleted" in ok("key", "delete", "laptop").stderr
    api.routes[("GET", "/keys")] = {"items": [], "limit": 100}
    ok("api-key", "list")
    api.routes[("POST", "/keys/ci/rotate")] = {
        "uuid": "k1", "name": "ci", "access_key": "AKCI00000001", "user_uuid": "u",
        "project_uuid": "p", "enabled": True, "created_at": NOW, "updated_at": NOW,
        "secret": "s2"}
    assert "yun api-key rotate" in ok("key", "rotate", "ci").stderr
    assert [(r.method, r.url.path) for r in api.requests] == [
        ("GET", "/api/v1/ssh-keys"), ("DELETE", "/api/v1/ssh-keys/laptop"),
        ("GET", "/api/v1/keys"), ("POST", "/api/v1/keys/ci/rotate")]


def test_vm_create_from_an_iso_with_keys_and_user_data(api: Api, tmp_path: Path) -> None:
    api.routes[("POST", "/vms")] = httpx.Response(202, json={"task": TASK, "resource": VM})
    pub = tmp_path / "k.pub"
    pub.write_text(PUB)
    data = tmp_path / "user-data"
    data.write_text("#cloud-config\nruncmd: [touch /done]\n")
    ok("vm", "create", "web1", "--iso", "debian-iso", "--disk", "8", "--ssh-key", "laptop",
       "--ssh-key", str(pub), "--user-data", str(data), "--no-wait")
    assert json.loads(api.requests[0].content) == {
        "name": "web1", "description": "", "iso": "debian-iso", "vcpus": 1,
        "memory_mb": 256, "disk_gb": 8, "tags": {}, "ssh_keys": ["laptop", PUB],
        "user_data": "#cloud-config\nruncmd: [touch /done]\n"}
    big = tmp_path / "big"
    big.write_bytes(b"x" * 65537)
    for args, error in ((("--image", "deb", "--user-data", str(big)), "65537 bytes"),
                        (("--image", "deb", "--user-data", str(tmp_path / "nope")),
                         "No such file"),
                        (("--image", "deb", "--ssh-key", "./missing.pub"), "no such file"),
                        ((), "give --image to boot from a disk image, or --iso")):
        result = yun("vm", "create", "web2", *args)
        assert result.exit_code == 2 and error in result.output, (args, result.output)
    assert len(api.requests) == 1


def test_vm_cdrom_insert_and_eject(api: Api) -> None:
    api.routes[("PUT", "/vms/web1/cdrom")] = httpx.Response(
        202, json={"task": dict(TASK, kind="vm.cdrom"), "resource": VM})
    api.routes[("DELETE", "/vms/web1/cdrom")] = httpx.Response(
        202, json={"task": dict(TASK, kind="vm.cdrom"), "resource": VM})
    api.routes[("GET", "/tasks/t1")] = dict(TASK, state="succeeded")
    api.routes[("GET", "/vms/web1")] = VM
    assert "cdrom insert web1: done" in ok("vm", "cdrom", "insert", "web1", "tools").stderr
    assert json.loads(api.requests[0].content) == {"image": "tools"}
    assert "cdrom eject web1: done" in ok("vm", "cdrom", "eject", "web1").stderr
    assert ("DELETE", "/api/v1/vms/web1/cdrom") in [(r.method, r.url.path)
                                                   for r in api.requests]
