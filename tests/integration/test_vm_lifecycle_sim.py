"""A VM's life through every real service, on the sim hypervisor."""

from __future__ import annotations

from pathlib import Path

from tests.integration.conftest import upload
from yun.testing.cluster import SimCluster


async def test_create_power_delete(cluster: SimCluster, small_qcow2: Path) -> None:
    api = cluster.api
    assert api is not None
    image = await upload(cluster, small_qcow2)
    assert image["status"] == "active" and image["format"] == "qcow2"

    resp = await api.post("/api/v1/vms", json={"name": "vm1", "image": "img"})
    assert resp.status_code == 202, resp.text
    vm_uuid = resp.json()["resource"]["uuid"]
    task = await cluster.wait_task(resp.json()["task"]["uuid"])
    assert task["state"] == "succeeded", task
    assert [s["name"] for s in task["steps"]] == ["schedule", "provision",
                                                  "confirm"]
    vm = (await api.get(f"/api/v1/vms/{vm_uuid}")).json()
    assert vm["state"] == "running" and vm["ip"].startswith("10.77.0.")
    node = next(n for n in cluster.node_services if n.agent.node_id == vm["node_uuid"])
    assert (await node.agent.driver.get_domain(vm_uuid)).state == "running"

    for action, state in (("stop", "stopped"), ("start", "running"), ("reboot", "running")):
        resp = await api.post(f"/api/v1/vms/{vm_uuid}/{action}")
        assert resp.status_code == 202, resp.text
        assert (await cluster.wait_task(resp.json()["task"]["uuid"]))["state"] == "succeeded"
        assert (await api.get(f"/api/v1/vms/{vm_uuid}")).json()["state"] == state

    log = (await api.get(f"/api/v1/vms/{vm_uuid}/console-log")).text
    assert "YUN-GUEST-READY" in log

    in_use = await api.delete(f"/api/v1/images/{image['uuid']}")
    assert in_use.status_code == 409 and "vm1" in in_use.json()["detail"]

    resp = await api.delete(f"/api/v1/vms/{vm_uuid}")
    assert (await cluster.wait_task(resp.json()["task"]["uuid"]))["state"] == "succeeded"
    assert (await api.get(f"/api/v1/vms/{vm_uuid}")).status_code == 404
    assert await node.agent.driver.get_domain(vm_uuid) is None
    assert vm_uuid not in await node.agent.disks.vm_disk_ids()
    assert vm_uuid not in await node.agent.network.vm_ports()
    nodes = (await api.get("/api/v1/nodes")).json()["items"]
    assert all(n["vcpus_reserved"] == 0 and n["memory_reserved_mb"] == 0 for n in nodes)
    assert (await api.delete(f"/api/v1/images/{image['uuid']}")).status_code == 204
