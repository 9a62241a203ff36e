"""Network modes of pools on the sim cloud (F-NET-*, F-BALANCE, F-ADDR): what the create
and delete flows take and give back, port forwards of private and share VMs."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path
from typing import Any

from sqlalchemy import func, select, update

from tests.integration.conftest import upload
from yun.control.db.models import (
    AddressPoolRow,
    AddressRangeRow,
    AddressRow,
    NetworkChangeRow,
    NodeForwardRow,
    PoolRow,
    PublicIpRow,
    QuotaRow,
    VmRow,
)
from yun.control.db.session import Database
from yun.proto.network import LearnedAddress
from yun.testing.cluster import SimCluster
from yun.testing.invariants import SIM_HOST_FILE, check


async def consistent(cluster: SimCluster) -> list[str]:
    """Every invariant violation of the cloud, the holdings of its nodes that held
    anything included (a node writes its state file once it holds something)."""
    nodes = {n.name: cluster.root / n.name for n in cluster.node_services
             if (cluster.root / n.name / SIM_HOST_FILE).exists()}
    return await asyncio.to_thread(check, _db(cluster).url, nodes)


def _db(cluster: SimCluster) -> Database:
    assert cluster.control is not None
    return cluster.control.ctx.db


async def network_pool(cluster: SimCluster, mode: str, kind: str | None = None,
                       first: str = "203.0.113.10", last: str = "203.0.113.29",
                       ports: tuple[int, int] | None = None) -> str | None:
    """Make the default pool (every sim node is in it) a ``mode`` pool, linked to a new
    address pool of ``kind`` with one range; unlimited quotas for the project."""
    async with _db(cluster).session() as s:
        ap_uuid = None
        if kind is not None:
            ap_uuid = str(uuid.uuid4())
            s.add(AddressPoolRow(uuid=ap_uuid, name=f"ap-{mode}", kind=kind,
                                 network="203.0.113.0/24"))
            await s.flush()
            s.add(AddressRangeRow(uuid=str(uuid.uuid4()), address_pool_uuid=ap_uuid,
                                  first_ip=first, last_ip=last,
                                  first_port=ports[0] if ports else None,
                                  last_port=ports[1] if ports else None))
        await s.execute(update(PoolRow).where(PoolRow.name == "default").values(
            network_mode=mode, address_pool_uuid=ap_uuid))
        await s.execute(update(QuotaRow).values(limit=-1))
    return ap_uuid


async def create_vm(cluster: SimCluster, name: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Create a VM and wait for its task: (the task, the VM as shown after it)."""
    assert cluster.api is not None
    resp = await cluster.api.post("/api/v1/vms", json={"name": name, "image": "img",
                                                       "memory_mb": 64, "disk_gb": 1})
    assert resp.status_code == 202, resp.text
    task = await cluster.wait_task(resp.json()["task"]["uuid"])
    vm = (await cluster.api.get(f"/api/v1/vms/{resp.json()['resource']['uuid']}")).json()
    return task, vm


async def delete_vm(cluster: SimCluster, ref: str) -> None:
    assert cluster.api is not None
    resp = await cluster.api.delete(f"/api/v1/vms/{ref}")
    assert resp.status_code == 202, resp.text
    task = await cluster.wait_task(resp.json()["task"]["uuid"])
    assert task["state"] == "succeeded", task


async def public_rows(cluster: SimCluster) -> list[PublicIpRow]:
    async with _db(cluster).session() as s:
        return list((await s.scalars(select(PublicIpRow))).all())


def node_of(cluster: SimCluster, vm: dict[str, Any]) -> Any:
    return next(n for n in cluster.node_services if n.agent.node_id == vm["node_uuid"])


