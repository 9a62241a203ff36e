"""The nodes' latest load reports, kept in memory (F-BALANCE).

Each node pushes its CPU, memory, disk and network load every report interval. Writing
each report to the database would cost one transaction per node per interval for a
figure only the scheduler reads, so the control server keeps the latest in memory and
persists what changed in one batch every ``persist_interval`` seconds: after a restart
the scheduler starts from the persisted figures, at most that old, until the nodes
report again.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import Table, bindparam, update
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

    async def persist(self, session: AsyncSession) -> int:
        """Write the loads reported since the last call in one statement; return how many."""
        dirty, self._dirty = self._dirty, set()
        rows = [{"node": u, "cpu": load.cpu, "mem": load.memory_used_mb,
                 "disk": load.disk_used_gb, "net": load.net, "at": load.at}
                for u in dirty if (load := self._loads.get(u)) is not None]
        if not rows:
            return 0
        try:
            # Core executemany over the table: one statement for every node.
            table = NodeRow.__table__
            assert isinstance(table, Table)
            await session.execute(
                update(table).where(table.c.uuid == bindparam("node")).values(
                    cpu_load=bindparam("cpu"), memory_used_mb=bindparam("mem"),
                    disk_used_gb=bindparam("disk"), net_load=bindparam("net"),
                    last_report_at=bindparam("at")), rows)
        except BaseException:
            self._dirty |= dirty  # written next time
            raise
        return len(rows)
