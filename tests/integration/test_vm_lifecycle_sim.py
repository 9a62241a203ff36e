"""A VM's life through every real service, on the sim hypervisor."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tests.integration.conftest import upload
from yun.testing.cluster import SimCluster


def assert_node_built_what_was_asked(agent: Any, vm: dict, image: dict) -> None:
    """What the control server had to ask the node for, as the sim node recorded it: a
    domain of the VM's size, one disk of its size on the VM's image (downloaded with
    its checksum), one NIC whose MAC and address are the VM's, leased to its name."""
    domain = agent.driver.domains[vm["uuid"]]
    assert (domain.spec.name, domain.spec.vcpus, domain.spec.memory_mb) == ("vm1", 2, 384)
    [disk] = domain.spec.disks
    assert (disk.size_gb, disk.image_id, disk.image_sha256) == (3, image["uuid"],
                                                                image["sha256"])
    assert agent.disks.images[image["uuid"]].sha256 == image["sha256"]
    # The disk is the VM's root volume, kept by the volume's id (C-STO).
    assert disk.volume_id is not None and disk.create
    volume = agent.disks.volumes[disk.volume_id]
    assert (volume.size_gb, volume.image_id) == (3, image["uuid"])
    # Besides its disks, every VM has a CD drive (empty) and its cloud-init seed.
    assert [(d.disk_id, d.path.stem) for d in domain.disks
            if d.device == "disk" and d.path is not None] == [(disk.disk_id, disk.volume_id)]
    assert sorted(d.disk_id for d in domain.disks if d.device == "cdrom") == ["cdrom",
                                                                              "cidata"]
    [port] = agent.network.ports[vm["uuid"]]
    assert (port.mac, port.ip, port.exposure) == (vm["mac"], vm["ip"], "private")
    [nic] = domain.spec.nics
    assert (nic.network, nic.hostname) == ("sandbox", "vm1")
    assert [(n.mac, n.tap) for n in domain.nics] == [(port.mac, port.tap)]


async def test_create_power_delete(cluster: SimCluster, small_qcow2: Path) -> None:
    api = cluster.api
    assert api is not None
    image = await upload(cluster, small_qcow2)
    assert image["status"] == "active" and image["format"] == "qcow2"

    resp = await api.post("/api/v1/vms", json={"name": "vm1", "image": "img", "vcpus": 2,
                                               "memory_mb": 384, "disk_gb": 3})
    assert resp.status_code == 202, resp.text
    vm_uuid = resp.json()["resource"]["uuid"]
    task = await cluster.wait_task(resp.json()["task"]["uuid"])
    assert task["state"] == "succeeded", task
    # A private VM takes no public address and no router forwards to it, and the node
    # answered the provision with the domain running: those three steps had nothing to
    # do, and are recorded so without a journal write of their own.
    assert [(s["name"], s["state"]) for s in task["steps"]] == [
        ("schedule", "done"), ("address", "skipped"), ("provision", "done"),
        ("forwarders", "skipped"), ("confirm", "skipped")]
    vm = (await api.get(f"/api/v1/vms/{vm_uuid}")).json()
    assert vm["state"] == "running" and vm["ip"].startswith("10.64.")
    node = next(n for n in cluster.node_services if n.agent.node_id == vm["node_uuid"])
    assert (await node.agent.driver.get_domain(vm_uuid)).state == "running"
    assert_node_built_what_was_asked(node.agent, vm, image)

    for action, state, domain_state in (("stop", "stopped", "shutoff"),
                                        ("start", "running", "running"),
                                        ("reboot", "running", "running")):
        resp = await api.post(f"/api/v1/vms/{vm_uuid}/{action}")
        assert resp.status_code == 202, resp.text
        assert (await cluster.wait_task(resp.json()["task"]["uuid"]))["state"] == "succeeded"
        assert (await api.get(f"/api/v1/vms/{vm_uuid}")).json()["state"] == state
        # ... and the hypervisor was really told: its domain is in that state.
        assert (await node.agent.driver.get_domain(vm_uuid)).state == domain_state

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