async def test_mono_vm_gets_a_public_address_and_gives_it_back(
        cluster: SimCluster, small_qcow2: Path) -> None:
    await upload(cluster, small_qcow2)
    await network_pool(cluster, "sandbox-mono", "exclusive")
    async with _db(cluster).session() as s:
        before = await s.scalar(select(func.max(NetworkChangeRow.id))) or 0
    task, vm = await create_vm(cluster, "m1")
    assert task["state"] == "succeeded", task
    assert [(s["name"], s["state"]) for s in task["steps"]] == [
        ("schedule", "done"), ("address", "done"), ("provision", "done"),
        ("forwarders", "done"), ("confirm", "skipped")]
    assert vm["network_mode"] == "sandbox-mono" and vm["public_ip"] == "203.0.113.10"
    assert vm["ip"].startswith("10.64.")
    # The node made a sandbox NIC exposed as mono, with the VM's own address.
    [port] = node_of(cluster, vm).agent.network.ports[vm["uuid"]]
    assert (port.ip, port.exposure) == (vm["ip"], "mono")
    [row] = await public_rows(cluster)
    assert (row.vm_uuid, row.kind, row.port) == (vm["uuid"], "vm", 0)
    async with _db(cluster).session() as s:  # the routers' generation moved
        assert (await s.scalar(select(func.max(NetworkChangeRow.id))) or 0) > before
    # A mono VM needs no port forward: refused with the reason.
    assert cluster.api is not None
    resp = await cluster.api.post(f"/api/v1/vms/{vm['uuid']}/port-forwards", json={"port": 80})
    assert resp.status_code == 409 and "own public address" in resp.text
    await delete_vm(cluster, "m1")
    assert await public_rows(cluster) == []
    # The address is free again: the next VM gets it.
    task, again = await create_vm(cluster, "m2")
    assert task["state"] == "succeeded" and again["public_ip"] == "203.0.113.10"


async def test_failed_provision_gives_the_public_address_back(
        cluster: SimCluster, small_qcow2: Path) -> None:
    await upload(cluster, small_qcow2)
    await network_pool(cluster, "sandbox-mono", "exclusive")
    for node in cluster.node_services:  # every node fails: no alternate takes the VM
        node.agent.driver.fail_next("start", times=10)
    task, vm = await create_vm(cluster, "doomed")
    assert task["state"] == "failed", task
    assert vm["state"] == "error" and vm["public_ip"] is None
    assert await public_rows(cluster) == []
    for node in cluster.node_services:
        node.agent.driver.clear_faults()


async def test_mono_pool_exhausted_by_concurrent_creates(
        cluster: SimCluster, small_qcow2: Path) -> None:
    """30 creates at once from a 20-address pool: 20 VMs with distinct addresses, 10
    refused saying the pool is exhausted, nothing given twice."""
    await upload(cluster, small_qcow2)
    await network_pool(cluster, "sandbox-mono", "exclusive")
    results = await asyncio.gather(*(create_vm(cluster, f"c{i}") for i in range(30)))
    ok = [vm for task, vm in results if task["state"] == "succeeded"]
    failed = [(task, vm) for task, vm in results if task["state"] != "succeeded"]
    assert len(ok) == 20 and len(failed) == 10
    assert len({vm["public_ip"] for vm in ok}) == 20
    assert all(vm["error"] and "has no free address left" in vm["error"] for _, vm in failed)
    assert all(vm["public_ip"] is None for _, vm in failed)
    rows = await public_rows(cluster)
    assert len(rows) == 20 and len({r.ip for r in rows}) == 20
    assert {r.vm_uuid for r in rows} == {vm["uuid"] for vm in ok}
    assert await consistent(cluster) == []


