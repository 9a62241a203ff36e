"""Placement: least-loaded, never overbooked, address given in the same transaction."""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from pathlib import Path

from sqlalchemy import select

from yun.control.allocators.addresses import AddressAllocator
from yun.control.db.models import AddressRow, ImageRow, NodeRow, ProjectRow, VmRow
from yun.control.db.session import Database
from yun.control.scheduler.placement import Placement, Request
from yun.proto.errors import InsufficientCapacity


async def setup(tmp_path: Path, nodes: int, vms: int, vcpus: int = 4
                ) -> tuple[Database, list[str]]:
    db = Database(f"sqlite+aiosqlite:///{tmp_path}/p.db")
    await db.migrate()
    vm_uuids = [str(uuid.uuid4()) for _ in range(vms)]
    async with db.session() as s:
        project = (await s.scalars(select(ProjectRow.uuid))).first()
        s.add(ImageRow(uuid="img", name="img", status="active", project_uuid=project))
        for i in range(nodes):
            s.add(NodeRow(uuid=f"n{i}", name=f"n{i}", url="http://x", hypervisor="sim",
                          accel="sim", vcpus=vcpus, memory_mb=4096, disk_gb=100,
                          nat_subnet="10.77.0.0/24"))
        for u in vm_uuids:
            s.add(VmRow(uuid=u, name=u[:8], state="building", vcpus=1, memory_mb=256,
                        disk_gb=1, image_uuid="img", project_uuid=project))
    return db, vm_uuids


async def test_concurrent_placements_spread_and_never_overbook(tmp_path: Path) -> None:
    db, vms = await setup(tmp_path, nodes=5, vms=25)
    placement = Placement(db, batch_size=7, on_placed=AddressAllocator().on_placed)
    results = await asyncio.gather(*(placement.place(v, Request(1, 256, 1)) for v in vms),
                                   return_exceptions=True)
    placed = [r for r in results if isinstance(r, NodeRow)]
    refused = [r for r in results if isinstance(r, InsufficientCapacity)]
    assert len(placed) == 20 and len(refused) == 5  # 5 nodes x 4 vCPU
    assert "no node can host 1 vCPU" in str(refused[0])
    async with db.session() as s:
        nodes = (await s.scalars(select(NodeRow))).all()
        assert all(n.vcpus_reserved == 4 for n in nodes)
        rows = (await s.scalars(select(VmRow).where(VmRow.node_uuid.is_not(None)))).all()
        assert Counter(v.node_uuid for v in rows) == {f"n{i}": 4 for i in range(5)}
        addresses = (await s.scalars(select(AddressRow))).all()
        assert len(addresses) == 20
        assert len({(a.scope, a.ip) for a in addresses}) == 20
        assert all(v.ip and v.mac and v.mac.startswith("52:54:00:") for v in rows)
    await placement.stop()
    await db.dispose()


async def test_release_gives_capacity_back_never_below_zero(tmp_path: Path) -> None:
    db, vms = await setup(tmp_path, nodes=1, vms=1)
    placement = Placement(db)
    node = await placement.place(vms[0], Request(1, 256, 1))
    async with db.session() as s:
        await Placement.release(s, node.uuid, Request(1, 256, 1))
        await Placement.release(s, node.uuid, Request(1, 256, 1))
    async with db.session() as s:
        row = await s.get(NodeRow, node.uuid)
        assert row is not None and (row.vcpus_reserved, row.memory_reserved_mb) == (0, 0)
    await placement.stop()
    await db.dispose()


def test_dhcp_hostname_from_vm_name() -> None:
    from yun.control.flows.vm import hostname_for

    assert hostname_for("demo") == "demo"
    assert hostname_for("Web_1.prod") == "web-1-prod"
    assert hostname_for("___") is None
    assert len(hostname_for("a" * 70) or "") == 63
