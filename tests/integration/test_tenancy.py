"""Tenancy: no route crosses projects, each role does what the table says, quotas hold
under concurrency, keyed requests have one effect, and every mutation is audited.

One deployment (every service real, sim nodes) serves the whole module.
"""

from __future__ import annotations

import asyncio
import re
import subprocess
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from tests.integration.tenants import PASSWORD, Tenants, build_tenants, ok
from yun.proto.components import ComponentType
from yun.testing.cluster import SimCluster

pytestmark = pytest.mark.asyncio(loop_scope="module")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def cloud(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Tenants]:
    root = tmp_path_factory.mktemp("tenancy")
    image = root / "small.qcow2"
    await asyncio.to_thread(subprocess.run, ["qemu-img", "create", "-q", "-f", "qcow2",
                                             str(image), "64M"], check=True)
    cluster = SimCluster(root, nodes=3)
    await cluster.start()
    tenants = await build_tenants(cluster, image)
    tenants.ids["image_path"] = str(image)
    try:
        yield tenants
    finally:
        await tenants.close()
        await cluster.stop()


# --- no route crosses projects ------------------------------------------------------------


def _ref_for(path: str, ids: dict[str, str]) -> dict[str, str]:
    """Path parameters naming resources of bob (project p2), which alice (p1) must not reach."""
    first = path.split("/")[3]
    refs = {"vms": ids["vm-bob"], "images": ids["img-bob"], "projects": ids["p2"],
            "users": ids["bob"], "departments": ids["d2"], "tasks": ids["task-bob"],
            "keys": ids["key-bob"], "role-assignments": ids["grant-bob"],
            "nodes": ids["node"], "auth": ids["token-bob"], "vm-groups": ids["group-bob"],
            "zones": ids["zone"], "pools": ids["pool"], "address-pools": ids["address-pool"],
            "eips": ids["eip-bob"], "volumes": ids["volume-bob"],
            "ssh-keys": ids["ssh-key-bob"]}
    values: dict[str, str] = {}
    for name in re.findall(r"{(\w+)}", path):
        values[name] = PLAIN_PARAMS.get(name, refs[first])
    return values


# A valid body for each request schema a route with a path parameter takes, so that the
# lookup, not the validation, decides the answer.
BODIES: dict[str, Any] = {
    "QuotaUpdate": {"limits": {"vms": 1}},
    "TagsReplace": {"tags": {"k": "v"}},
    "TagsUpdate": {"set": {"k": "v"}},
    "NodeLabelsUpdate": {"labels": {"k": "v"}},
    "VmQosUpdate": {"cpu": "low"},
    "PoolNodeAdd": {"node": "x"},
    "ZoneUpdate": {"description": "x"},
    "PoolUpdate": {"description": "x"},
    "PortForwardCreate": {"port": 80},
    "AddressRangeCreate": {"first_ip": "198.51.100.50", "last_ip": "198.51.100.60"},
    "AddressPoolUpdate": {"description": "x"},
    "ElasticIpBind": {"vm": "x"},
    "CdromInsert": {"image": "x"},
    "ImageUpdate": {"protected": True},
    "VolumeAttach": {"vm": "x"},
    "VolumeResize": {"size_gb": 2},
    "VolumeSnapshotCreate": {"name": "s1"},
}
# Path parameters that name no resource: a valid value of each.
PLAIN_PARAMS = {"protocol": "tcp", "port": "80", "ip": "10.64.0.20"}


def _valid_body(spec: dict[str, Any], operation: dict[str, Any]) -> Any:
    content = operation.get("requestBody", {}).get("content", {})
    schema = content.get("application/json", {}).get("schema")
    if schema is None:
        return None
    refs = [schema.get("$ref", "")] + [s.get("$ref", "") for s in schema.get("anyOf", [])]
    name = next((r.rsplit("/", 1)[-1] for r in refs if r), "")
    return BODIES.get(name, {})


