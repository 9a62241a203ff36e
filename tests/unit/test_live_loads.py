"""Node loads: kept in memory, written in batches, nothing lost when a write fails."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import select

from yun.control.db.models import NodeRow
from yun.control.db.session import Database
from yun.control.scheduler.loads import LiveLoads, Load


async def test_loads_are_written_once_then_only_when_reported_again(tmp_path: Path) -> None:
    db = Database(f"sqlite+aiosqlite:///{tmp_path}/l.db")
    await db.migrate()
    async with db.session() as s:
        for i in range(3):
            s.add(NodeRow(uuid=f"n{i}", name=f"n{i}", url="https://x", hypervisor="sim",
                          accel="sim", sandbox_subnet=f"10.0.{i}.0/24"))
    loads = LiveLoads()
    at = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)
    for i in range(3):
        loads.record(f"n{i}", Load(cpu=0.1 * i, memory_used_mb=100 * i, disk_used_gb=i,
                                   net=0.5, at=at))
    dirty = loads.take_dirty()
    assert dirty == ["n0", "n1", "n2"] and loads.take_dirty() == []
    async with db.session() as s:
        assert await loads.write(s, dirty) == []
    async with db.session() as s:
        rows = {n.uuid: n for n in (await s.scalars(select(NodeRow))).all()}
        assert rows["n2"].memory_used_mb == 200 and rows["n2"].net_load == 0.5
        assert rows["n1"].last_report_at == at
    # A write that fails leaves the loads to be written next time.
    loads.record("n0", Load(cpu=0.9, memory_used_mb=1, disk_used_gb=1, net=0.0, at=at))
    dirty = loads.take_dirty()
    with pytest.raises(RuntimeError):
        async with db.session():
            raise RuntimeError("database gone")
    loads.mark_dirty(dirty)
    assert loads.take_dirty() == ["n0"]
    await db.dispose()
