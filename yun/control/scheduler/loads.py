"""The nodes' latest load reports, kept in memory (F-BALANCE).

Each node pushes its CPU, memory, disk and network load every report interval. Writing
each report to the database would cost one transaction per node per interval for a
figure only the scheduler reads, so the control server keeps the latest in memory and
persists what changed in batches every ``persist_interval`` seconds: after a restart
the scheduler starts from the persisted figures, at most that old, until the nodes
report again.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import Table, bindparam, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from yun.control.db.models import NodeRow


@dataclass(frozen=True, slots=True)
class Load:
    cpu: float
    memory_used_mb: int
    disk_used_gb: int
    net: float
    at: datetime


class LiveLoads:
    """Latest load per node; what changed since the last :meth:`persist`."""

    def __init__(self) -> None:
        self._loads: dict[str, Load] = {}
        self._dirty: set[str] = set()

    def record(self, node_uuid: str, load: Load) -> None:
        self._loads[node_uuid] = load
        self._dirty.add(node_uuid)

    def get(self, node_uuid: str) -> Load | None:
        return self._loads.get(node_uuid)

    def last_report(self, node_uuid: str) -> datetime | None:
        load = self._loads.get(node_uuid)
        return load.at if load is not None else None

    def forget(self, node_uuid: str) -> None:
        self._loads.pop(node_uuid, None)
        self._dirty.discard(node_uuid)

    def take_dirty(self) -> list[str]:
        """The nodes whose load changed since the last call, in a stable order."""
        dirty, self._dirty = self._dirty, set()
        return sorted(dirty)

    def mark_dirty(self, node_uuids: Iterable[str]) -> None:
        """Write these again next time (their write was skipped or failed)."""
        self._dirty.update(u for u in node_uuids if u in self._loads)

    async def write(self, session: AsyncSession, node_uuids: list[str]) -> list[str]:
        """Write the loads of ``node_uuids``; return the ones left for next time.

        Node rows that a placement holds locked are skipped (``SKIP LOCKED`` on
        PostgreSQL), not waited for: a load figure is never worth stalling a placement
        batch, or queueing every later placement behind this write."""
        free = set((await session.scalars(
            select(NodeRow.uuid).where(NodeRow.uuid.in_(node_uuids))
            .with_for_update(skip_locked=True))).all())
        rows = [{"node": u, "cpu": load.cpu, "mem": load.memory_used_mb,
                 "disk": load.disk_used_gb, "net": load.net, "at": load.at}
                for u in node_uuids if u in free and (load := self._loads.get(u)) is not None]
        if rows:
            # Core executemany over the table: one statement for every node.
            table = NodeRow.__table__
            assert isinstance(table, Table)
            await session.execute(
                update(table).where(table.c.uuid == bindparam("node")).values(
                    cpu_load=bindparam("cpu"), memory_used_mb=bindparam("mem"),
                    disk_used_gb=bindparam("disk"), net_load=bindparam("net"),
                    last_report_at=bindparam("at")), rows)
        return [u for u in node_uuids if u not in free]