async def test_private_port_forward_is_pushed_to_the_node(
        cluster: SimCluster, small_qcow2: Path) -> None:
    assert cluster.api is not None
    await upload(cluster, small_qcow2)
    async with _db(cluster).session() as s:
        before = await s.scalar(select(func.max(NetworkChangeRow.id))) or 0
    task, vm = await create_vm(cluster, "web1")  # the default pool is sandbox-private
    async with _db(cluster).session() as s:  # nothing the routers apply changed
        assert (await s.scalar(select(func.max(NetworkChangeRow.id))) or 0) == before
    assert task["state"] == "succeeded" and vm["network_mode"] == "sandbox-private"
    node = node_of(cluster, vm)
    resp = await cluster.api.post("/api/v1/vms/web1/port-forwards", json={"port": 80})
    assert resp.status_code == 201, resp.text
    first = resp.json()
    assert first == {"protocol": "tcp", "vm_port": 80, "address": "127.0.0.1", "port": 40000}
    resp = await cluster.api.post("/api/v1/vms/web1/port-forwards",
                                  json={"port": 53, "protocol": "udp"})
    assert resp.status_code == 201 and resp.json()["port"] == 40000  # per protocol
    resp = await cluster.api.post("/api/v1/vms/web1/port-forwards", json={"port": 22})
    assert resp.json()["port"] == 40001
    # The node holds every forward of the VM, to its address.
    held = node.agent.network.forwards[vm["uuid"]]
    assert sorted((f.protocol, f.node_port, f.vm_ip, f.vm_port) for f in held) == [
        ("tcp", 40000, vm["ip"], 80), ("tcp", 40001, vm["ip"], 22),
        ("udp", 40000, vm["ip"], 53)]
    # Bad input: the same port twice, a port out of range.
    resp = await cluster.api.post("/api/v1/vms/web1/port-forwards", json={"port": 80})
    assert resp.status_code == 409 and "already forwarded" in resp.text
    resp = await cluster.api.post("/api/v1/vms/web1/port-forwards", json={"port": 70000})
    assert resp.status_code == 422
    shown = (await cluster.api.get("/api/v1/vms/web1")).json()
    assert [(f["vm_port"], f["port"]) for f in shown["port_forwards"]] == [
        (22, 40001), (53, 40000), (80, 40000)]
    resp = await cluster.api.delete("/api/v1/vms/web1/port-forwards/tcp/22")
    assert resp.status_code == 204
    assert sorted(f.vm_port for f in node.agent.network.forwards[vm["uuid"]]) == [53, 80]
    resp = await cluster.api.delete("/api/v1/vms/web1/port-forwards/tcp/22")
    assert resp.status_code == 404
    listed = (await cluster.api.get("/api/v1/vms/web1/port-forwards")).json()
    assert [f["vm_port"] for f in listed] == [53, 80]
    assert await consistent(cluster) == []
    # A forward the database does not have, on the node: the checker names it.
    held = node.agent.network.forwards[vm["uuid"]]
    await node.agent.network.set_forwards(vm["uuid"], [*held, held[0].model_copy(
        update={"node_port": 40009})])
    assert [p.split(":")[0] for p in await consistent(cluster)] == ["forward orphaned"]
    await node.agent.network.set_forwards(vm["uuid"], held)
    await delete_vm(cluster, "web1")
    async with _db(cluster).session() as s:
        assert (await s.scalars(select(NodeForwardRow))).all() == []
    assert vm["uuid"] not in node.agent.network.forwards
    assert await consistent(cluster) == []


async def test_port_forward_shows_the_address_the_node_reports(
        cluster: SimCluster, small_qcow2: Path) -> None:
    """A node whose agent listens on loopback (an all-in-one) reports where its NAT
    ports really answer; the API shows that address, not the agent's."""
    assert cluster.api is not None
    await upload(cluster, small_qcow2)
    _, vm = await create_vm(cluster, "fa1")
    node = node_of(cluster, vm)
    node.agent.forward_address = "192.0.2.77"
    await node.agent.report()
    resp = await cluster.api.post("/api/v1/vms/fa1/port-forwards", json={"port": 80})
    assert resp.status_code == 201, resp.text
    assert resp.json()["address"] == "192.0.2.77"
    listed = (await cluster.api.get("/api/v1/vms/fa1/port-forwards")).json()
    assert [(f["address"], f["vm_port"]) for f in listed] == [("192.0.2.77", 80)]
    node.agent.forward_address = None
    await node.agent.report()
    listed = (await cluster.api.get("/api/v1/vms/fa1/port-forwards")).json()
    assert [f["address"] for f in listed] == ["127.0.0.1"]
    await delete_vm(cluster, "fa1")


async def test_share_port_forward_gets_a_public_ip_and_port(
        cluster: SimCluster, small_qcow2: Path) -> None:
    assert cluster.api is not None
    await upload(cluster, small_qcow2)
    await network_pool(cluster, "sandbox-share", "shared", first="203.0.113.50",
                       last="203.0.113.50", ports=(20000, 20001))
    task, vm = await create_vm(cluster, "s1")
    assert task["state"] == "succeeded" and vm["public_ip"] is None
    assert await public_rows(cluster) == []  # a share VM takes ports only when asked
    resp = await cluster.api.post("/api/v1/vms/s1/port-forwards", json={"port": 443})
    assert resp.status_code == 201, resp.text
    assert resp.json() == {"protocol": "tcp", "vm_port": 443, "address": "203.0.113.50",
                           "port": 20000}
    resp = await cluster.api.post("/api/v1/vms/s1/port-forwards", json={"port": 80})
    assert resp.json()["port"] == 20001
    resp = await cluster.api.post("/api/v1/vms/s1/port-forwards", json={"port": 8080})
    assert resp.status_code == 503 or resp.status_code == 409, resp.text
    assert "no free tcp port left" in resp.text
    assert vm["uuid"] not in node_of(cluster, vm).agent.network.forwards  # no node port
    await delete_vm(cluster, "s1")
    assert await public_rows(cluster) == []


