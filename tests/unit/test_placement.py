"""Placement on the database: scheduler choice made real by per-class claims, with the
pool's overcommit ratios, an address in the same transaction, and an explained refusal."""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from pathlib import Path

import pytest
from sqlalchemy import select

from yun.control.db.models import (
    AddressRow,
    AllocationRow,
    ImageRow,
    InventoryRow,
    NodeRow,
    PoolRow,
    ProjectRow,
    VmRow,
)
from yun.control.db.session import Database
from yun.control.network.modes import on_placed
from yun.control.scheduler import inventory
from yun.control.scheduler.placement import Placed, Placement, Request
from yun.proto.errors import InsufficientCapacity


async def setup(tmp_path: Path, nodes: int, vms: int, vcpus: int = 1
                ) -> tuple[Database, list[str], str]:
    """``nodes`` nodes of ``vcpus`` CPUs in the default pool (vCPU ratio 4.0)."""
    db = Database(f"sqlite+aiosqlite:///{tmp_path}/p.db")
    await db.migrate()
    vm_uuids = [str(uuid.uuid4()) for _ in range(vms)]
    async with db.session() as s:
        project = (await s.scalars(select(ProjectRow.uuid))).first()
        pool = (await s.scalars(select(PoolRow).where(PoolRow.name == "default"))).one()
        s.add(ImageRow(uuid="img", name="img", status="active", project_uuid=project))
        for i in range(nodes):
            s.add(NodeRow(uuid=f"n{i}", name=f"n{i}", url="http://x", hypervisor="sim",
                          accel="sim", sandbox_subnet=f"10.77.{i}.0/24", pool_uuid=pool.uuid,
                          status="up"))
            await s.flush()
            await inventory.sync_inventory(s, f"n{i}", {
                "vcpu": (vcpus, 0), "memory_mb": (8192, 1024), "disk_gb": (100, 0)})
        for u in vm_uuids:
            s.add(VmRow(uuid=u, name=u[:8], state="building", vcpus=1, memory_mb=256,
                        disk_gb=1, image_uuid="img", project_uuid=project,
                        pool_uuid=pool.uuid))
    return db, vm_uuids, pool.uuid


async def test_concurrent_placements_spread_overcommit_and_never_overbook(
        tmp_path: Path) -> None:
    db, vms, pool = await setup(tmp_path, nodes=5, vms=25)
    placement = Placement(db, batch_size=7, on_placed=on_placed)
    results = await asyncio.gather(*(placement.place(v, Request(1, 256, 1, (pool,)))
                                     for v in vms), return_exceptions=True)
    placed = [r for r in results if isinstance(r, Placed)]
    refused = [r for r in results if isinstance(r, InsufficientCapacity)]
    # 5 nodes of 1 CPU at the default pool's vCPU ratio 4.0: 20 one-vCPU VMs, not 5.
    assert len(placed) == 20 and len(refused) == 5
    # The refusal says why, per filter, with the closest miss.
    assert "pool default: 5 nodes" in str(refused[0])
    assert "5 short of vCPU (best: 0 free of 1 needed)" in str(refused[0])
    async with db.session() as s:
        used = {(i.node_uuid, i.resource_class): i.used
                for i in (await s.scalars(select(InventoryRow))).all()}
        assert all(used[(f"n{i}", "vcpu")] == 4 for i in range(5))
        assert all(used[(f"n{i}", "memory_mb")] == 1024 for i in range(5))
        rows = (await s.scalars(select(VmRow).where(VmRow.node_uuid.is_not(None)))).all()
        assert Counter(v.node_uuid for v in rows) == {f"n{i}": 4 for i in range(5)}
        allocations = (await s.scalars(select(AllocationRow))).all()
        assert len(allocations) == 60  # three classes for each placed VM
        addresses = (await s.scalars(select(AddressRow))).all()
        assert len({(a.scope, a.ip) for a in addresses}) == 20
        assert all(v.ip and v.mac and v.mac.startswith("52:54:00:") for v in rows)
    await placement.stop()
    await db.dispose()


async def test_release_gives_capacity_back_once(tmp_path: Path) -> None:
    db, vms, pool = await setup(tmp_path, nodes=1, vms=1)
    placement = Placement(db)
    placed = await placement.place(vms[0], Request(1, 256, 1, (pool,)))
    async with db.session() as s:
        assert await inventory.release(s, vms[0]) == {"vcpu": 1, "memory_mb": 256,
                                                      "disk_gb": 1}
        assert await inventory.release(s, vms[0]) == {}  # a second release gives nothing
    async with db.session() as s:
        used = {i.resource_class: i.used for i in (await s.scalars(
            select(InventoryRow).where(InventoryRow.node_uuid == placed.node_uuid))).all()}
        assert used == {"vcpu": 0, "memory_mb": 0, "disk_gb": 0}
    await placement.stop()
    await db.dispose()


