"""Bad input gets a clear 4xx problem and changes nothing."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from tests.integration.conftest import upload
from tests.problems import assert_problem
from yun.config import NodeSettings
from yun.proto.auth import issue_credential
from yun.proto.client import PeerClient
from yun.proto.components import ComponentType
from yun.proto.membership import JoinRefused, Membership
from yun.proto.pki import DomainCA
from yun.testing.cluster import SimCluster


async def test_wrong_domain_secret_is_refused(cluster: SimCluster, tmp_path: Path) -> None:
    assert cluster.domain is not None
    settings = NodeSettings(name="intruder", domain_secret="not-the-secret",
                            domain_url=cluster.domain.url, state_dir=tmp_path)
    membership = Membership(settings, ComponentType.NODE, "https://127.0.0.1:1")
    # The join is mutual: the component finds the server's proof does not match its own
    # (wrong) secret and stops there; a client that goes on anyway gets 403 (see
    # test_domain_trust).
    with pytest.raises(JoinRefused, match="did not prove knowledge of the domain secret"):
        await membership.start()
    members = [m.name for m in cluster.domain.registry.members.values()]
    assert "intruder" not in members


async def test_association_table(cluster: SimCluster) -> None:
    # Components that joined after another are learnt at its next heartbeat: converged,
    # each knows exactly the types it works with (no more: a node never sees a gateway).
    await cluster.wait_association()
    node = cluster.node_services[0].agent.membership
    assert {p.type for p in node.peers.values()} == {ComponentType.CONTROL,
                                                     ComponentType.STORAGE}
    assert cluster.gateway is not None and cluster.control is not None
    assert {p.type for p in cluster.gateway.membership.peers.values()} == {
        ComponentType.CONTROL}
    assert {p.type for p in cluster.control.ctx.membership.peers.values()} == {
        ComponentType.NODE, ComponentType.STORAGE, ComponentType.GATEWAY}


async def test_internal_protocol_refuses_strangers_and_malformed_messages(
        cluster: SimCluster, tmp_path: Path) -> None:
    assert cluster.control is not None and cluster.domain is not None
    url = cluster.control.url
    report = "/internal/v1/nodes/report"
    node_id = cluster.node_services[0].agent.node_id
    _, tls = cluster.member(ComponentType.NODE, node_id)

    async def post(client: PeerClient, **kwargs: object) -> httpx.Response:
        async with client:
            return await client.http.post(report, **kwargs)  # type: ignore[arg-type]

    # No credential, one minted by another CA, and one of the wrong component type.
    assert_problem(await post(PeerClient(url, None, tls), json={}), 401,
                   "missing 'Yun' credential")
    stranger = DomainCA.load_or_create(tmp_path / "other-ca", "other")
    forged_signer, _ = cluster.member(ComponentType.NODE, node_id)
    forged_signer.credential = issue_credential(
        stranger.key, node_id, "node", forged_signer.key.public_key(), 3600)
    assert_problem(await post(PeerClient(url, forged_signer, tls), json={}), 401,
                   "not signed by this domain's CA")
    gateway = cluster.member_client(url, ComponentType.GATEWAY, "gw")
    assert_problem(await post(gateway, json={}), 403, "gateway component may not")
    # A node's malformed report: named fields, nothing recorded.
    body = assert_problem(await post(
        cluster.member_client(url, ComponentType.NODE, node_id), json={
            "node_id": node_id, "name": "x", "url": "u", "host": {"vcpus": "many"},
            "domains": [], "surprise": 1}), 422)
    fields = {e["field"] for e in body["errors"]}
    assert "surprise" in fields and "host.vcpus" in fields
    assert_problem(await post(cluster.member_client(url, ComponentType.NODE, node_id),
                              content=b"{not json",
                              headers={"Content-Type": "application/json"}), 422)
    # A node may only report for itself.
    good = cluster.node_services[0].agent
    payload = {"node_id": node_id, "name": "n", "url": "http://x",
               "host": (await good.host_info()).model_dump(), "domains": []}
    assert_problem(await post(cluster.member_client(url, ComponentType.NODE, "someone-else"),
                              json=payload), 403, "may not report for node")
    # An unsupported protocol version.
    assert_problem(await post(cluster.member_client(url, ComponentType.NODE, node_id),
                              json=payload, headers={"X-Yun-Protocol": "99"}), 400,
                   "protocol version 99")


async def test_api_bad_requests(cluster: SimCluster, small_qcow2: Path, tmp_path: Path
                                ) -> None:
    api = cluster.api
    assert api is not None and cluster.gateway is not None
    async with httpx.AsyncClient(base_url=cluster.gateway.url) as anonymous:
        assert_problem(await anonymous.get("/api/v1/vms"), 401, "Bearer")
        assert_problem(await anonymous.get("/api/v1/vms", headers={
            "Authorization": "Bearer wrong"}), 401, "not valid")

    await upload(cluster, small_qcow2)
    cases = [
        ({"name": "x" * 64, "image": "img"}, "name"),
        ({"name": "bad name!", "image": "img"}, "name"),
        ({"name": "ok", "image": "img", "vcpus": 0}, "vcpus"),
        ({"name": "ok", "image": "img", "memory_mb": "lots"}, "memory_mb"),
        ({"name": "ok", "image": "img", "colour": "blue"}, "colour"),
        ({"image": "img"}, "name"),
    ]
    for body, field in cases:
        problem = assert_problem(await api.post("/api/v1/vms", json=body), 422)
        assert field in {e["field"] for e in problem["errors"]}, problem
    assert_problem(await api.post("/api/v1/vms", content=b"[1,2", headers={
        "Content-Type": "application/json"}), 422)
    assert_problem(await api.post("/api/v1/vms", json={"name": "ok", "image": "nope"}),
                   404, "no image 'nope'")
    assert_problem(await api.post("/api/v1/vms/00000000-0000-0000-0000-000000000000/start"),
                   404)
    assert_problem(await api.get("/api/v1/vms", params={"limit": 0}), 422)
    assert (await api.get("/api/v1/vms", params={"count": "true"})).json()["total"] == 0

    # An upload that is not an image: refused, and no image record or file is left.
    text = tmp_path / "notes.txt"
    text.write_text("this is not a disk image\n" * 100)
    resp = await api.post("/api/v1/images", params={"name": "notes"},
                          content=text.read_bytes())
    assert_problem(resp, 422, "not a disk image")
    images = (await api.get("/api/v1/images")).json()["items"]
    assert [i["name"] for i in images] == ["img"]
    assert cluster.storage is not None
    stored = list((cluster.storage.store.root / "images").iterdir())
    assert len([p for p in stored if p.suffix != ".json"]) == 1
    assert list((cluster.storage.store.root / "tmp").iterdir()) == []
    assert_problem(await api.post("/api/v1/images", params={"name": "x" * 64},
                                  content=b"abc"), 422)
    assert_problem(await api.post("/api/v1/images", params={"name": "r", "format": "floppy"},
                                  content=b"abc"), 422)


async def test_idempotency_key(cluster: SimCluster, small_qcow2: Path) -> None:
    api = cluster.api
    assert api is not None
    await upload(cluster, small_qcow2)
    headers = {"Idempotency-Key": "create-web-1"}
    first = await api.post("/api/v1/vms", json={"name": "web", "image": "img"},
                           headers=headers)
    again = await api.post("/api/v1/vms", json={"name": "web", "image": "img"},
                           headers=headers)
    assert first.status_code == again.status_code == 202
    assert first.json()["resource"]["uuid"] == again.json()["resource"]["uuid"]
    assert (await api.get("/api/v1/vms", params={"count": "true"})).json()["total"] == 1
    assert_problem(await api.post("/api/v1/vms", json={"name": "other", "image": "img"},
                                  headers=headers), 422, "different request")
    await cluster.wait_task(first.json()["task"]["uuid"])
    # Repeating a stop is harmless: the second one has nothing to do and says so.
    vm_uuid = first.json()["resource"]["uuid"]
    resp = await api.post(f"/api/v1/vms/{vm_uuid}/stop")
    assert (await cluster.wait_task(resp.json()["task"]["uuid"]))["state"] == "succeeded"
    again = await api.post(f"/api/v1/vms/{vm_uuid}/stop")
    assert again.status_code == 200 and again.json()["task"] is None
    assert "already stopped" in again.json()["message"]
    assert (await api.get(f"/api/v1/vms/{vm_uuid}")).json()["state"] == "stopped"


async def test_hostile_input_gets_a_clear_4xx_and_changes_nothing(
        cluster: SimCluster, small_qcow2: Path) -> None:
    """Over-long names, invalid UTF-8, a 100 MiB JSON body, SQL metacharacters and
    unbalanced parentheses in a query: each refused with a problem naming what is wrong."""
    api = cluster.api
    assert api is not None and cluster.control is not None
    await upload(cluster, small_qcow2)

    async def audit_count() -> int:
        page = (await api.get("/api/v1/audit", params={"count": "true", "limit": 1})).json()
        return int(page["total"])

    before = await audit_count()
    problem = assert_problem(await api.post("/api/v1/vms", json={
        "name": "n" * 300, "image": "img"}), 422)
    assert "name" in {e["field"] for e in problem["errors"]}
    assert_problem(await api.post("/api/v1/projects", json={"name": "p" * 64}), 422)
    assert_problem(await api.post("/api/v1/users", json={
        "name": "u", "password": "x" * 10_000}), 422)
    # Invalid UTF-8 in a JSON body, a path and a query.
    resp = await api.post("/api/v1/vms", content=b'{"name": "\xff\xfe", "image": "img"}',
                          headers={"Content-Type": "application/json"})
    assert resp.status_code in (400, 422) and "UTF-8" in resp.text, resp.text
    resp = await api.get("/api/v1/vms/%FF%FE")
    assert resp.status_code in (400, 422), resp.text
    resp = await api.get("/api/v1/vms?q=name%3D%FF")
    assert resp.status_code == 400 and "UTF-8" in resp.text, resp.text
    # 100 MiB of JSON is refused by its length before it is read.
    huge = b'{"name": "big", "image": "img", "description": "' + b"a" * (100 << 20) + b'"}'
    resp = await api.post("/api/v1/vms", content=huge,
                          headers={"Content-Type": "application/json"})
    assert_problem(resp, 413, "larger than")
    del huge
    # Queries: SQL metacharacters and broken parentheses.
    for q, fragment in (("name='a'; DROP TABLE vms; --", "q"),
                        ("(state=running", "unbalanced"),
                        ("state=running)", "unexpected"),
                        ("vcpus>=", "expected a value"),
                        ("nosuchfield=1", "nosuchfield"),
                        ("vcpus>=two", "two")):
        resp = await api.get("/api/v1/vms", params={"q": q})
        assert resp.status_code == 400, (q, resp.text)
        assert fragment in resp.json()["detail"], (q, resp.json())
    resp = await api.get("/api/v1/vms", params={"sort": "-nosuch"})
    assert resp.status_code == 400 and "nosuch" in resp.text
    resp = await api.get("/api/v1/vms", params={"cursor": "garbage!!"})
    assert resp.status_code == 400 and "cursor" in resp.text
    # Nothing was made, and the VM table still answers.
    page = (await api.get("/api/v1/vms", params={"count": "true"})).json()
    assert page["total"] == 0
    projects = (await api.get("/api/v1/projects", params={"count": "true"})).json()
    assert [p["name"] for p in projects["items"]] == ["default"]
    # Refused mutations that reached the control server are audited as errors.
    assert await audit_count() >= before
