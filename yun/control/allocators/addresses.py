"""IP addresses of VM NICs in a node's sandbox subnet (the node-scoped part of F-ADDR),
used by the sandbox network modes (:mod:`yun.control.network.modes.sandbox`)."""

from __future__ import annotations

import ipaddress
import uuid as uuidlib

from sqlalchemy import delete, select
from sqlalchemy.ext.asyncio import AsyncSession

from yun.control.db.models import AddressRow
from yun.proto.errors import InsufficientCapacity

# Addresses below this offset are left to the node (gateway) and to operators.
FIRST_HOST_OFFSET = 10


def node_scope(node_uuid: str) -> str:
    return f"node:{node_uuid}"


def mac_for(vm_uuid: str) -> str:
    """A stable, locally administered MAC (QEMU's 52:54:00 prefix) derived from the VM."""
    digest = uuidlib.uuid5(uuidlib.NAMESPACE_OID, vm_uuid).bytes
    return "52:54:00:" + ":".join(f"{b:02x}" for b in digest[:3])


class AddressAllocator:
    """Hands out node-scoped addresses (the placement worker's hook, hot-plugged IPs)."""

    async def allocate(self, session: AsyncSession, scope: str, subnet: str, vm_uuid: str,
                       *, another: bool = False) -> str:
        """Hold the lowest free address of ``subnet`` in ``scope`` for ``vm_uuid`` (the one
        it already holds there, unless ``another``: an extra address of the VM).

        The unique (scope, ip) constraint is what guarantees no address is given twice,
        even by two control servers; the lock only avoids needless conflicts here.
        """
        network = ipaddress.ip_network(subnet, strict=False)
        # One query for the scope's addresses (the autoflush sends this batch's earlier
        # ones first); the new row is flushed with the next query or the commit.
        held = (await session.execute(
            select(AddressRow.ip, AddressRow.vm_uuid).where(AddressRow.scope == scope))).all()
        used = set()
        for ip, holder in held:
            if holder == vm_uuid and not another:
                return str(ip)
            used.add(ip)
        for offset, host in enumerate(network.hosts(), start=1):
            if offset < FIRST_HOST_OFFSET:
                continue
            ip = str(host)
            if ip not in used:
                session.add(AddressRow(scope=scope, ip=ip, vm_uuid=vm_uuid))
                return ip
        raise InsufficientCapacity(f"no free address left in {subnet} ({scope})")

    @staticmethod
    async def release(session: AsyncSession, vm_uuid: str) -> None:
        await session.execute(delete(AddressRow).where(AddressRow.vm_uuid == vm_uuid))
