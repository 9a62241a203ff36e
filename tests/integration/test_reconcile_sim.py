"""Recovery on nodes (issue 6): every VM state has a way out, and the node's view and the
control server's agree after node crashes, failed rollbacks, deletes on a down node and
a domain-server restart."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import time
import uuid
from pathlib import Path
from typing import Any

from sqlalchemy import select

from tests.integration.conftest import upload
from yun.control.db.models import AddressRow, ImageRow, VmRow
from yun.node.hypervisor.sim.hostfile import FILE_NAME
from yun.node.service import NodeService
from yun.proto.components import ComponentType
from yun.proto.messages import CloudInitSpec, DomainSpec, NicSpec
from yun.testing.cluster import SimCluster
from yun.testing.waiting import eventually


async def vm_of(cluster: SimCluster, vm_uuid: str) -> dict[str, Any]:
    assert cluster.api is not None
    return dict((await cluster.api.get(f"/api/v1/vms/{vm_uuid}")).json())


async def node_of(cluster: SimCluster, node_uuid: str) -> dict[str, Any]:
    assert cluster.api is not None
    return dict((await cluster.api.get(f"/api/v1/nodes/{node_uuid}")).json())


async def create_vm(cluster: SimCluster, name: str) -> dict[str, Any]:
    assert cluster.api is not None
    resp = await cluster.api.post("/api/v1/vms", json={"name": name, "image": "img"})
    assert resp.status_code == 202, resp.text
    task = await cluster.wait_task(resp.json()["task"]["uuid"])
    assert task["state"] == "succeeded", task
    return await vm_of(cluster, resp.json()["resource"]["uuid"])


def index_of(cluster: SimCluster, node_uuid: str) -> int:
    return next(i for i, n in enumerate(cluster.node_services)
                if n.agent.node_id == node_uuid)


async def holds(node: NodeService, vm_uuid: str) -> bool:
    """Whether the node holds anything for the VM: domain, lease or disk."""
    return (await node.agent.driver.get_domain(vm_uuid) is not None
            or vm_uuid in await node.agent.network.vm_ports()
            or vm_uuid in await node.agent.disks.vm_disk_ids())


async def addresses_of(cluster: SimCluster, vm_uuid: str) -> list[str]:
    assert cluster.control is not None
    async with cluster.control.db.session() as session:
        return list((await session.scalars(
            select(AddressRow.ip).where(AddressRow.vm_uuid == vm_uuid))).all())


async def no_reservations(cluster: SimCluster) -> bool:
    assert cluster.api is not None
    nodes = (await cluster.api.get("/api/v1/nodes")).json()["items"]
    return all(n["vcpus_reserved"] == 0 and n["memory_reserved_mb"] == 0
               and n["disk_reserved_gb"] == 0 for n in nodes)


async def test_host_crash_brings_domains_back_shut_off(cluster: SimCluster,
                                                       small_qcow2: Path) -> None:
    """A crashed sim host keeps its domains (shut off), like a libvirt host: the VM is
    stopped, keeps its address, and starts again."""
    assert cluster.api is not None
    await upload(cluster, small_qcow2)
    vm = await create_vm(cluster, "survivor")
    index = index_of(cluster, vm["node_uuid"])
    state_file = cluster.node_services[index].settings.state_dir / FILE_NAME
    saved = json.loads(state_file.read_text())
    assert saved["domains"][vm["uuid"]]["state"] == "running"
    assert saved["ports"][vm["mac"]] == {**saved["ports"][vm["mac"]], "vm_uuid": vm["uuid"],
                                         "ip": vm["ip"]}

    await cluster.restart_node(index)

    async def stopped() -> bool:
        return (await vm_of(cluster, vm["uuid"]))["state"] == "stopped"
    await eventually(stopped, timeout=60, what="VM stopped after the host crash")
    after = await vm_of(cluster, vm["uuid"])
    assert after["ip"] == vm["ip"] and after["node_uuid"] == vm["node_uuid"]
    resp = await cluster.api.post(f"/api/v1/vms/{vm['uuid']}/start")
    assert (await cluster.wait_task(resp.json()["task"]["uuid"]))["state"] == "succeeded"
    assert (await vm_of(cluster, vm["uuid"]))["state"] == "running"


async def test_unknown_vm_whose_domain_is_gone_becomes_error_and_releases(
        cluster: SimCluster, small_qcow2: Path) -> None:
    """A VM left `unknown` while its node was away, whose node returns without its domain
    (but with its lease and disk), ends in error with a reason; the leftovers are removed
    and only then are its address and reservation released."""
    assert cluster.api is not None and cluster.control is not None
    await upload(cluster, small_qcow2)
    vm = await create_vm(cluster, "lost")
    node_uuid = vm["node_uuid"]
    index = index_of(cluster, node_uuid)
    node = await cluster.crash_node(index)

    async def unknown() -> bool:
        return (await vm_of(cluster, vm["uuid"]))["state"] == "unknown"
    await eventually(unknown, timeout=60, what="VM unknown while its node is away")
    assert (await node_of(cluster, node_uuid))["status"] == "down"

    # The host lost the domain's definition; its lease and disk are still there.
    state_file = node.settings.state_dir / FILE_NAME
    saved = json.loads(state_file.read_text())
    del saved["domains"][vm["uuid"]]
    state_file.write_text(json.dumps(saved))
    node = await cluster.start_node(index)

    async def settled() -> bool:
        current = await vm_of(cluster, vm["uuid"])
        if await holds(node, vm["uuid"]):
            # Whatever the node still holds keeps the address held.
            assert await addresses_of(cluster, vm["uuid"]) == [vm["ip"]]
        return current["state"] == "error" and current["ip"] is None
    await eventually(settled, timeout=60, what="VM in error with its address released")
    current = await vm_of(cluster, vm["uuid"])
    assert "vanished" in current["error"] and current["node_uuid"] is None
    assert not await holds(node, vm["uuid"])
    assert await addresses_of(cluster, vm["uuid"]) == []
    assert await no_reservations(cluster)

    async def up() -> bool:
        return (await node_of(cluster, node_uuid))["status"] == "up"
    await eventually(up, timeout=60, what="node up again")
    # The errored VM is deleted at once: the node holds nothing for it.
    resp = await cluster.api.delete(f"/api/v1/vms/{vm['uuid']}")
    assert (await cluster.wait_task(resp.json()["task"]["uuid"]))["state"] == "succeeded"
    assert (await cluster.api.get(f"/api/v1/vms/{vm['uuid']}")).status_code == 404


async def test_failed_rollback_keeps_address_until_node_confirms(
        cluster: SimCluster, small_qcow2: Path) -> None:
    """A create whose rollback fails half-way (domain undefined, lease removal failed)
    keeps the VM's address and reservation until the node's report shows it holds
    nothing for the VM; the cleanup removes the leftovers, and the address is free again."""
    assert cluster.api is not None
    await upload(cluster, small_qcow2)
    for node in cluster.node_services:
        node.agent.driver.fail_next("start")  # type: ignore[attr-defined]
        # Twice: the removal before trying the next node, and the rollback's.
        node.agent.network.fail_next("release_ports", times=2)  # type: ignore[attr-defined]
    resp = await cluster.api.post("/api/v1/vms", json={"name": "half", "image": "img"})
    vm_uuid = resp.json()["resource"]["uuid"]
    task = await cluster.wait_task(resp.json()["task"]["uuid"])
    assert task["state"] == "failed"
    assert {s["name"]: s["state"] for s in task["steps"]}["provision"] == "rollback_failed"
    for node in cluster.node_services:  # the other node's faults were not used
        if not await holds(node, vm_uuid):
            node.agent.driver.clear_faults()  # type: ignore[attr-defined]
            node.agent.network.clear_faults()  # type: ignore[attr-defined]

    async def released() -> bool:
        current = await vm_of(cluster, vm_uuid)
        held = [n for n in cluster.node_services if await holds(n, vm_uuid)]
        if held:
            assert current["ip"] is not None and await addresses_of(cluster, vm_uuid), (
                "the address was released while a node still holds the VM")
        return not held and current["ip"] is None
    await eventually(released, timeout=60, what="leftovers removed and address released")
    current = await vm_of(cluster, vm_uuid)
    assert current["state"] == "error" and current["error"].startswith("create failed:")
    assert current["node_uuid"] is None
    assert await no_reservations(cluster)
    # The next creates get addresses that work.
    for name in ("next-1", "next-2"):
        await create_vm(cluster, name)


async def test_delete_on_down_node_waits_for_the_node(cluster: SimCluster,
                                                      small_qcow2: Path) -> None:
    """U-SPLIT: deleting a VM whose node is down keeps it `deleting` with its address and
    reservation; when the node returns it is marked up only after the guest is removed,
    and the delete then finishes."""
    assert cluster.api is not None
    await upload(cluster, small_qcow2)
    vm = await create_vm(cluster, "split")
    node_uuid = vm["node_uuid"]
    index = index_of(cluster, node_uuid)
    await cluster.crash_node(index)

    async def down() -> bool:
        return (await node_of(cluster, node_uuid))["status"] == "down"
    await eventually(down, timeout=60, what="node down")
    resp = await cluster.api.delete(f"/api/v1/vms/{vm['uuid']}")
    await cluster.wait_task(resp.json()["task"]["uuid"])
    current = await vm_of(cluster, vm["uuid"])
    assert current["state"] == "deleting" and "is down" in current["error"]
    assert await addresses_of(cluster, vm["uuid"]) == [vm["ip"]]
    assert (await node_of(cluster, node_uuid))["vcpus_reserved"] > 0

    node = await cluster.start_node(index)
    # No placement may land on the node while the deleted guest is still there. The status
    # is read first: a guest still there after an "up" broke the rule, while the other
    # order races the cleanup (removed, reported and marked up during the status read).
    for _ in range(1200):
        status = (await node_of(cluster, node_uuid))["status"]
        if await node.agent.driver.get_domain(vm["uuid"]) is None:
            break
        assert status == "down"
        await asyncio.sleep(0.05)

    async def gone() -> bool:
        assert cluster.api is not None
        return (await cluster.api.get(f"/api/v1/vms/{vm['uuid']}")).status_code == 404
    await eventually(gone, timeout=60, what="delete finished once the node confirmed")
    assert not await holds(node, vm["uuid"])
    assert await addresses_of(cluster, vm["uuid"]) == []
    assert await no_reservations(cluster)

    async def up() -> bool:
        return (await node_of(cluster, node_uuid))["status"] == "up"
    await eventually(up, timeout=60, what="node up after its orphans were removed")


async def test_orphan_cleanup_is_one_background_job_per_node(cluster: SimCluster) -> None:
    """Domains, leases and disks no VM owns are removed off the report path, one cleanup
    in flight per node however many reports arrive meanwhile."""
    assert cluster.control is not None
    node = cluster.node_services[0]
    agent = node.agent
    domain_only, port_only, disk_only = (str(uuid.uuid4()) for _ in range(3))
    await agent.driver.ensure_defined(DomainSpec(uuid=domain_only, name="stray", vcpus=1,
                                                 memory_mb=64), [], [])
    # An address of the node's sandbox subnet (the control server gave it one).
    assert agent.network.settings is not None
    stray_ip = str(ipaddress.IPv4Network(agent.network.settings.subnet)[200])
    await agent.network.ensure_port(port_only, NicSpec(nic_id="n0", mac="52:54:00:aa:bb:cc",
                                                       ip=stray_ip))
    # A VM's files with no domain: its cloud-init seed.
    await agent.disks.ensure_seed(disk_only, CloudInitSpec(instance_id=disk_only,
                                                           hostname="stray"))

    # The node takes its time to remove (a slow host): count what it is asked to do.
    # Two jobs at once would remove an orphan twice at the same time (every report of the
    # flood below shows all three). A report the node took just before a removal ended
    # may start a later job that removes it again: harmless (idempotent), and seen on a
    # loaded machine, so only removals of one orphan that overlap count.
    calls: list[str] = []
    in_flight: set[str] = set()
    overlapping: list[str] = []
    remove = agent.remove

    async def slow_remove(vm_uuid: str, delete_volumes: list[str] | None = None) -> None:
        calls.append(vm_uuid)
        if vm_uuid in in_flight:
            overlapping.append(vm_uuid)
        in_flight.add(vm_uuid)
        try:
            await asyncio.sleep(4)
            await remove(vm_uuid, delete_volumes)
        finally:
            in_flight.discard(vm_uuid)
    agent.remove = slow_remove  # type: ignore[method-assign]

    registry = cluster.control.nodes
    for _ in range(4):  # reports keep coming while the first cleanup runs
        snapshot = await agent.snapshot()
        started = time.monotonic()
        await registry.report(snapshot.model_copy(update={"acked_seq": 0}))
        assert time.monotonic() - started < 3, "the report waited for the cleanup"
        await asyncio.sleep(0.3)
    assert registry.cleanup_running(agent.node_id)

    async def clean() -> bool:
        return not any([await holds(node, u) for u in (domain_only, port_only, disk_only)])
    await eventually(clean, timeout=60, what="orphans removed")
    assert set(calls) == {domain_only, port_only, disk_only}, calls
    assert not overlapping, calls


async def test_domain_server_restart_changes_nothing_for_running_work(
        cluster: SimCluster, small_qcow2: Path) -> None:
    """Peers not yet rejoined after a domain-server restart are not taken for dead nodes:
    no VM goes unknown, no node goes down, and creates under way succeed."""
    assert cluster.api is not None and cluster.control is not None
    await cluster.wait_association()  # what is watched below holds from here on
    await upload(cluster, small_qcow2)
    running = [await create_vm(cluster, f"before-{i}") for i in range(2)]
    for node in cluster.node_services:
        node.agent.driver.latency = 0.3  # type: ignore[attr-defined]
    resps = [await cluster.api.post("/api/v1/vms", json={"name": f"during-{i}",
                                                         "image": "img"})
             for i in range(6)]
    seen: set[str] = set()
    answers: set[int] = set()
    peers_lost: set[str] = set()
    watching = True

    async def watch() -> None:
        assert cluster.control is not None and cluster.gateway is not None
        assert cluster.api is not None
        while watching:
            async with cluster.control.db.session() as session:
                seen.update((await session.scalars(select(VmRow.state))).all())
            # The gateway keeps its control server and the control server its nodes,
            # although their rejoins reach the new domain server one by one.
            if not cluster.gateway.membership.peers_of(ComponentType.CONTROL):
                peers_lost.add("gateway lost its control server")
            known = {p.component_id for p in
                     cluster.control.ctx.membership.peers_of(ComponentType.NODE)}
            if len(known) < len(cluster.node_services):
                peers_lost.add("control server lost a node")
            answers.add((await cluster.api.get("/api/v1/vms", params={"limit": 1}))
                        .status_code)
            await asyncio.sleep(0.1)

    watcher = asyncio.create_task(watch())
    await cluster.restart_domain()
    tasks = [await cluster.wait_task(r.json()["task"]["uuid"]) for r in resps]
    # Keep watching past the presence TTL, when nodes not yet rejoined would look gone.
    await asyncio.sleep(cluster.ttl * 3)
    watching = False
    await watcher
    assert [t["state"] for t in tasks] == ["succeeded"] * len(tasks), [
        t.get("error") for t in tasks]
    assert "unknown" not in seen and "error" not in seen, seen
    assert not peers_lost, peers_lost
    assert answers == {200}, answers
    nodes = (await cluster.api.get("/api/v1/nodes")).json()["items"]
    assert [n["status"] for n in nodes] == ["up"] * len(nodes)
    for vm in running:
        assert (await vm_of(cluster, vm["uuid"]))["state"] == "running"


async def test_image_delete_marks_the_record_before_the_bytes(cluster: SimCluster,
                                                              small_qcow2: Path) -> None:
    """While an image's bytes are being deleted (here: the storage server is away, so the
    delete cannot finish) no create can pick the image."""
    assert cluster.api is not None and cluster.storage is not None
    image = await upload(cluster, small_qcow2)
    await cluster.storage.stop()
    resp = await cluster.api.delete(f"/api/v1/images/{image['uuid']}")
    assert resp.status_code == 503, resp.text
    shown = (await cluster.api.get(f"/api/v1/images/{image['uuid']}")).json()
    assert shown["status"] == "deleting" and "could not be deleted" in shown["error"]
    resp = await cluster.api.post("/api/v1/vms", json={"name": "late", "image": "img"})
    assert resp.status_code == 409 and "deleting" in resp.text


async def test_abandoned_upload_expires(cluster: SimCluster) -> None:
    """An upload whose gateway died stays `uploading` no longer than the upload timeout:
    it becomes error with a reason, and its Idempotency-Key is free again."""
    assert cluster.control is not None
    from yun.control.services.images import expire_uploads

    ctx = cluster.control.ctx
    async with ctx.db.session() as session:
        project = (await session.scalars(select(VmRow.project_uuid))).first()
        from yun.control.db.models import ProjectRow
        project = (await session.scalars(select(ProjectRow.uuid))).first()
        old, new = str(uuid.uuid4()), str(uuid.uuid4())
        from datetime import timedelta

        from yun.control.db.models import utcnow
        for image_uuid, age in ((old, 3600), (new, 0)):
            session.add(ImageRow(uuid=image_uuid, name=f"up-{age}", project_uuid=project,
                                 status="uploading", upload_key=image_uuid.replace("-", ""),
                                 created_at=utcnow() - timedelta(seconds=age),
                                 updated_at=utcnow() - timedelta(seconds=age)))
    assert await expire_uploads(ctx, 600) == [old]
    async with ctx.db.session() as session:
        expired = await session.get(ImageRow, old)
        fresh = await session.get(ImageRow, new)
        assert expired is not None and fresh is not None
        assert expired.status == "error" and "abandoned" in (expired.error or "")
        assert expired.upload_key is None
        assert fresh.status == "uploading"
