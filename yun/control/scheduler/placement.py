"""Placement (F-BALANCE, rule 5): the least-loaded node that fits, reserved in one transaction.

The reservation is a conditional UPDATE that only succeeds while the node still has
room, so two control servers placing at once can never overbook a node. Within one
server, callers hold :attr:`Placement.lock` around the whole transaction, so each
placement sees the previous one committed and the choice stays balanced.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import case, select, update
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm.attributes import set_committed_value

from yun.control.db.models import NodeRow, VmRow
from yun.control.db.session import Database
from yun.proto.errors import InsufficientCapacity, NotFound


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


# Called in the placement's transaction for a candidate node; returns how to undo it, and
# raises InsufficientCapacity when the node cannot take the VM after all.
OnPlaced = Callable[[AsyncSession, VmRow, NodeRow],
                    Awaitable[Callable[[], Awaitable[None]] | None]]


class Placement:
    """Chooses nodes for VMs and holds their capacity.

    Requests arriving together are placed in one transaction: the worker drains the
    queue, reads the nodes once and writes every reservation with the VM's node in
    that same transaction (rule 5). One transaction per batch instead of per VM is what
    lets hundreds of concurrent creates through SQLite's single writer.
    """

    def __init__(self, db: Database, batch_size: int = 200,
                 on_placed: OnPlaced | None = None) -> None:
        self.db = db
        self.batch_size = batch_size
        # Work that must commit with the placement (the VM's address on that node).
        self.on_placed = on_placed
        self._queue: asyncio.Queue[tuple[str, Request, asyncio.Future[NodeRow]]] = (
            asyncio.Queue())
        self._worker: asyncio.Task[None] | None = None

    async def place(self, vm_uuid: str, req: Request) -> NodeRow:
        """Reserve ``req`` on the best node for ``vm_uuid`` and record the VM there.

        Raises :class:`InsufficientCapacity` when no node fits.
        """
        if self._worker is None or self._worker.done():
            self._worker = asyncio.create_task(self._run(), name="placement")
        future: asyncio.Future[NodeRow] = asyncio.get_running_loop().create_future()
        await self._queue.put((vm_uuid, req, future))
        return await future

    async def stop(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            await asyncio.gather(self._worker, return_exceptions=True)

    async def _run(self) -> None:
        while True:
            batch = [await self._queue.get()]
            while len(batch) < self.batch_size and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            try:
                async with self.db.session() as session:
                    results = await self._place_batch(session, batch)
            except Exception as exc:  # the transaction failed: nothing was reserved
                for _, _, future in batch:
                    if not future.done():
                        future.set_exception(exc)
                continue
            for (_, _, future), result in zip(batch, results, strict=True):
                if future.done():
                    continue
                if isinstance(result, Exception):
                    future.set_exception(result)
                else:
                    future.set_result(result)

    async def _place_batch(
        self, session: AsyncSession, batch: list[tuple[str, Request, asyncio.Future[NodeRow]]]
    ) -> list[NodeRow | Exception]:
        nodes = list((await session.scalars(
            select(NodeRow).where(NodeRow.status == "up"))).all())
        results: list[NodeRow | Exception] = []
        for vm_uuid, req, _ in batch:
            vm = await session.get(VmRow, vm_uuid)
            if vm is None:
                results.append(NotFound(f"VM {vm_uuid} no longer exists"))
                continue
            if vm.node_uuid:  # placed already (a retried step)
                node = next((n for n in nodes if n.uuid == vm.node_uuid), None)
                results.append(node or NotFound(f"node {vm.node_uuid} is gone"))
                continue
            try:
                results.append(await self._reserve(session, nodes, vm, req))
            except InsufficientCapacity as exc:
                results.append(exc)
        return results

    async def _reserve(self, session: AsyncSession, nodes: list[NodeRow], vm: VmRow,
                       req: Request) -> NodeRow:
        candidates = sorted((n for n in nodes if fits(n, req)),
                            key=lambda n: load_after(n, req))
        for node in candidates:
            undo = None
            if self.on_placed is not None:
                try:
                    undo = await self.on_placed(session, vm, node)
                except InsufficientCapacity:
                    continue  # e.g. the node's network has no free address
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
                # Keep the in-memory copy in step, so the next VM of the batch sees it, but
                # as the committed value: a dirty attribute would be flushed as an absolute
                # number computed from this batch's snapshot, undoing releases that other
                # transactions committed meanwhile (seen on PostgreSQL as leaked capacity).
                set_committed_value(node, "vcpus_reserved", node.vcpus_reserved + req.vcpus)
                set_committed_value(node, "memory_reserved_mb",
                                    node.memory_reserved_mb + req.memory_mb)
                set_committed_value(node, "disk_reserved_gb",
                                    node.disk_reserved_gb + req.disk_gb)
                vm.node_uuid = node.uuid
                return node
            if undo is not None:  # another control server filled the node meanwhile
                await undo()
        raise InsufficientCapacity(
            f"no node can host {req.vcpus} vCPU, {req.memory_mb} MiB memory, "
            f"{req.disk_gb} GiB disk ({len(nodes)} node(s) up)"
        )

    @staticmethod
    async def release(session: AsyncSession, node_uuid: str, req: Request) -> None:
        """Give back what :meth:`reserve` held (never below zero)."""
        # One UPDATE, computed by the database, so concurrent releases never lose one.
        await session.execute(
            update(NodeRow)
            .where(NodeRow.uuid == node_uuid)
            .values(
                vcpus_reserved=_minus(NodeRow.vcpus_reserved, req.vcpus),
                memory_reserved_mb=_minus(NodeRow.memory_reserved_mb, req.memory_mb),
                disk_reserved_gb=_minus(NodeRow.disk_reserved_gb, req.disk_gb),
            )
            .execution_options(synchronize_session=False)
        )


def _minus(column: Any, amount: int) -> Any:
    return case((column - amount < 0, 0), else_=column - amount)