async def test_no_route_crosses_projects(cloud: Tenants) -> None:
    """Every route of the OpenAPI document, called by alice (p1) on a resource of bob
    (p2) or of another department, answers as if it did not exist, or refuses."""
    admin, bob = cloud.cluster.api, cloud["bob"]
    assert admin is not None
    key = await ok(bob.post("/api/v1/keys", json={"name": "bobs"}), 201)
    cloud.ids["key-bob"] = key["uuid"]
    grants = await ok(admin.get("/api/v1/role-assignments", params={
        "q": f"user_uuid={cloud.ids['bob']}"}))
    cloud.ids["grant-bob"] = grants["items"][0]["uuid"]
    tokens = await ok(bob.get("/api/v1/auth/tokens"))
    cloud.ids["token-bob"] = tokens["items"][0]["uuid"]
    nodes = await ok(admin.get("/api/v1/nodes"))
    cloud.ids["node"] = nodes["items"][0]["uuid"]
    group = await ok(bob.post("/api/v1/vm-groups", json={"name": "grp-bob",
                                                         "policy": "affinity"}), 201)
    cloud.ids["group-bob"] = group["uuid"]
    cloud.ids["zone"] = (await ok(admin.get("/api/v1/zones/default")))["uuid"]
    cloud.ids["pool"] = (await ok(admin.get("/api/v1/pools/default")))["uuid"]
    address_pool = await ok(admin.post("/api/v1/address-pools", json={
        "name": "public", "kind": "exclusive",
        "ranges": [{"first_ip": "198.51.100.10", "last_ip": "198.51.100.20"}]}), 201)
    cloud.ids["address-pool"] = address_pool["uuid"]
    eip = await ok(bob.post("/api/v1/eips", json={"address_pool": "public",
                                                  "name": "eip-of-bob"}), 201)
    cloud.ids["eip-bob"] = eip["uuid"]
    volume = await ok(bob.post("/api/v1/volumes", json={"name": "vol-bob", "size_gb": 1}),
                      201)
    cloud.ids["volume-bob"] = volume["uuid"]
    public_key = Ed25519PrivateKey.generate().public_key().public_bytes(
        Encoding.OpenSSH, PublicFormat.OpenSSH).decode()
    ssh_key = await ok(bob.post("/api/v1/ssh-keys", json={"name": "bobs",
                                                          "public_key": public_key}), 201)
    cloud.ids["ssh-key-bob"] = ssh_key["uuid"]

    alice = cloud["alice"]
    spec = (await alice.get("/openapi.json")).json()
    checked = 0
    for path, operations in spec["paths"].items():
        if "{" not in path:
            continue
        for method in operations:
            params = _ref_for(path, cloud.ids)
            url = path.format(**params)
            if path.endswith("/data"):
                # A resumed upload's part: bytes with a well-formed range.
                resp = await alice.request(method.upper(), url, content=b"x",
                                           headers={"Content-Range": "bytes 0-0/1"})
            else:
                body: Any = _valid_body(spec, operations[method])
                resp = await alice.request(method.upper(), url, json=body)
            expected = {404} if not path.startswith("/api/v1/nodes") else {403}
            if path.startswith("/api/v1/departments") and method != "get":
                expected = {403, 404}  # only super admins change departments
            if path.startswith(("/api/v1/zones", "/api/v1/pools", "/api/v1/address-pools")):
                # Platform resources: every user sees them, only super admins change them.
                expected = {200} if method == "get" else {403}
            assert resp.status_code in expected, (method, url, resp.status_code, resp.text)
            assert "bob" not in resp.text.replace("'", ""), (method, url, resp.text)
            checked += 1
    assert checked >= 30, checked
    # Lists never show another project's resources.
    for path in ("/api/v1/vms", "/api/v1/images", "/api/v1/tasks", "/api/v1/projects",
                 "/api/v1/users", "/api/v1/keys", "/api/v1/role-assignments",
                 "/api/v1/auth/tokens"):
        text = (await alice.get(path, params={"limit": 1000})).text
        for foreign in ("vm-bob", "img-bob", cloud.ids["vm-bob"], cloud.ids["p2"],
                        cloud.ids["bob"], "vm-zed"):
            assert foreign not in text, (path, foreign)
    # A create naming another project's image finds no such image.
    resp = await alice.post("/api/v1/vms", json={"name": "sneaky", "image": "img-bob"})
    assert resp.status_code == 404 and "no image 'img-bob'" in resp.text
    # Bob still sees his own.
    assert (await bob.get(f"/api/v1/vms/{cloud.ids['vm-bob']}")).status_code == 200