async def test_direct_pool_needs_a_node_with_a_direct_bridge(
        cluster: SimCluster, small_qcow2: Path) -> None:
    assert cluster.api is not None
    await upload(cluster, small_qcow2)
    await network_pool(cluster, "direct")
    resp = await cluster.api.post("/api/v1/vms", json={"name": "d1", "image": "img",
                                                       "memory_mb": 64, "disk_gb": 1})
    assert resp.status_code in (409, 503), resp.text
    assert "net_direct" in resp.text
    # Naming only the zone asks the same of the nodes of each of its pools.
    resp = await cluster.api.post("/api/v1/vms", json={"name": "d2", "image": "img",
                                                       "zone": "default",
                                                       "memory_mb": 64, "disk_gb": 1})
    assert resp.status_code in (409, 503), resp.text
    assert "net_direct" in resp.text


async def test_direct_vm_address_is_learned_from_its_node(
        cluster: SimCluster, small_qcow2: Path) -> None:
    """The address a node reports a direct-mode VM took (by MAC) becomes the VM's ip;
    a sandbox VM's address is the platform's and never follows such a report."""
    assert cluster.api is not None and cluster.control is not None
    await upload(cluster, small_qcow2)
    task, vm = await create_vm(cluster, "lan1")
    assert task["state"] == "succeeded"
    agent = node_of(cluster, vm).agent
    registry = cluster.control.nodes
    learned = [LearnedAddress(mac=vm["mac"], ip="192.168.1.77")]

    async def report() -> None:
        snapshot = await agent.snapshot()
        await registry.report(snapshot.model_copy(update={"learned": learned}))

    await report()  # the pool is sandbox-private: the report changes nothing
    assert (await cluster.api.get("/api/v1/vms/lan1")).json()["ip"] == vm["ip"]
    async with _db(cluster).session() as s:
        await s.execute(update(PoolRow).where(PoolRow.name == "default").values(
            network_mode="direct"))
    await report()
    async with _db(cluster).session() as s:
        row = await s.get(VmRow, vm["uuid"])
        assert row is not None and row.ip == "192.168.1.77"
        stamp = row.updated_at
    await report()  # the same address again: no write
    async with _db(cluster).session() as s:
        row = await s.get(VmRow, vm["uuid"])
        assert row is not None and row.updated_at == stamp


async def test_extra_address_hot_plugged_on_a_running_vm(
        cluster: SimCluster, small_qcow2: Path) -> None:
    """U-HOTPLUG: an extra address of the node's subnet reaches the node's port of the
    running VM at once; removed, it is gone there and free again; the VM kept running."""
    assert cluster.api is not None
    await upload(cluster, small_qcow2)
    task, vm = await create_vm(cluster, "hp1")
    assert task["state"] == "succeeded"
    node = node_of(cluster, vm)
    resp = await cluster.api.post("/api/v1/vms/hp1/addresses")
    assert resp.status_code == 201, resp.text
    extra = resp.json()["ip"]
    assert extra != vm["ip"] and extra.rsplit(".", 1)[0] == vm["ip"].rsplit(".", 1)[0]
    [port] = node.agent.network.ports[vm["uuid"]]
    assert port.ip == vm["ip"] and port.extra_ips == (extra,)
    shown = (await cluster.api.get("/api/v1/vms/hp1")).json()
    assert shown["extra_ips"] == [extra] and shown["state"] == "running"
    assert (await node.agent.driver.get_domain(vm["uuid"])).state == "running"
    assert await consistent(cluster) == []
    # The node refuses: the address is given back, nothing half made.
    node.agent.network.fail_next("ensure_port")
    resp = await cluster.api.post("/api/v1/vms/hp1/addresses")
    assert resp.status_code >= 500 or resp.status_code == 409, resp.text
    assert (await cluster.api.get("/api/v1/vms/hp1")).json()["extra_ips"] == [extra]
    resp = await cluster.api.delete(f"/api/v1/vms/hp1/addresses/{extra}")
    assert resp.status_code == 204, resp.text
    [port] = node.agent.network.ports[vm["uuid"]]
    assert port.extra_ips == ()
    resp = await cluster.api.delete(f"/api/v1/vms/hp1/addresses/{extra}")
    assert resp.status_code == 404 and "no extra address" in resp.text
    async with _db(cluster).session() as s:  # only the primary address is held
        assert (await s.scalars(select(AddressRow.ip).where(
            AddressRow.vm_uuid == vm["uuid"]))).all() == [vm["ip"]]
    await delete_vm(cluster, "hp1")
