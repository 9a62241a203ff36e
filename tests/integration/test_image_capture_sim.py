"""Host images on the sim cloud (F-IMAGE): `POST /api/v1/images/from-vm` makes an image
of a VM's disk, stopped or running; the copy is a real qcow2 on the storage server
carrying the source's content, and a VM made from the image starts with that content.
Bad input: an unknown VM or disk, a busy VM, no storage server, the storage server
killed during the export (the image goes, its quota comes back)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.integration.conftest import Cli, shown, upload
from tests.integration.test_network_modes_sim import create_vm, node_of
from yun.control.flows.image_capture import ExportVolume
from yun.node.storage.sim import exported_content
from yun.proto.components import ComponentType
from yun.testing.cluster import SimCluster


def api(cluster: SimCluster) -> httpx.AsyncClient:
    assert cluster.api is not None
    return cluster.api


async def root_volume(cluster: SimCluster, vm: dict[str, Any]) -> str:
    resp = await api(cluster).get("/api/v1/volumes", params={
        "q": f"kind=root and vm_uuid={vm['uuid']}"})
    assert resp.status_code == 200, resp.text
    [root] = resp.json()["items"]
    return str(root["uuid"])


async def capture(cluster: SimCluster, body: dict[str, Any],
                  headers: dict[str, str] | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """Make an image of a VM's disk and wait for the task: (the task, the image now)."""
    resp = await api(cluster).post("/api/v1/images/from-vm", json=body, headers=headers)
    assert resp.status_code == 202, resp.text
    image = resp.json()["resource"]
    assert (image["status"], image["name"]) == ("uploading", body["name"])
    task = await cluster.wait_task(resp.json()["task"]["uuid"])
    now = await api(cluster).get(f"/api/v1/images/{image['uuid']}")
    return task, now.json() if now.status_code == 200 else {"status": "gone"}


async def images_used(cluster: SimCluster) -> int:
    quota = (await api(cluster).get("/api/v1/quota")).json()
    return int(next(line["used"] for line in quota["lines"] if line["resource"] == "images"))


async def power(cluster: SimCluster, vm: str, action: str) -> None:
    resp = await api(cluster).post(f"/api/v1/vms/{vm}/{action}", params={"wait": 60})
    assert resp.status_code == 202 and resp.json()["task"]["state"] == "succeeded", resp.text


async def test_images_of_a_running_and_a_stopped_vm(one_on_each_db: SimCluster,
                                                    small_qcow2: Path) -> None:
    c = one_on_each_db
    await upload(c, small_qcow2)
    task, v1 = await create_vm(c, "web1")
    assert task["state"] == "succeeded", task
    disks = node_of(c, v1).agent.disks
    root = await root_volume(c, v1)
    disks.write(root, "written while running")
    used = await images_used(c)

    # Running: a live copy through the hypervisor, kept by the storage server.
    task, live = await capture(c, {"vm": v1["uuid"], "name": "web-live"})
    assert task["state"] == "succeeded", task
    assert (task["kind"], task["resource_uuid"], [s["name"] for s in task["steps"]]) == (
        "image.capture", v1["uuid"], ["export"])
    assert (live["status"], live["format"], live["visibility"]) == ("active", "qcow2",
                                                                    "project")
    assert live["sha256"] and live["size"] and live["virtual_size"] == 1 << 20
    assert disks.exports[-1] == (root, True)
    assert await images_used(c) == used + 1
    assert c.storage is not None
    stored = c.storage.store.images_dir / live["uuid"]
    assert await exported_content(stored) == "written while running"

    # Stopped: a copy of the closed volume; the image gets the content it has now.
    await power(c, "web1", "stop")
    disks.write(root, "written before the stop")
    task, cold = await capture(c, {"vm": "web1", "name": "web-golden",
                                   "description": "the golden web server",
                                   "tags": {"tier": "web"}})
    assert task["state"] == "succeeded", task
    assert (cold["status"], cold["description"], cold["tags"]) == (
        "active", "the golden web server", {"tier": "web"})
    assert disks.exports[-1] == (root, False)
    assert await exported_content(c.storage.store.images_dir / cold["uuid"]) == \
        "written before the stop"

    # A VM made from the image starts with the source's content.
    resp = await api(c).post("/api/v1/vms", json={"name": "web2", "image": "web-golden",
                                                  "memory_mb": 64, "disk_gb": 1})
    assert resp.status_code == 202, resp.text
    made = await c.wait_task(resp.json()["task"]["uuid"])
    assert made["state"] == "succeeded", made
    v2 = (await api(c).get("/api/v1/vms/web2")).json()
    assert node_of(c, v2).agent.disks.read(await root_volume(c, v2)) == \
        "written before the stop"
    # The image is in use: it cannot be deleted under the VM.
    resp = await api(c).delete("/api/v1/images/web-golden")
    assert resp.status_code == 409 and "web2" in resp.text, resp.text


