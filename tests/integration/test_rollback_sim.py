"""Z-FLOW: a create that fails rolls back along its path and leaves nothing behind."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.integration.conftest import upload
from yun.testing.cluster import SimCluster


async def assert_nothing_left(cluster: SimCluster, vm_uuid: str) -> None:
    assert cluster.api is not None
    for node in cluster.node_services:
        assert await node.agent.driver.get_domain(vm_uuid) is None
        assert vm_uuid not in await node.agent.disks.vm_disk_ids()
        assert vm_uuid not in await node.agent.network.vm_ports()
    nodes = (await cluster.api.get("/api/v1/nodes")).json()["items"]
    assert all(n["vcpus_reserved"] == 0 and n["memory_reserved_mb"] == 0
               and n["disk_reserved_gb"] == 0 for n in nodes)
    assert cluster.control is not None
    from sqlalchemy import select

    from yun.control.db.models import AddressRow
    async with cluster.control.db.session() as session:
        assert (await session.scalars(select(AddressRow))).all() == []


@pytest.mark.parametrize("fault", ["node refuses to start", "guest crashes at boot"])
async def test_failed_create_leaves_nothing(cluster: SimCluster, small_qcow2: Path,
                                            fault: str) -> None:
    assert cluster.api is not None
    await upload(cluster, small_qcow2)
    for node in cluster.node_services:
        driver = node.agent.driver
        if fault == "node refuses to start":
            driver.fail_next("start")  # type: ignore[attr-defined]
        else:
            driver.crash_next_boot()  # type: ignore[attr-defined]

    resp = await cluster.api.post("/api/v1/vms", json={"name": "doomed", "image": "img"})
    assert resp.status_code == 202
    vm_uuid = resp.json()["resource"]["uuid"]
    task = await cluster.wait_task(resp.json()["task"]["uuid"])

    assert task["state"] == "failed"
    failed_step = "provision" if fault == "node refuses to start" else "confirm"
    assert task["error"].startswith(f"{failed_step}: ")
    assert "simulated failure of start" in task["error"] or "crashed" in task["error"]
    states = {s["name"]: s["state"] for s in task["steps"]}
    assert states["schedule"] == "rolled_back"
    vm = (await cluster.api.get(f"/api/v1/vms/{vm_uuid}")).json()
    assert vm["state"] == "error" and vm["error"].startswith("create failed:")
    assert vm["ip"] is None and vm["node_uuid"] is None
    await assert_nothing_left(cluster, vm_uuid)
    for node in cluster.node_services:  # the faults armed on the nodes not chosen
        node.agent.driver.clear_faults()  # type: ignore[attr-defined]

    # The errored VM can be deleted, and a new create succeeds.
    resp = await cluster.api.delete(f"/api/v1/vms/{vm_uuid}")
    assert (await cluster.wait_task(resp.json()["task"]["uuid"]))["state"] == "succeeded"
    resp = await cluster.api.post("/api/v1/vms", json={"name": "ok", "image": "img"})
    assert (await cluster.wait_task(resp.json()["task"]["uuid"]))["state"] == "succeeded"


async def test_no_capacity_is_a_clear_error(cluster: SimCluster, small_qcow2: Path) -> None:
    assert cluster.api is not None
    await upload(cluster, small_qcow2)
    resp = await cluster.api.post("/api/v1/vms", json={
        "name": "huge", "image": "img", "vcpus": 64, "memory_mb": 1024 * 1024})
    # Answered at once, saying which filter eliminated the nodes and the closest miss.
    assert resp.status_code == 409, resp.text
    detail = resp.json()["detail"]
    assert "no node can host 64 vCPU" in detail and "pool default" in detail
    assert "short of memory (best: " in detail
    vms = (await cluster.api.get("/api/v1/vms", params={"q": "name=huge"})).json()
    assert vms["items"] == []
    await assert_nothing_left(cluster, "no-such-vm")


async def test_provision_failing_on_a_node_moves_to_the_next_best(
        cluster: SimCluster, small_qcow2: Path) -> None:
    """The scheduler's alternates: a node that cannot build the VM is cleared and the
    create carries on on another node instead of rolling back."""
    assert cluster.api is not None
    await upload(cluster, small_qcow2)
    broken, healthy = cluster.node_services
    driver = broken.agent.driver
    healthy_name = (await cluster.api.get(f"/api/v1/nodes/{healthy.agent.node_id}")).json()[
        "name"]
    driver.fail_next("start", times=100)  # type: ignore[attr-defined]
    made = []
    # The scheduler rotates over equal nodes: within a few creates one is tried on the
    # broken node first (its armed faults start being used).
    for i in range(4):
        resp = await cluster.api.post("/api/v1/vms", json={"name": f"mover-{i}",
                                                           "image": "img"})
        assert resp.status_code == 202, resp.text
        task = await cluster.wait_task(resp.json()["task"]["uuid"])
        vm = (await cluster.api.get(f"/api/v1/vms/{resp.json()['resource']['uuid']}")
              ).json()
        made.append(vm["uuid"])
        assert task["state"] == "succeeded", task
        assert vm["state"] == "running" and vm["node_name"] == healthy_name
        assert await driver.get_domain(vm["uuid"]) is None
        assert vm["uuid"] not in await broken.agent.disks.vm_disk_ids()
        if driver._faults.get("start", 0) < 100:  # type: ignore[attr-defined]
            break
    else:
        raise AssertionError("no create was tried on the broken node first")
    driver.clear_faults()  # type: ignore[attr-defined]
    for vm_uuid in made:
        resp = await cluster.api.delete(f"/api/v1/vms/{vm_uuid}")
        assert (await cluster.wait_task(resp.json()["task"]["uuid"]))["state"] == "succeeded"
