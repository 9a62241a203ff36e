"""Address pools and elastic IPs (F-ADDR) through the gateway, the SDK and the `yun` CLI,
against a real control server over sim nodes: both kinds of pool, online growth, ranges
in use, exhaustion, concurrent allocation (SQLite and PostgreSQL), the project quota,
bad input refused with nothing changed, and elastic IPs kept inside their project."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import httpx

from tests.integration.conftest import shown, upload
from yun.testing.cluster import SimCluster


def api(cluster: SimCluster) -> httpx.AsyncClient:
    assert cluster.api is not None
    return cluster.api


async def ok(resp: Any, *status: int) -> Any:
    resp = await resp
    assert resp.status_code in (status or (200, 201, 202, 204)), resp.text
    return resp.json() if resp.content else None


async def refused(resp: Any, status: int, *texts: str) -> str:
    """The detail of an error answer, which must name each of ``texts``."""
    resp = await resp
    assert resp.status_code == status, resp.text
    detail = resp.json()["detail"]
    for text in texts:
        assert text in detail, detail
    return str(detail)


async def set_quota(cluster: SimCluster, limit: int) -> None:
    project = (await ok(api(cluster).get("/api/v1/quota")))["project_uuid"]
    await ok(api(cluster).put(f"/api/v1/projects/{project}/quota",
                              json={"limits": {"public_ips": limit}}))


async def test_pools_of_both_kinds_grow_and_keep_ranges_in_use(
        cli, cluster: SimCluster) -> None:  # type: ignore[no-untyped-def]
    code, out = await cli("address-pool", "create", "pub", "--kind", "exclusive",
                          "--range", "203.0.113.10-203.0.113.11")
    assert code == 0, out
    pub = await shown(cli, "address-pool", "show", "pub")
    # No --network: the smallest network holding the first range.
    assert (pub["kind"], pub["network"], pub["total"], pub["used"], pub["free"]) == (
        "exclusive", "203.0.113.10/31", 2, 0, 2)
    code, out = await cli("address-pool", "create", "nat", "--kind", "shared",
                          "--network", "198.51.100.0/24", "--range", "198.51.100.5",
                          "--ports", "20000-20099")
    assert code == 0, out
    nat = await shown(cli, "address-pool", "show", "nat")
    assert (nat["kind"], nat["network"], nat["total"]) == ("shared", "198.51.100.0/24", 100)
    assert nat["ranges"][0]["first_port"] == 20000

    await set_quota(cluster, 10)
    first = await shown(cli, "eip", "allocate", "--pool", "pub", "--name", "e1")
    second = await shown(cli, "eip", "allocate", "--pool", "pub")
    assert (first["ip"], second["ip"]) == ("203.0.113.10", "203.0.113.11")
    assert second["name"] == "eip-203.0.113.11"
    # Exhausted: a clear 409, nothing taken.
    code, out = await cli("eip", "allocate", "--pool", "pub")
    assert code == 1 and "409" in out and "no free address left" in out, out
    # A shared pool hands out ports, never whole addresses.
    detail = await refused(api(cluster).post("/api/v1/eips", json={"address_pool": "nat"}),
                           400, "nat is shared")
    assert "exclusive" in detail

    # Grown online: the next allocation takes the new range at once. The network is
    # the pool's own (/31 after derivation), so the new range must fit it: a wider pool.
    code, out = await cli("address-pool", "add-range", "pub", "203.0.113.12-203.0.113.13")
    assert code == 1 and "outside the pool's network 203.0.113.10/31" in out, out
    code, out = await cli("address-pool", "create", "wide", "--kind", "exclusive",
                          "--network", "192.0.2.0/24", "--range", "192.0.2.10")
    assert code == 0, out
    await shown(cli, "eip", "allocate", "--pool", "wide", "--name", "w1")
    code, out = await cli("eip", "allocate", "--pool", "wide")
    assert code == 1 and "no free address left" in out, out
    code, out = await cli("address-pool", "add-range", "wide", "192.0.2.20-192.0.2.29")
    assert code == 0 and "added" in out, out
    w2 = await shown(cli, "eip", "allocate", "--pool", "wide", "--name", "w2")
    assert w2["ip"] == "192.0.2.20"
    wide = await shown(cli, "address-pool", "show", "wide")
    assert (wide["total"], wide["used"], wide["free"]) == (11, 2, 9)
    assert [r["used"] for r in wide["ranges"]] == [1, 1]

    # A range in use is kept, naming who holds it; once released it goes.
    code, out = await cli("address-pool", "remove-range", "wide", "192.0.2.20-192.0.2.29")
    assert code == 1 and "409" in out and "192.0.2.20 (elastic IP w2" in out, out
    code, out = await cli("eip", "release", "w2")
    assert code == 0 and "released" in out, out
    code, out = await cli("address-pool", "remove-range", "wide", "192.0.2.20-192.0.2.29")
    assert code == 0 and "removed" in out, out
    assert (await shown(cli, "address-pool", "show", "wide"))["total"] == 1
    code, out = await cli("address-pool", "remove-range", "wide", "192.0.2.50-192.0.2.60")
    assert code == 1 and "404" in out and "192.0.2.10-192.0.2.10" in out, out

    # Delete: refused while addresses are handed out or a compute pool links to it.
    code, out = await cli("address-pool", "delete", "wide")
    assert code == 1 and "409" in out and "release them first" in out, out
    code, out = await cli("eip", "release", "w1")
    assert code == 0, out
    code, out = await cli("pool", "create", "mono", "--network-mode", "sandbox-mono",
                          "--address-pool", "wide")
    assert code == 0, out
    assert (await shown(cli, "pool", "show", "mono"))["address_pool"] == "wide"
    assert (await shown(cli, "address-pool", "show", "wide"))["compute_pools"] == ["mono"]
    code, out = await cli("address-pool", "delete", "wide")
    assert code == 1 and "409" in out and "compute pool(s) mono" in out, out
    # An empty pool changes its link freely; a mode taking no address pool drops it.
    code, out = await cli("pool", "update", "mono", "--address-pool", "pub")
    assert code == 0, out
    assert (await shown(cli, "pool", "show", "mono"))["address_pool"] == "pub"
    code, out = await cli("pool", "update", "mono", "--network-mode", "sandbox-share")
    assert code == 1 and "pub is exclusive" in out, out
    code, out = await cli("pool", "update", "mono", "--network-mode", "sandbox-share",
                          "--address-pool", "nat")
    assert code == 0, out
    code, out = await cli("pool", "update", "mono", "--network-mode", "sandbox-private")
    assert code == 0, out
    changed = await shown(cli, "pool", "show", "mono")
    assert (changed["network_mode"], changed["address_pool"]) == ("sandbox-private", None)
    code, out = await cli("pool", "delete", "mono")
    assert code == 0, out
    code, out = await cli("address-pool", "delete", "wide")
    assert code == 0 and "deleted" in out, out

    listed = await shown(cli, "address-pool", "list", "-q", "kind=shared")
    assert [p["name"] for p in listed["items"]] == ["nat"]
    # Every change is audited under its resource.
    audit = await ok(api(cluster).get("/api/v1/audit", params={
        "q": "resource_type=address_pool", "limit": 100}))
    actions = {a["action"] for a in audit["items"]}
    assert {"address_pool.create", "address_pool.add_range", "address_pool.remove_range",
            "address_pool.delete"} <= actions, actions


async def test_bad_input_is_refused_and_changes_nothing(cluster: SimCluster) -> None:
    http = api(cluster)
    await ok(http.post("/api/v1/address-pools", json={
        "name": "base", "kind": "exclusive", "network": "203.0.113.0/24",
        "ranges": [{"first_ip": "203.0.113.10", "last_ip": "203.0.113.20"}]}), 201)
    await ok(http.post("/api/v1/address-pools", json={
        "name": "ports", "kind": "shared", "network": "198.51.100.0/24",
        "ranges": [{"first_ip": "198.51.100.1", "last_ip": "198.51.100.1",
                    "first_port": 1000, "last_port": 1999}]}), 201)
    before = await ok(http.get("/api/v1/address-pools"))

    def pool(kind: str = "exclusive", network: str | None = "10.9.0.0/24",
             **range_: Any) -> dict[str, Any]:
        body: dict[str, Any] = {"name": "bad", "kind": kind, "ranges": [
            {"first_ip": "10.9.0.10", "last_ip": "10.9.0.20", **range_}]}
        if network:
            body["network"] = network
        return body

    cases: list[tuple[dict[str, Any], int, tuple[str, ...]]] = [
        # Overlapping a range of another pool, and two ranges of the request.
        (pool(network="203.0.113.0/24", first_ip="203.0.113.15", last_ip="203.0.113.30"),
         409, ("203.0.113.15-203.0.113.30 overlaps range 203.0.113.10-203.0.113.20 of "
               "address pool base",)),
        ({"name": "bad", "kind": "exclusive", "network": "10.9.0.0/24", "ranges": [
            {"first_ip": "10.9.0.10", "last_ip": "10.9.0.20"},
            {"first_ip": "10.9.0.20", "last_ip": "10.9.0.25"}]}, 409,
         ("ranges 10.9.0.10-10.9.0.20 and 10.9.0.20-10.9.0.25 overlap",)),
        (pool(last_ip="10.9.1.10"), 400, ("10.9.1.10", "outside the pool's network "
                                                        "10.9.0.0/24")),
        (pool(first_ip="10.9.0.30"), 400, ("first address is after the last",)),
        (pool(first_ip="10.9.0.0"), 400, ("10.9.0.0, the network address",)),
        (pool(last_ip="10.9.0.255"), 400, ("10.9.0.255, the broadcast address",)),
        (pool(first_ip="not-an-ip"), 400, ("'not-an-ip' is not an IPv4 address",)),
        (pool(network="10.9.0.1/24"), 400, ("network '10.9.0.1/24'", "host bits set")),
        (pool("shared", first_port=1000, last_port=70000), 400,
         ("port 70000 is outside 1..65535",)),
        (pool("shared", first_port=0, last_port=10), 400, ("port 0 is outside 1..65535",)),
        (pool("shared", first_port=2000, last_port=1000), 400,
         ("first port 2000 is after the last 1000",)),
        (pool("shared"), 400, ("a shared pool needs its port range",)),
        (pool(first_port=1000, last_port=2000), 400,
         ("ports are given only in a shared pool",)),
    ]
    for body, status, texts in cases:
        await refused(http.post("/api/v1/address-pools", json=body), status, *texts)
    # The same checks when growing a pool.
    await refused(http.post("/api/v1/address-pools/base/ranges", json={
        "first_ip": "203.0.113.20", "last_ip": "203.0.113.25"}), 409, "overlaps")
    await refused(http.post("/api/v1/address-pools/base/ranges", json={
        "first_ip": "192.0.2.1", "last_ip": "192.0.2.2"}), 400,
        "outside the pool's network 203.0.113.0/24")
    await refused(http.post("/api/v1/address-pools/ports/ranges", json={
        "first_ip": "198.51.100.2", "last_ip": "198.51.100.2", "first_port": 5,
        "last_port": 65536}), 400, "port 65536 is outside 1..65535")
    await refused(http.post("/api/v1/address-pools/ports/ranges", json={
        "first_ip": "198.51.100.2", "last_ip": "198.51.100.2"}), 400, "needs its port range")
    # Compute pools: a mode needs its kind of address pool, and only those modes take one.
    await refused(http.post("/api/v1/pools", json={
        "name": "m", "network_mode": "sandbox-mono", "address_pool": "ports"}), 400,
        "address pool ports is shared; network mode sandbox-mono needs an exclusive one")
    await refused(http.post("/api/v1/pools", json={
        "name": "s", "network_mode": "sandbox-share", "address_pool": "base"}), 400,
        "base is exclusive; network mode sandbox-share needs an shared one")
    await refused(http.post("/api/v1/pools", json={
        "name": "m", "network_mode": "sandbox-mono"}), 400,
        "sandbox-mono needs an exclusive address pool")
    await refused(http.post("/api/v1/pools", json={
        "name": "p", "network_mode": "sandbox-private", "address_pool": "base"}), 400,
        "network mode sandbox-private takes no address pool")
    await refused(http.post("/api/v1/pools", json={
        "name": "m", "network_mode": "sandbox-mono", "address_pool": "nope"}), 404,
        "no address pool 'nope'")
    assert await ok(http.get("/api/v1/address-pools")) == before
    names = {p["name"] for p in (await ok(http.get("/api/v1/pools")))["items"]}
    assert not names & {"m", "s", "p"}


async def test_elastic_ips_bind_move_and_stay_in_their_project(
        cli, cluster: SimCluster, small_qcow2: Path) -> None:  # type: ignore[no-untyped-def]
    http = api(cluster)
    await ok(http.post("/api/v1/address-pools", json={
        "name": "pub", "kind": "exclusive", "network": "203.0.113.0/24",
        "ranges": [{"first_ip": "203.0.113.10", "last_ip": "203.0.113.19"}]}), 201)
    await ok(http.post("/api/v1/pools", json={
        "name": "mono", "network_mode": "sandbox-mono", "address_pool": "pub"}), 201)
    await ok(http.delete("/api/v1/pools/default/nodes/node-0001"))
    await ok(http.post("/api/v1/pools/mono/nodes", json={"node": "node-0001"}))
    await upload(cluster, small_qcow2)
    for name, pool in (("m1", "mono"), ("m2", "mono"), ("p1", "default")):
        accepted = await ok(http.post("/api/v1/vms", params={"wait": 60}, json={
            "name": name, "image": "img", "memory_mb": 128, "pool": pool}), 202)
        assert accepted["task"]["state"] == "succeeded", accepted

    eip = await shown(cli, "eip", "allocate", "--pool", "pub", "--name", "front")
    code, out = await cli("eip", "bind", "front", "m1")
    assert code == 0 and "bound to VM m1" in out, out
    assert (await shown(cli, "eip", "show", "front"))["vm_name"] == "m1"
    # Moved to another VM without unbinding first.
    code, out = await cli("eip", "bind", eip["ip"], "m2")
    assert code == 0 and "moved from VM m1" in out, out
    # Only VMs of sandbox-mono pools take one.
    code, out = await cli("eip", "bind", "front", "p1")
    assert code == 1 and "409" in out and "only to VMs of sandbox-mono pools" in out, out
    # The pool's network mode and address pool stay while it has VMs.
    await refused(http.patch("/api/v1/pools/mono", json={"network_mode": "sandbox-private"}),
                  409, "network mode and address pool change only while it has none")

    # Another project sees neither the EIP nor the VM: 404, as if missing.
    await ok(http.post("/api/v1/departments", json={"name": "d2"}), 201)
    await ok(http.post("/api/v1/projects", json={"name": "p2", "department": "d2"}), 201)
    await ok(http.post("/api/v1/users", json={"name": "bob", "password": "pw-bob-123456",
                                              "department": "d2"}), 201)
    await ok(http.post("/api/v1/role-assignments", json={
        "user": "bob", "role": "member", "project": "p2"}), 201)
    bob = cluster.client(await cluster.login("bob", "pw-bob-123456", "p2"))
    try:
        for call in (bob.get(f"/api/v1/eips/{eip['uuid']}"),
                     bob.post("/api/v1/eips/front/unbind"),
                     bob.post("/api/v1/eips/front/bind", json={"vm": "m1"}),
                     bob.delete(f"/api/v1/eips/{eip['ip']}")):
            await refused(call, 404, "no elastic IP")
        assert (await ok(bob.get("/api/v1/eips")))["items"] == []
        own = await ok(bob.post("/api/v1/eips", json={"address_pool": "pub"}), 201)
        await refused(bob.post(f"/api/v1/eips/{own['uuid']}/bind", json={"vm": "m1"}), 404,
                      "no VM 'm1'")
        # Even someone who sees both projects cannot bind across them.
        await refused(http.post(f"/api/v1/eips/{own['uuid']}/bind", json={"vm": "m1"}),
                      404, "no VM 'm1'")
        await ok(bob.delete(f"/api/v1/eips/{own['uuid']}"))
    finally:
        await bob.aclose()
    assert (await shown(cli, "eip", "show", "front"))["vm_name"] == "m2"

    code, out = await cli("eip", "unbind", "front")
    assert code == 0 and "unbound from VM m2" in out, out
    code, out = await cli("eip", "unbind", "front")
    assert code == 1 and "is not bound" in out, out
    code, out = await cli("eip", "bind", "front", "m1")
    assert code == 0, out
    # Released while bound: unbound first, and said so.
    code, out = await cli("eip", "release", "front")
    assert code == 0 and "unbound from VM m1 and released" in out, out
    code, out = await cli("eip", "show", "front")
    assert code == 1 and "404" in out, out
    audit = await ok(http.get("/api/v1/audit", params={"q": "resource_type=eip",
                                                       "limit": 100}))
    assert {"eip.allocate", "eip.bind", "eip.unbind", "eip.release"} <= {
        a["action"] for a in audit["items"]}


async def test_quota_counts_elastic_ips(cli, cluster: SimCluster) -> None:  # type: ignore[no-untyped-def]
    http = api(cluster)
    await ok(http.post("/api/v1/address-pools", json={
        "name": "pub", "kind": "exclusive", "ranges": [
            {"first_ip": "203.0.113.1", "last_ip": "203.0.113.6"}]}), 201)
    await set_quota(cluster, 2)
    for _ in range(2):
        await ok(http.post("/api/v1/eips", json={"address_pool": "pub"}), 201)
    detail = await refused(http.post("/api/v1/eips", json={"address_pool": "pub"}), 409,
                           "quota exceeded", "public_ips")
    assert "may use 2" in detail
    line = next(x for x in (await ok(http.get("/api/v1/quota")))["lines"]
                if x["resource"] == "public_ips")
    assert (line["limit"], line["used"]) == (2, 2)
    assert (await ok(http.get("/api/v1/address-pools/pub")))["used"] == 2
    # Released: the quota counts it no more.
    first = (await ok(http.get("/api/v1/eips")))["items"][0]
    await ok(http.delete(f"/api/v1/eips/{first['uuid']}"))
    await ok(http.post("/api/v1/eips", json={"address_pool": "pub"}), 201)


async def test_concurrent_allocations(one_on_each_db: SimCluster) -> None:
    """50 allocations at once from a pool of 40 addresses: exactly 40 distinct, on
    SQLite and on PostgreSQL."""
    cluster = one_on_each_db
    http = api(cluster)
    await ok(http.post("/api/v1/address-pools", json={
        "name": "race", "kind": "exclusive", "network": "100.64.0.0/24",
        "ranges": [{"first_ip": "100.64.0.1", "last_ip": "100.64.0.20"},
                   {"first_ip": "100.64.0.101", "last_ip": "100.64.0.120"}]}), 201)
    await set_quota(cluster, -1)
    answers = await asyncio.gather(*(
        http.post("/api/v1/eips", json={"address_pool": "race", "name": f"r{i}"})
        for i in range(50)))
    made = [a.json() for a in answers if a.status_code == 201]
    failed = [a for a in answers if a.status_code != 201]
    assert len(made) == 40, [a.text for a in failed]
    assert len({m["ip"] for m in made}) == 40
    assert all(a.status_code == 409 and "no free address left" in a.json()["detail"]
               for a in failed), [a.text for a in failed]
    pool = await ok(http.get("/api/v1/address-pools/race"))
    assert (pool["used"], pool["free"]) == (40, 0)
    listed = await ok(http.get("/api/v1/eips", params={"limit": 100, "count": "true"}))
    assert listed["total"] == 40


