"""Placement (F-BALANCE, rule 5): the least-loaded node that fits, reserved in one transaction.

The reservation is a conditional UPDATE that only succeeds while the node still has
room, so two control servers placing at once can never overbook a node; within one
server a lock keeps the choice balanced (each placement sees the previous one).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession

from yun.control.db.models import NodeRow
from yun.proto.errors import InsufficientCapacity


@dataclass(frozen=True)
class Request:
    vcpus: int
    memory_mb: int
    disk_gb: int


def load_after(node: NodeRow, req: Request) -> float:
    """The node's weighted load if ``req`` were placed on it (lower is better)."""
    memory = (node.memory_reserved_mb + req.memory_mb) / max(node.memory_mb, 1)
    vcpus = (node.vcpus_reserved + req.vcpus) / max(node.vcpus, 1)
    disk = (node.disk_reserved_gb + req.disk_gb) / max(node.disk_gb, 1)
    return 0.45 * memory + 0.25 * vcpus + 0.15 * disk + 0.15 * min(node.cpu_load, 1.0)


def fits(node: NodeRow, req: Request) -> bool:
    return (
        node.vcpus - node.vcpus_reserved >= req.vcpus
        and node.memory_mb - node.memory_reserved_mb >= req.memory_mb
        and node.disk_gb - node.disk_reserved_gb >= req.disk_gb
    )


class Placement:
    """Chooses nodes and holds their capacity."""

    def __init__(self) -> None:
        self._lock = asyncio.Lock()

    async def reserve(self, session: AsyncSession, req: Request) -> NodeRow:
        """Reserve ``req`` on the best node; raise :class:`InsufficientCapacity` if none fits."""
        async with self._lock:
            nodes = (await session.scalars(select(NodeRow).where(NodeRow.status == "up"))).all()
            candidates = sorted((n for n in nodes if fits(n, req)),
                                key=lambda n: load_after(n, req))
            for node in candidates:
                result = await session.execute(
                    update(NodeRow)
                    .where(NodeRow.uuid == node.uuid)
                    .where(NodeRow.vcpus - NodeRow.vcpus_reserved >= req.vcpus)
                    .where(NodeRow.memory_mb - NodeRow.memory_reserved_mb >= req.memory_mb)
                    .where(NodeRow.disk_gb - NodeRow.disk_reserved_gb >= req.disk_gb)
                    .values(
                        vcpus_reserved=NodeRow.vcpus_reserved + req.vcpus,
                        memory_reserved_mb=NodeRow.memory_reserved_mb + req.memory_mb,
                        disk_reserved_gb=NodeRow.disk_reserved_gb + req.disk_gb,
                    )
                    .execution_options(synchronize_session=False)
                )
                if result.rowcount == 1:  # type: ignore[attr-defined]
                    await session.refresh(node)
                    return node
            up = len(nodes)
            raise InsufficientCapacity(
                f"no node can host {req.vcpus} vCPU, {req.memory_mb} MiB memory, "
                f"{req.disk_gb} GiB disk ({up} node(s) up)"
            )

    @staticmethod
    async def release(session: AsyncSession, node_uuid: str, req: Request) -> None:
        """Give back what :meth:`reserve` held (never below zero)."""
        node = await session.get(NodeRow, node_uuid)
        if node is None:
            return
        node.vcpus_reserved = max(0, node.vcpus_reserved - req.vcpus)
        node.memory_reserved_mb = max(0, node.memory_reserved_mb - req.memory_mb)
        node.disk_reserved_gb = max(0, node.disk_reserved_gb - req.disk_gb)
