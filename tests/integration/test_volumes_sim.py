"""Volumes on the sim cloud (C-STO, U-HOTPLUG for disks, Z-CASCADE, F-STO-MODEL, F-THIN):
root volumes of VMs, data volumes created, attached (hot-plug), refused a second VM,
moved to another VM with their data, grown online, snapshotted and reverted, deleted;
a VM's delete with and without ``keep_volumes``; the pool's storage rules; the
storage threshold alarm raised and cleared."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select

from tests.integration.conftest import Cli, shown, upload
from tests.integration.test_network_modes_sim import _db, create_vm, delete_vm, node_of
from yun.config import StorageSettings
from yun.control.db.models import VolumeRow
from yun.control.services.pools import PoolService
from yun.storage.service import StorageService
from yun.testing.cluster import SimCluster

GIB = 1 << 30


def api(cluster: SimCluster) -> httpx.AsyncClient:
    assert cluster.api is not None
    return cluster.api


async def volume(cluster: SimCluster, ref: str) -> dict[str, Any]:
    resp = await api(cluster).get(f"/api/v1/volumes/{ref}")
    assert resp.status_code == 200, resp.text
    return dict(resp.json())


async def domain_disks(cluster: SimCluster, vm: dict[str, Any]) -> list[str]:
    info = await node_of(cluster, vm).agent.driver.get_domain(vm["uuid"])
    assert info is not None
    return list(info.disks)


async def power(cluster: SimCluster, vm: str, action: str) -> None:
    resp = await api(cluster).post(f"/api/v1/vms/{vm}/{action}", params={"wait": 60})
    assert resp.status_code in (200, 202), resp.text
    if resp.status_code == 202:
        assert resp.json()["task"]["state"] == "succeeded", resp.text


async def test_root_volume_and_a_data_volume_through_its_life(
        one_on_each_db: SimCluster, small_qcow2: Path) -> None:
    """Also on PostgreSQL: its conditional claim of the VM and its constraints."""
    c = one_on_each_db
    await upload(c, small_qcow2)
    task, v1 = await create_vm(c, "v1")
    assert task["state"] == "succeeded", task
    disks = node_of(c, v1).agent.disks
    # The VM's root volume: recorded with the VM, made on its node under its own id.
    roots = (await api(c).get("/api/v1/volumes", params={"q": "kind=root"})).json()["items"]
    assert [(r["vm_uuid"], r["disk_id"], r["size_gb"], r["status"], r["node_uuid"],
             r["storage_mode"]) for r in roots] == [
        (v1["uuid"], "root", 1, "in-use", v1["node_uuid"], "local")]
    assert roots[0]["uuid"] in disks.volumes

    # A data volume: a record only until it is attached.
    resp = await api(c).post("/api/v1/volumes", json={"name": "d1", "size_gb": 2})
    assert resp.status_code == 201, resp.text
    d1 = resp.json()
    assert (d1["kind"], d1["status"], d1["node_uuid"], d1["thin"]) == (
        "data", "available", None, True)
    assert d1["uuid"] not in disks.volumes
    # Hot-plug into the running VM: made on its node, in its domain.
    resp = await api(c).post("/api/v1/volumes/d1/attach", json={"vm": "v1"})
    assert resp.status_code == 200, resp.text
    attached = resp.json()
    assert (attached["status"], attached["vm_name"], attached["node_uuid"]) == (
        "in-use", "v1", v1["node_uuid"])
    assert attached["disk_id"] in await domain_disks(c, v1)
    assert disks.volumes[d1["uuid"]].size_gb == 2

    _, v2 = await create_vm(c, "v2")
    # One VM at most: the answer names the VM that has it.
    resp = await api(c).post("/api/v1/volumes/d1/attach", json={"vm": "v2"})
    assert resp.status_code == 409 and "already attached to VM v1" in resp.text, resp.text
    # Deleting an attached volume is refused too.
    resp = await api(c).delete("/api/v1/volumes/d1")
    assert resp.status_code == 409 and "attached to VM v1" in resp.text, resp.text

    # Snapshots need a closed volume: refused while its VM runs.
    resp = await api(c).post("/api/v1/volumes/d1/snapshots", json={"name": "s1"})
    assert resp.status_code == 409 and "stop the VM" in resp.text, resp.text
    disks.write(d1["uuid"], "before")
    await power(c, "v1", "stop")
    resp = await api(c).post("/api/v1/volumes/d1/snapshots", json={"name": "s1"})
    assert resp.status_code == 201, resp.text
    resp = await api(c).post("/api/v1/volumes/d1/snapshots", json={"name": "s1"})
    assert resp.status_code == 409, resp.text
    disks.write(d1["uuid"], "after")
    resp = await api(c).post("/api/v1/volumes/d1/snapshots/s1/revert")
    assert resp.status_code == 200, resp.text
    assert disks.read(d1["uuid"]) == "before"
    snaps = (await api(c).get("/api/v1/volumes/d1/snapshots")).json()
    assert [s["name"] for s in snaps] == ["s1"]
    assert (await api(c).delete("/api/v1/volumes/d1/snapshots/s1")).status_code == 204
    assert (await api(c).get("/api/v1/volumes/d1/snapshots")).json() == []
    resp = await api(c).post("/api/v1/volumes/d1/snapshots/s1/revert")
    assert resp.status_code == 404, resp.text

    # Grown online on the running VM; never shrunk.
    await power(c, "v1", "start")
    resp = await api(c).post("/api/v1/volumes/d1/resize", json={"size_gb": 3})
    assert resp.status_code == 200 and resp.json()["size_gb"] == 3, resp.text
    assert disks.volumes[d1["uuid"]].size_gb == 3
    resp = await api(c).post("/api/v1/volumes/d1/resize", json={"size_gb": 2})
    assert resp.status_code == 422 and "only grow" in resp.text, resp.text

    # Detached (live), then attached to another VM: the data went with it.
    resp = await api(c).post("/api/v1/volumes/d1/detach")
    assert resp.status_code == 200 and resp.json()["status"] == "available", resp.text
    assert attached["disk_id"] not in await domain_disks(c, v1)
    resp = await api(c).post("/api/v1/volumes/d1/attach", json={"vm": "v2"})
    assert resp.status_code == 200 and resp.json()["vm_name"] == "v2", resp.text
    assert disks.read(d1["uuid"]) == "before"
    assert resp.json()["disk_id"] in await domain_disks(c, v2)
    assert (await api(c).post("/api/v1/volumes/d1/detach")).status_code == 200
    assert (await api(c).delete("/api/v1/volumes/d1")).status_code == 204
    assert d1["uuid"] not in disks.volumes
    assert (await api(c).get("/api/v1/volumes/d1")).status_code == 404

    # Larger than the node's free storage: refused naming the node, nothing recorded.
    resp = await api(c).post("/api/v1/volumes",
                             json={"name": "huge", "size_gb": 60000, "vm": "v1"})
    assert resp.status_code == 409 and "not enough free storage" in resp.text, resp.text
    assert "node " in resp.json()["detail"]
    assert (await api(c).get("/api/v1/volumes/huge")).status_code == 404
    assert not [v for v in disks.volumes.values() if v.size_gb == 60000]


async def test_vm_delete_takes_its_volumes_unless_kept(one: SimCluster,
                                                       small_qcow2: Path) -> None:
    c = one
    await upload(c, small_qcow2)
    _, v1 = await create_vm(c, "k1")
    disks = node_of(c, v1).agent.disks
    gone = (await api(c).post("/api/v1/volumes", json={
        "name": "gone", "size_gb": 1, "vm": "k1", "delete_with_vm": True})).json()
    kept = (await api(c).post("/api/v1/volumes", json={
        "name": "kept", "size_gb": 1, "vm": "k1"})).json()
    assert gone["status"] == kept["status"] == "in-use"
    root = (await api(c).get("/api/v1/volumes", params={"q": "kind=root"})).json()["items"][0]
    await delete_vm(c, "k1")
    # The root volume and the volume marked delete_with_vm went; the other is kept.
    assert {root["uuid"], gone["uuid"]}.isdisjoint(disks.volumes)
    assert kept["uuid"] in disks.volumes
    left = (await api(c).get("/api/v1/volumes")).json()["items"]
    assert [(v["name"], v["status"], v["vm_uuid"]) for v in left] == [
        ("kept", "available", None)]

    # keep_volumes keeps even a volume marked to go with its VM.
    await create_vm(c, "k2")
    resp = await api(c).post("/api/v1/volumes/kept/attach",
                             json={"vm": "k2", "delete_with_vm": True})
    assert resp.status_code == 200 and resp.json()["delete_with_vm"] is True, resp.text
    resp = await api(c).delete("/api/v1/vms/k2", params={"keep_volumes": "true"})
    assert resp.status_code == 202, resp.text
    assert (await c.wait_task(resp.json()["task"]["uuid"]))["state"] == "succeeded"
    left = (await api(c).get("/api/v1/volumes")).json()["items"]
    assert [(v["name"], v["status"]) for v in left] == [("kept", "available")]
    assert kept["uuid"] in disks.volumes
    async with _db(c).session() as s:
        assert len((await s.scalars(select(VolumeRow))).all()) == 1


async def test_pool_storage_rules(one: SimCluster, small_qcow2: Path,
                                  tmp_path: Path) -> None:
    c = one
    resp = await api(c).post("/api/v1/pools", json={"name": "lb", "backing": True})
    assert resp.status_code == 422 and "storage_mode shared" in resp.text, resp.text
    # A storage server's mode must match the pool it serves (F-STO-MODEL): this
    # domain's only storage server is in local mode.
    resp = await api(c).post("/api/v1/pools", json={"name": "sh", "storage_mode": "shared",
                                                    "backing": True})
    assert resp.status_code == 409, resp.text
    assert "storage mode shared needs a storage server in shared mode, and the domain " \
           "has storage (local)" in resp.text
    await use_shared_storage_server(c, tmp_path / "mount")
    resp = await api(c).post("/api/v1/pools", json={"name": "sh", "storage_mode": "shared",
                                                    "backing": True})
    assert resp.status_code == 201, resp.text
    pool = resp.json()
    assert pool["backing"] is True
    assert any("IOPS" in w and "base" in w for w in pool["warnings"]), pool["warnings"]
    await upload(c, small_qcow2)
    await create_vm(c, "p1")
    resp = await api(c).patch("/api/v1/pools/default", json={"storage_mode": "shared"})
    assert resp.status_code == 409 and "1 VM(s)" in resp.text, resp.text
    resp = await api(c).patch("/api/v1/pools/default", json={"backing": True})
    assert resp.status_code == 422, resp.text
    # An empty pool changes freely, within the modes the storage servers serve.
    resp = await api(c).patch("/api/v1/pools/sh", json={"backing": False})
    assert resp.status_code == 200 and resp.json()["backing"] is False, resp.text
    resp = await api(c).patch("/api/v1/pools/sh", json={"storage_mode": "local"})
    assert resp.status_code == 409 and "has storage-shared (shared)" in resp.text, resp.text


async def use_shared_storage_server(c: SimCluster, mount: Path) -> None:
    """Replace the cluster's storage server with one in shared mode on ``mount``; return
    once the control server sees it."""
    assert c.storage is not None and c.control is not None
    await c.storage.stop()
    c.storage = StorageService(StorageSettings(**c.common("storage-shared"), mode="shared",
                                               shared_storage=mount))
    await c.storage.start()
    pools = PoolService(c.control.ctx)
    deadline = asyncio.get_running_loop().time() + 30
    while (await pools.storage_server_modes()) != {"storage-shared": "shared"}:
        assert asyncio.get_running_loop().time() < deadline, "no shared storage server"
        await asyncio.sleep(0.2)


async def wait_events(c: SimCluster, state: str, timeout: float = 30) -> list[dict[str, Any]]:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        resp = await api(c).get("/api/v1/events", params={"kind": "storage.threshold"})
        assert resp.status_code == 200, resp.text
        found = [e for e in resp.json()["items"] if e["state"] == state]
        if found or loop.time() > deadline:
            return found
        await asyncio.sleep(0.3)


async def test_storage_threshold_alarm_raised_and_cleared(
        one: SimCluster, caplog: pytest.LogCaptureFixture) -> None:
    c = one
    service = c.node_services[0]
    disks = service.agent.disks
    path = next(iter(disks.dirs))
    total = disks.dirs[path].total_bytes
    node = (await api(c).get(f"/api/v1/nodes/{service.agent.node_id}")).json()
    assert [d["path"] for d in node["storage"]] == [path]
    assert node["storage"][0]["over_threshold"] is False
    assert await wait_events(c, "raised", timeout=0) == []

    disks.fill(path, int(total * 0.9))
    raised = await wait_events(c, "raised")
    assert len(raised) == 1, raised
    event = raised[0]
    assert (event["severity"], event["resource_type"], event["resource_uuid"]) == (
        "warning", "node", service.agent.node_id)
    assert path in event["message"] and "90" in event["message"], event
    node = (await api(c).get(f"/api/v1/nodes/{service.agent.node_id}")).json()
    assert node["storage"][0]["over_threshold"] is True
    assert node["storage"][0]["used_percent"] >= 90
    assert any(getattr(r, "directory", None) == path for r in caplog.records)

    disks.fill(path, 0)
    cleared = await wait_events(c, "cleared")
    assert len(cleared) == 1 and cleared[0]["severity"] == "info", cleared
    # Still one raised: a report that changes nothing raises nothing again.
    assert len(await wait_events(c, "raised", timeout=0)) == 1
    # Filters: by resource, and a kind with no events.
    resp = await api(c).get("/api/v1/events", params={"resource": service.agent.node_id,
                                                      "count": "true"})
    assert resp.json()["total"] == 2
    resp = await api(c).get("/api/v1/events", params={"kind": "other"})
    assert resp.json()["items"] == []


async def test_cli_volumes_snapshots_events_and_node_storage(
        cluster: SimCluster, small_qcow2: Path, cli: Cli) -> None:
    c = cluster
    await upload(c, small_qcow2)
    _, vm = await create_vm(c, "c1")
    made = await shown(cli, "volume", "create", "cd", "--size", "1", "--vm", "c1", "--thick")
    assert (made["status"], made["vm_name"], made["thin"]) == ("in-use", "c1", False)
    code, out = await cli("volume", "list")
    assert code == 0 and "cd" in out and "c1-root" in out, out
    code, out = await cli("volume", "snapshot", "create", "cd", "s1")
    assert code != 0 and "stop the VM" in out, out
    await power(c, "c1", "stop")
    assert (await shown(cli, "volume", "snapshot", "create", "cd", "s1"))["name"] == "s1"
    code, out = await cli("volume", "snapshot", "list", "cd")
    assert code == 0 and "s1" in out, out
    assert (await shown(cli, "volume", "snapshot", "revert", "cd", "s1"))["name"] == "cd"
    code, out = await cli("volume", "snapshot", "delete", "cd", "s1")
    assert code == 0 and "snapshot s1 of volume cd deleted" in out, out
    assert (await shown(cli, "volume", "resize", "cd", "--size", "2"))["size_gb"] == 2
    code, out = await cli("volume", "delete", "cd")
    assert code != 0 and "attached to VM c1" in out, out
    code, out = await cli("vm", "delete", "c1", "--keep-volumes")
    assert code == 0, out
    assert (await shown(cli, "volume", "show", "cd"))["status"] == "available"
    code, out = await cli("volume", "delete", "cd")
    assert code == 0 and "volume cd deleted" in out, out

    code, out = await cli("node", "show", vm["node_uuid"])
    assert code == 0 and "Storage directories" in out and "GiB" in out and "%" in out, out
    code, out = await cli("event", "list", "--kind", "storage.threshold")
    assert code == 0, out