async def test_user_tokens_are_refused_on_the_internal_protocol(cloud: Tenants) -> None:
    control = cloud.cluster.control
    assert control is not None
    token = cloud.users["alice"].token
    # Over a TLS connection with a domain certificate, but a user token as credential.
    _, tls = cloud.cluster.member(ComponentType.GATEWAY, "gw-test")
    async with httpx.AsyncClient(base_url=control.url, verify=tls) as http:
        for auth in (f"Bearer {token}", f"Yun {token}"):
            resp = await http.get("/internal/v1/vms", headers={"Authorization": auth})
            assert resp.status_code == 401, resp.text
    # A real component credential without a user context is refused too.
    gateway = cloud.cluster.gateway
    assert gateway is not None
    client = gateway.membership.client(next(iter(gateway.membership.peers.values())))
    resp = await client.http.get("/internal/v1/vms", headers=client.headers())
    assert resp.status_code == 401 and "X-Yun-Context" in resp.text


# --- the role matrix ----------------------------------------------------------------------

ALLOW, DENY = True, False
ROLES = ("rita", "alice", "paul", "dora", "admin")  # reader, member, project/dept/super admin

# operation → who may do it, in ROLES order
MATRIX: dict[str, tuple[bool, ...]] = {
    "list_vms":           (ALLOW, ALLOW, ALLOW, ALLOW, ALLOW),
    "create_vm":          (DENY, ALLOW, ALLOW, ALLOW, ALLOW),
    "stop_vm":            (DENY, ALLOW, ALLOW, ALLOW, ALLOW),
    "tag_vm":             (DENY, ALLOW, ALLOW, ALLOW, ALLOW),
    "grant_in_project":   (DENY, DENY, ALLOW, ALLOW, ALLOW),
    "read_audit":         (DENY, DENY, ALLOW, ALLOW, ALLOW),
    "create_project":     (DENY, DENY, DENY, ALLOW, ALLOW),
    "create_user":        (DENY, DENY, DENY, ALLOW, ALLOW),
    "set_quota":          (DENY, DENY, DENY, ALLOW, ALLOW),
    "list_nodes":         (DENY, DENY, DENY, DENY, ALLOW),
    "create_department":  (DENY, DENY, DENY, DENY, ALLOW),
}


async def _operation(cloud: Tenants, http: httpx.AsyncClient, op: str, who: str
                     ) -> httpx.Response:
    tag = uuid.uuid4().hex[:6]
    p1 = cloud.ids["p1"]
    if op == "list_vms":
        return await http.get("/api/v1/vms")
    if op == "create_vm":
        return await http.post("/api/v1/vms", json={"name": f"m-{who}-{tag}",
                                                     "image": cloud.ids["img-alice"]})
    if op == "stop_vm":
        return await http.post(f"/api/v1/vms/{cloud.ids['vm-alice']}/stop",
                               json={"force": True, "timeout": 0})
    if op == "tag_vm":
        return await http.patch(f"/api/v1/vms/{cloud.ids['vm-alice']}/tags",
                                json={"set": {"touched": who}})
    if op == "grant_in_project":
        return await http.post("/api/v1/role-assignments", json={
            "user": "bob", "role": "reader", "project": p1})
    if op == "read_audit":
        return await http.get("/api/v1/audit")
    if op == "create_project":
        return await http.post("/api/v1/projects", json={"name": f"pr-{tag}",
                                                         "department": cloud.ids["d1"]})
    if op == "create_user":
        return await http.post("/api/v1/users", json={
            "name": f"u-{tag}", "password": PASSWORD, "department": cloud.ids["d1"]})
    if op == "set_quota":
        return await http.put(f"/api/v1/projects/{p1}/quota",
                              json={"limits": {"images": 30}})
    if op == "list_nodes":
        return await http.get("/api/v1/nodes")
    if op == "create_department":
        return await http.post("/api/v1/departments", json={"name": f"dep-{tag}"})
    raise AssertionError(op)