async def test_bad_requests_and_a_storage_server_lost_mid_export(
        one: SimCluster, small_qcow2: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    c = one
    await upload(c, small_qcow2)
    _task, v1 = await create_vm(c, "db1")
    used = await images_used(c)

    # An unknown VM, an unknown disk: 404 naming them; nothing recorded.
    resp = await api(c).post("/api/v1/images/from-vm", json={"vm": "nope", "name": "x"})
    assert resp.status_code == 404 and "nope" in resp.text, resp.text
    resp = await api(c).post("/api/v1/images/from-vm",
                             json={"vm": "db1", "name": "x", "disk": "vdz"})
    assert resp.status_code == 404 and "no disk 'vdz'" in resp.text and "root" in resp.text
    resp = await api(c).post("/api/v1/images/from-vm", json={"vm": "db1", "name": "x",
                                                             "format": "raw"})
    assert resp.status_code == 422 and "format" in resp.text, resp.text
    assert (await api(c).get("/api/v1/images", params={"q": "name=x"})).json()["items"] == []
    assert await images_used(c) == used

    # A VM busy with another task (here its start, slowed down on the node): 409.
    await power(c, "db1", "stop")
    driver = node_of(c, v1).agent.driver
    driver.latency = 1.0
    try:
        resp = await api(c).post("/api/v1/vms/db1/start")
        assert resp.status_code == 202, resp.text
        busy = await api(c).post("/api/v1/images/from-vm", json={"vm": "db1", "name": "x"})
        assert busy.status_code == 409 and "vm.start" in busy.text, busy.text
        await c.wait_task(resp.json()["task"]["uuid"])
    finally:
        driver.latency = 0.0

    # The same name as an existing image is allowed, as for uploads; a repeated keyed
    # request answers the same image and task.
    key = {"Idempotency-Key": "capture-1"}
    first = await api(c).post("/api/v1/images/from-vm", json={"vm": "db1", "name": "img"},
                              headers=key)
    again = await api(c).post("/api/v1/images/from-vm", json={"vm": "db1", "name": "img"},
                              headers=key)
    assert first.status_code == again.status_code == 202, (first.text, again.text)
    assert first.json()["resource"]["uuid"] == again.json()["resource"]["uuid"]
    task = await c.wait_task(first.json()["task"]["uuid"])
    assert task["state"] == "succeeded", task
    assert await images_used(c) == used + 1

    # The storage server killed while the node uploads the copy: the task fails, the
    # image is gone and its quota back.
    monkeypatch.setattr(ExportVolume, "retry_deadline", 2.0)
    agent = node_of(c, v1).agent
    original = agent._upload_image
    assert c.storage is not None
    storage = c.storage

    async def kill_then_upload(req: Any, path: Path) -> Any:
        await storage.stop()
        return await original(req, path)

    monkeypatch.setattr(agent, "_upload_image", kill_then_upload)
    task, lost = await capture(c, {"vm": "db1", "name": "lost"})
    assert task["state"] == "failed" and "unreachable" in task["error"], task
    assert lost == {"status": "gone"}
    assert await images_used(c) == used + 1
    monkeypatch.setattr(agent, "_upload_image", original)

    # No storage server in the domain: 503 at once, nothing recorded.
    assert c.control is not None
    membership = c.control.ctx.membership
    for _ in range(200):
        if not membership.peers_of(ComponentType.STORAGE):
            break
        await asyncio.sleep(0.05)
    resp = await api(c).post("/api/v1/images/from-vm", json={"vm": "db1", "name": "y"})
    assert resp.status_code == 503 and "storage server" in resp.text, resp.text
    assert await images_used(c) == used + 1


async def test_cli_image_from_vm(cli: Cli, small_qcow2: Path) -> None:
    """`yun image from-vm` waits for the capture and prints the active image."""
    code, out = await cli("image", "upload", str(small_qcow2), "--name", "base")
    assert code == 0, out
    code, out = await cli("vm", "create", "web1", "--image", "base", "--memory", "64")
    assert code == 0, out
    image = await shown(cli, "image", "from-vm", "web1", "--name", "web-golden",
                        "--description", "golden")
    assert (image["name"], image["status"], image["format"], image["description"]) == (
        "web-golden", "active", "qcow2", "golden")
    code, out = await cli("image", "from-vm", "nope", "--name", "x")
    assert code == 1 and "no VM 'nope'" in out, out
    code, out = await cli("image", "from-vm", "web1", "--name", "y", "--no-wait")
    assert code == 0 and "task" in out, out