async def test_claim_refuses_what_the_ratio_does_not_allow(tmp_path: Path) -> None:
    db, _, _ = await setup(tmp_path, nodes=1, vms=0, vcpus=2)
    async with db.session() as s:
        ratios = {"vcpu": 1.5, "memory_mb": 1.0, "disk_gb": 1.0}
        assert await inventory.claim(s, "n0", {"vcpu": 3, "memory_mb": 7168}, ratios)
        # The vCPU class has room for nothing more; the memory claim made first in this
        # call is given back when the vCPU claim fails.
        assert not await inventory.claim(s, "n0", {"memory_mb": 0, "disk_gb": 1,
                                                   "vcpu": 1}, ratios)
        used = {i.resource_class: i.used for i in (await s.scalars(select(InventoryRow)))}
        assert used == {"vcpu": 3, "memory_mb": 7168, "disk_gb": 0}
    await db.dispose()


async def test_drained_node_gets_nothing_and_alternates_are_other_nodes(
        tmp_path: Path) -> None:
    db, vms, pool = await setup(tmp_path, nodes=3, vms=2, vcpus=4)
    async with db.session() as s:
        (await s.get(NodeRow, "n1")).admin_state = "drained"  # type: ignore[union-attr]
    placement = Placement(db)
    placed = await placement.place(vms[0], Request(1, 256, 1, (pool,)))
    assert placed.node_uuid != "n1" and "n1" not in placed.alternates
    assert placed.alternates and placed.node_uuid not in placed.alternates
    with pytest.raises(InsufficientCapacity, match="1 down or drained"):
        # Only the drained node is left once the two others are excluded.
        await placement.place(vms[1], Request(1, 256, 1, (pool,),
                                              exclude=frozenset({"n0", "n2"})))
    await placement.stop()
    await db.dispose()


@pytest.mark.parametrize("labels,fits", [({"ssd": "true"}, True), ({"gpu": "1"}, False)])
async def test_node_labels_are_matched(tmp_path: Path, labels: dict[str, str],
                                       fits: bool) -> None:
    db, vms, pool = await setup(tmp_path, nodes=2, vms=1, vcpus=4)
    async with db.session() as s:
        (await s.get(NodeRow, "n1")).labels = {"ssd": "true"}  # type: ignore[union-attr]
    placement = Placement(db)
    request = Request(1, 256, 1, (pool,), labels=labels)
    if fits:
        assert (await placement.place(vms[0], request)).node_uuid == "n1"
    else:
        with pytest.raises(InsufficientCapacity, match="2 missing labels gpu=1"):
            await placement.place(vms[0], request)
    await placement.stop()
    await db.dispose()


def test_dhcp_hostname_from_vm_name() -> None:
    from yun.control.flows.vm import hostname_for

    assert hostname_for("demo") == "demo"
    assert hostname_for("Web_1.prod") == "web-1-prod"
    assert hostname_for("___") is None
    assert len(hostname_for("a" * 70) or "") == 63


async def test_qos_limits_need_a_node_that_can_enforce_them(tmp_path: Path) -> None:
    from yun.control.flows.vm import qos_needs

    db, vms, pool = await setup(tmp_path, nodes=2, vms=1, vcpus=4)
    async with db.session() as s:
        node = await s.get(NodeRow, "n1")
        assert node is not None
        node.capabilities = ["qos_cpu", "qos_disk", "qos_net"]
    placement = Placement(db)
    needs = qos_needs({"bandwidth_kbit": 10_000})
    assert needs == {"qos_net"} and qos_needs({"cpu": "low"}) == frozenset()
    placed = await placement.place(vms[0], Request(1, 256, 1, (pool,), capabilities=needs))
    assert placed.node_uuid == "n1"  # n0 cannot shape a NIC
    async with db.session() as s:
        node = await s.get(NodeRow, "n1")
        assert node is not None
        node.capabilities = []
    placement.invalidate()
    async with db.session() as s:
        with pytest.raises(InsufficientCapacity, match="2 missing capabilities qos_disk"):
            await placement.check(s, Request(1, 256, 1, (pool,),
                                             capabilities=qos_needs({"write_iops_sec": 50})))
    await placement.stop()
    await db.dispose()