@pytest.mark.parametrize("op", list(MATRIX))
async def test_role_matrix(cloud: Tenants, op: str) -> None:
    for who, allowed in zip(ROLES, MATRIX[op], strict=True):
        http = cloud.cluster.api if who == "admin" else cloud[who]
        assert http is not None
        resp = await _operation(cloud, http, op, who)
        if allowed:
            assert resp.status_code < 400, (op, who, resp.status_code, resp.text)
        else:
            assert resp.status_code == 403, (op, who, resp.status_code, resp.text)
            assert "may not" in resp.json()["detail"] or "only" in resp.json()["detail"]


# --- quotas -------------------------------------------------------------------------------


async def test_quota_race_accepts_exactly_the_limit(cloud: Tenants) -> None:
    admin = cloud.cluster.api
    assert admin is not None
    project = await ok(admin.post("/api/v1/projects", json={
        "name": "race", "department": cloud.ids["d1"]}), 201)
    await ok(admin.put(f"/api/v1/projects/{project['uuid']}/quota",
                       json={"limits": {"vms": 10, "vcpus": -1}}))
    await ok(admin.post("/api/v1/role-assignments", json={
        "user": "alice", "role": "member", "project": "race"}), 201)
    token = await cloud.cluster.login("alice", PASSWORD, "race")
    async with cloud.cluster.client(token) as http:
        data = await asyncio.to_thread(Path(cloud.ids["image_path"]).read_bytes)
        image = await ok(http.post("/api/v1/images", params={"name": "race-img"},
                                   content=data,
                                   headers={"Content-Type": "application/octet-stream"}), 201)
        answers = await asyncio.gather(*(http.post("/api/v1/vms", json={
            "name": f"r{i}", "image": image["uuid"]}) for i in range(50)))
        codes = [a.status_code for a in answers]
        assert codes.count(202) == 10, codes
        refused = [a for a in answers if a.status_code != 202]
        assert {a.status_code for a in refused} == {409}
        detail = refused[0].json()["detail"]
        assert "quota exceeded" in detail and "10 vms" in detail and "uses 10" in detail
        quota = await ok(http.get("/api/v1/quota"))
        used = {line["resource"]: line["used"] for line in quota["lines"]}
        assert used["vms"] == 10 and used["vcpus"] == 10 and used["images"] == 1
        listed = await ok(http.get("/api/v1/vms", params={"count": "true"}))
        assert listed["total"] == 10
        for accepted in answers:
            if accepted.status_code == 202:
                await ok(http.get(f"/api/v1/tasks/{accepted.json()['task']['uuid']}",
                                  params={"wait": 30}))
        # Deleting gives the quota back.
        tasks = [(await ok(http.delete(f"/api/v1/vms/{vm['uuid']}"), 202))["task"]["uuid"]
                 for vm in listed["items"]]
        for task in tasks:
            assert (await ok(http.get(f"/api/v1/tasks/{task}", params={"wait": 30})))[
                "state"] == "succeeded"
        quota = await ok(http.get("/api/v1/quota"))
        assert {line["resource"]: line["used"] for line in quota["lines"]}["vms"] == 0


# --- idempotency --------------------------------------------------------------------------


async def test_keyed_create_and_delete_repeated_concurrently_have_one_effect(
        cloud: Tenants) -> None:
    alice = cloud["alice"]
    key = {"Idempotency-Key": f"create-{uuid.uuid4()}"}
    body = {"name": "once", "image": cloud.ids["img-alice"]}
    answers = await asyncio.gather(*(alice.post("/api/v1/vms", json=body, headers=key)
                                     for _ in range(20)))
    assert {a.status_code for a in answers} == {202}, [a.text for a in answers]
    assert len({a.json()["resource"]["uuid"] for a in answers}) == 1
    assert sum(a.headers.get("Idempotent-Replayed") == "true" for a in answers) == 19
    vms = await ok(alice.get("/api/v1/vms", params={"q": "name=once", "count": "true"}))
    assert vms["total"] == 1
    vm = vms["items"][0]["uuid"]
    await ok(alice.get(f"/api/v1/tasks/{answers[0].json()['task']['uuid']}",
                       params={"wait": 30}))
    key = {"Idempotency-Key": f"delete-{uuid.uuid4()}"}
    answers = await asyncio.gather(*(alice.delete(f"/api/v1/vms/{vm}", headers=key)
                                     for _ in range(20)))
    assert {a.status_code for a in answers} == {202}
    assert len({a.json()["task"]["uuid"] for a in answers}) == 1
    # The same key with another body is refused; another user's same key is their own.
    resp = await alice.post("/api/v1/vms", json={**body, "name": "other"},
                            headers={"Idempotency-Key": key["Idempotency-Key"]})
    assert resp.status_code == 422 and "different request" in resp.text


