"""Node inventories and allocations: what each node has, and what each VM holds of it.

Capacity is kept per resource class, as Nova's placement service keeps it: a node has an
inventory row per class (``total`` the host has, ``reserved`` for the host itself,
``used`` by VMs), and a consumer (a VM) has an allocation row per class. VMs may use
``(total - reserved) * ratio`` of a class, the ratio being the overcommit ratio of the
node's pool.

A claim is a conditional ``UPDATE … SET used = used + n WHERE used + n <= usable`` per
class: the database re-checks each row at write time, so two control servers placing
at once never overbook a node (rule 5). It is the one final claim; the scheduler's
in-memory view only chooses where to try.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from sqlalchemy import Integer, case, cast, delete, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from yun.control.db.models import AllocationRow, InventoryRow
from yun.proto.messages import HostInfo

VCPU, MEMORY_MB, DISK_GB = "vcpu", "memory_mb", "disk_gb"
RESOURCE_CLASSES = (VCPU, MEMORY_MB, DISK_GB)


def vm_amounts(vcpus: int, memory_mb: int, disk_gb: int) -> dict[str, int]:
    """What a VM of this size holds on its node, per resource class."""
    return {VCPU: vcpus, MEMORY_MB: memory_mb, DISK_GB: disk_gb}


def reported_inventory(host: HostInfo) -> dict[str, tuple[int, int]]:
    """(total, reserved) per resource class, as a node reports them."""
    return {VCPU: (host.vcpus, host.vcpus_reserved),
            MEMORY_MB: (host.memory_mb, host.memory_reserved_mb),
            DISK_GB: (host.disk_gb, host.disk_reserved_gb)}


async def sync_inventory(session: AsyncSession, node_uuid: str,
                         reported: Mapping[str, tuple[int, int]],
                         known: Mapping[str, InventoryRow] | None = None) -> bool:
    """Make the node's inventory say what it reported; ``used`` is never touched here.

    Returns whether anything changed (nothing is written when nothing did)."""
    if known is None:
        known = {r.resource_class: r for r in (await session.scalars(
            select(InventoryRow).where(InventoryRow.node_uuid == node_uuid))).all()}
    changed = False
    for rc, (total, reserved) in reported.items():
        row = known.get(rc)
        if row is None:
            session.add(InventoryRow(node_uuid=node_uuid, resource_class=rc, total=total,
                                     reserved=reserved, used=0))
            changed = True
        elif row.total != total or row.reserved != reserved:
            row.total, row.reserved = total, reserved
            changed = True
    return changed


async def claim(session: AsyncSession, node_uuid: str, amounts: Mapping[str, int],
                ratios: Mapping[str, float]) -> bool:
    """Hold ``amounts`` on the node if it still has room for all of them; else nothing.

    One UPDATE for every class: each row is re-checked by the database as it is written,
    and the classes it did hold are returned, so when one class lacks room the others
    are given back at once."""
    wanted = {rc: amount for rc, amount in amounts.items() if amount > 0}
    if not wanted:
        return True
    await lock_rows(session, node_uuid)
    amount = case(wanted, value=InventoryRow.resource_class, else_=0)
    ratio = case({rc: ratios.get(rc, 1.0) for rc in wanted},
                 value=InventoryRow.resource_class, else_=1.0)
    usable = cast((InventoryRow.total - InventoryRow.reserved) * ratio, Integer)
    held = (await session.execute(
        update(InventoryRow)
        .where(InventoryRow.node_uuid == node_uuid,
               InventoryRow.resource_class.in_(list(wanted)))
        .where(InventoryRow.used + amount <= usable)
        .values(used=InventoryRow.used + amount)
        .returning(InventoryRow.resource_class)
        .execution_options(synchronize_session=False))).scalars().all()
    if len(held) == len(wanted):
        return True
    if held:  # give back the classes that had room
        await _give_back_all(session, node_uuid, {rc: wanted[rc] for rc in held})
    return False


async def allocate(session: AsyncSession, consumer_uuid: str, node_uuid: str,
                   amounts: Mapping[str, int]) -> None:
    """Record what ``consumer_uuid`` holds (after a successful :func:`claim`)."""
    session.add_all(AllocationRow(consumer_uuid=consumer_uuid, resource_class=rc,
                                  node_uuid=node_uuid, amount=amount)
                    for rc, amount in amounts.items() if amount > 0)


async def release(session: AsyncSession, consumer_uuid: str) -> dict[str, int]:
    """Give back everything ``consumer_uuid`` holds; return what was given back.

    The allocation rows are deleted first and only what this call deleted is given back,
    so two concurrent releases of one consumer never give it back twice."""
    await session.flush()  # allocations added in this session must be seen by the DELETE
    rows = (await session.execute(
        delete(AllocationRow).where(AllocationRow.consumer_uuid == consumer_uuid)
        .returning(AllocationRow.resource_class, AllocationRow.node_uuid,
                   AllocationRow.amount)
        .execution_options(synchronize_session=False))).all()
    by_node: dict[str, dict[str, int]] = {}
    for rc, node_uuid, amount in rows:
        by_node.setdefault(node_uuid, {})[rc] = amount
    for node_uuid in sorted(by_node):
        await lock_rows(session, node_uuid)
        await _give_back_all(session, node_uuid, by_node[node_uuid])
    return {rc: amount for rc, _, amount in rows}


async def lock_rows(session: AsyncSession, node_uuid: str) -> None:
    """Lock the node's inventory rows in one order (PostgreSQL; SQLite has one writer).

    Claims and releases each touch every class of a node; taking the rows in the same
    order every time is what keeps hundreds of concurrent deletes and a placement batch
    from deadlocking on them."""
    if session.get_bind().dialect.name == "sqlite":
        return
    await session.execute(
        select(InventoryRow.resource_class).where(InventoryRow.node_uuid == node_uuid)
        .order_by(InventoryRow.resource_class).with_for_update())


async def _give_back_all(session: AsyncSession, node_uuid: str,
                         amounts: Mapping[str, int]) -> None:
    """Give back ``amounts`` on the node in one statement, never below zero."""
    amount = case(dict(amounts), value=InventoryRow.resource_class, else_=0)
    await session.execute(
        update(InventoryRow)
        .where(InventoryRow.node_uuid == node_uuid,
               InventoryRow.resource_class.in_(list(amounts)))
        .values(used=case((InventoryRow.used - amount < 0, 0),
                          else_=InventoryRow.used - amount))
        .execution_options(synchronize_session=False))


async def inventories(session: AsyncSession, node_uuids: Iterable[str] | None = None
                      ) -> dict[str, dict[str, tuple[int, int, int]]]:
    """(total, reserved, used) per resource class per node (all nodes when None)."""
    query = select(InventoryRow.node_uuid, InventoryRow.resource_class, InventoryRow.total,
                   InventoryRow.reserved, InventoryRow.used)
    found: dict[str, dict[str, tuple[int, int, int]]] = {}
    if node_uuids is None:
        chunks: list[list[str] | None] = [None]
    else:
        items = list(node_uuids)
        chunks = [items[i:i + 500] for i in range(0, len(items), 500)]
    for chunk in chunks:
        q = query if chunk is None else query.where(InventoryRow.node_uuid.in_(chunk))
        for node_uuid, rc, total, reserved, used in (await session.execute(q)).all():
            found.setdefault(node_uuid, {})[rc] = (total, reserved, used)
    return found