async def test_retried_keyed_upload_makes_one_image(cloud: Tenants) -> None:
    alice = cloud["alice"]
    data = await asyncio.to_thread(Path(cloud.ids["image_path"]).read_bytes)
    headers = {"Idempotency-Key": f"up-{uuid.uuid4()}",
               "Content-Type": "application/octet-stream"}
    first = await ok(alice.post("/api/v1/images", params={"name": "keyed"}, content=data,
                                headers=headers), 201)
    again = await ok(alice.post("/api/v1/images", params={"name": "keyed"}, content=data,
                                headers=headers), 201)
    assert first["uuid"] == again["uuid"]
    listed = await ok(alice.get("/api/v1/images", params={"q": "name=keyed",
                                                          "count": "true"}))
    assert listed["total"] == 1


async def test_power_action_already_done_says_so(cloud: Tenants) -> None:
    alice = cloud["alice"]
    vm = cloud.ids["vm-alice"]
    state = (await ok(alice.get(f"/api/v1/vms/{vm}")))["state"]
    if state != "running":
        accepted = await ok(alice.post(f"/api/v1/vms/{vm}/start", params={"wait": 30}))
        assert accepted["task"] is None or accepted["task"]["state"] == "succeeded"
    resp = await alice.post(f"/api/v1/vms/{vm}/start")
    assert resp.status_code == 200, resp.text
    assert resp.json()["task"] is None and "already running" in resp.json()["message"]


# --- queries and tags ---------------------------------------------------------------------


async def test_queries_and_tags(cloud: Tenants) -> None:
    admin = cloud.cluster.api
    assert admin is not None
    page = await ok(admin.get("/api/v1/vms", params={
        "q": "tag:owner in (alice,zed) and state in (running,stopped)", "count": "true",
        "sort": "-name"}))
    names = [v["name"] for v in page["items"]]
    assert names == ["vm-zed", "vm-alice"], names
    resp = await admin.get("/api/v1/vms", params={"q": "vcpus>=2 and (state=running"})
    assert resp.status_code == 400 and "position" in resp.json()["detail"]
    resp = await admin.get("/api/v1/vms", params={"q": "name='x'; drop table vms; --"})
    assert resp.status_code == 400
    assert (await ok(admin.get("/api/v1/vms", params={"count": "true"})))["total"] >= 3
    # Tags: set, query, platform keys refused.
    alice = cloud["alice"]
    vm = cloud.ids["vm-alice"]
    tags = await ok(alice.patch(f"/api/v1/vms/{vm}/tags",
                                json={"set": {"env": "prod"}, "remove": []}))
    assert tags["tags"]["env"] == "prod"
    found = await ok(alice.get("/api/v1/vms", params={"q": "tag:env=prod"}))
    assert [v["uuid"] for v in found["items"]] == [vm]
    resp = await alice.put(f"/api/v1/vms/{vm}/tags", json={"tags": {"sys:ha": "1"}})
    assert resp.status_code == 422 and "reserved" in resp.text
    # Cursor pagination walks every VM once.
    seen: list[str] = []
    cursor = None
    while True:
        params: dict[str, Any] = {"limit": 1}
        if cursor:
            params["cursor"] = cursor
        page = await ok(admin.get("/api/v1/vms", params=params))
        seen += [v["uuid"] for v in page["items"]]
        cursor = page["next_cursor"]
        if not cursor:
            break
    assert len(seen) == len(set(seen)) >= 3


# --- audit --------------------------------------------------------------------------------


async def test_mutations_are_audited(cloud: Tenants) -> None:
    paul = cloud["paul"]  # the project admin of p1 reads p1's audit log
    page = await ok(paul.get("/api/v1/audit", params={
        "q": "action=vm.create and user_name=alice and result=ok", "count": "true"}))
    assert page["total"] >= 1
    record = page["items"][0]
    assert record["project_uuid"] == cloud.ids["p1"] and record["result"] == "ok"
    assert record["source_ip"] == "127.0.0.1" and record["request_id"]
    assert record["resource_uuid"]
    assert all(r["project_uuid"] == cloud.ids["p1"] for r in (await ok(paul.get(
        "/api/v1/audit", params={"limit": 1000})))["items"])
    # A refused mutation is recorded with its status.
    await cloud["rita"].post("/api/v1/vms", json={"name": "nope",
                                                  "image": cloud.ids["img-alice"]})
    page = await ok(paul.get("/api/v1/audit", params={"q": "user_name=rita and status=403"}))
    assert page["items"] and page["items"][0]["result"] == "error"


# --- cascade ------------------------------------------------------------------------------


async def test_project_delete_refuses_then_cascades(cloud: Tenants) -> None:
    admin = cloud.cluster.api
    assert admin is not None
    resp = await admin.delete(f"/api/v1/projects/{cloud.ids['p3']}")
    assert resp.status_code == 409 and "vm-zed" in resp.text and "img-zed" in resp.text
    accepted = await ok(admin.delete(f"/api/v1/projects/{cloud.ids['p3']}",
                                     params={"cascade": "true"}), 202)
    task = await ok(admin.get(f"/api/v1/tasks/{accepted['task']['uuid']}",
                              params={"wait": 60}))
    assert task["state"] == "succeeded", task
    for path in (f"/api/v1/projects/{cloud.ids['p3']}", f"/api/v1/vms/{cloud.ids['vm-zed']}",
                 f"/api/v1/images/{cloud.ids['img-zed']}"):
        assert (await admin.get(path)).status_code == 404, path
    # zed's token was scoped to the deleted project: it no longer works once the gateway's
    # auth cache (a few seconds) has let go of it.
    deadline = asyncio.get_running_loop().time() + 20
    while (status := (await cloud["zed"].get("/api/v1/vms")).status_code) == 200:
        assert asyncio.get_running_loop().time() < deadline, "zed's token still works"
        await asyncio.sleep(0.5)
    assert status in (401, 404)


async def test_user_delete_refuses_while_keys_exist(cloud: Tenants) -> None:
    admin = cloud.cluster.api
    assert admin is not None
    made = await ok(admin.post("/api/v1/users", json={
        "name": "temp", "password": PASSWORD, "department": cloud.ids["d1"]}), 201)
    await ok(admin.post("/api/v1/role-assignments", json={
        "user": "temp", "role": "member", "project": "p1"}), 201)
    token = await cloud.cluster.login("temp", PASSWORD, "p1")
    async with cloud.cluster.client(token) as temp:
        await ok(temp.post("/api/v1/keys", json={"name": "k1"}), 201)
    resp = await admin.delete(f"/api/v1/users/{made['uuid']}")
    assert resp.status_code == 409 and "k1" in resp.text
    await ok(admin.delete(f"/api/v1/users/{made['uuid']}", params={"cascade": "true"}), 204)
    async with cloud.cluster.client(token) as temp:
        assert (await temp.get("/api/v1/vms")).status_code == 401


async def test_department_admin_stops_at_the_department(cloud: Tenants) -> None:
    dora = cloud["dora"]  # administers d1
    # Projects of d1 (p1, p2) are hers to see and change; d2's are not even visible.
    names = {p["name"] for p in (await ok(dora.get("/api/v1/projects")))["items"]}
    assert {"p1", "p2"} <= names and "p3" not in names
    assert (await dora.get(f"/api/v1/vms/{cloud.ids['vm-bob']}")).status_code == 200
    resp = await dora.post("/api/v1/projects", json={"name": "x-d2",
                                                     "department": cloud.ids["d2"]})
    assert resp.status_code == 404 and "no department" in resp.text
    resp = await dora.post("/api/v1/role-assignments", json={
        "user": "zed", "role": "member", "project": "p1"})
    assert resp.status_code == 404 and "no user 'zed'" in resp.text
    resp = await dora.post("/api/v1/role-assignments", json={
        "user": "alice", "role": "super_admin"})
    assert resp.status_code == 403 and "only a super admin" in resp.text
    # A member cannot raise themselves.
    resp = await cloud["alice"].post("/api/v1/role-assignments", json={
        "user": "alice", "role": "project_admin", "project": "p1"})
    assert resp.status_code == 403
