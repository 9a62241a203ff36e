"""Public addresses and ports taken from address pools (F-ADDR).

One place hands them out and takes them back, for the create and delete flows (a mono
VM's address, a share VM's ports) and for elastic IPs alike:

- the lowest free address (exclusive pool) or the lowest free port of the lowest
  address (shared pool) of the pool's ranges;
- the unique (ip, port, protocol) of ``public_ips`` is what guarantees nothing is given
  twice, even by two control servers at once: a lost race is retried on the next free
  one, inside a savepoint so the caller's transaction goes on;
- whole addresses count against the project's ``public_ips`` quota (ports of a shared
  pool do not: they take no address of their own);
- every change of what the routers forward records a network change.
"""

from __future__ import annotations

import ipaddress
import logging
import uuid as uuidlib
from collections.abc import Iterator

from sqlalchemy import delete, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from yun.control.allocators import quotas
from yun.control.db.models import AddressPoolRow, AddressRangeRow, PublicIpRow
from yun.control.network.changes import note_change
from yun.proto.errors import Conflict, InsufficientCapacity, NotFound
from yun.proto.identity import QuotaResource

log = logging.getLogger("yun.control.network.public_ips")

EXCLUSIVE = "exclusive"
SHARED = "shared"
KIND_VM = "vm"
KIND_EIP = "eip"
# A lost race (another transaction took the same address) is retried this many times.
_ATTEMPTS = 8


def _addresses(ranges: list[AddressRangeRow]) -> Iterator[str]:
    for r in sorted(ranges, key=lambda r: int(ipaddress.IPv4Address(r.first_ip))):
        first, last = int(ipaddress.IPv4Address(r.first_ip)), int(
            ipaddress.IPv4Address(r.last_ip))
        for value in range(first, last + 1):
            yield str(ipaddress.IPv4Address(value))


def _ports(ranges: list[AddressRangeRow]) -> Iterator[tuple[str, int]]:
    for r in sorted(ranges, key=lambda r: int(ipaddress.IPv4Address(r.first_ip))):
        if r.first_port is None or r.last_port is None:
            continue
        first, last = int(ipaddress.IPv4Address(r.first_ip)), int(
            ipaddress.IPv4Address(r.last_ip))
        for value in range(first, last + 1):
            ip = str(ipaddress.IPv4Address(value))
            for port in range(r.first_port, r.last_port + 1):
                yield ip, port


async def _ranges(session: AsyncSession, pool: AddressPoolRow) -> list[AddressRangeRow]:
    return list((await session.scalars(select(AddressRangeRow).where(
        AddressRangeRow.address_pool_uuid == pool.uuid))).all())


async def lock_pool(session: AsyncSession, uuid: str) -> AddressPoolRow:
    """The address pool, held FOR SHARE until the transaction ends: none of its ranges is
    removed while an address is being taken from it (range changes lock it FOR UPDATE)."""
    row = (await session.scalars(select(AddressPoolRow).where(
        AddressPoolRow.uuid == uuid).with_for_update(read=True))).first()
    if row is None:
        raise NotFound(f"no address pool '{uuid}'")
    return row


async def _insert(session: AsyncSession, row: PublicIpRow) -> bool:
    """Insert ``row`` in a savepoint; False when another transaction holds the same
    (ip, port, protocol)."""
    await session.flush()  # the caller's pending changes stay out of the savepoint
    try:
        async with session.begin_nested():
            session.add(row)
            await session.flush()
    except IntegrityError:
        return False
    return True


async def allocate_address(session: AsyncSession, pool: AddressPoolRow, project_uuid: str,
                           *, kind: str, name: str, vm_uuid: str | None = None,
                           description: str = "") -> PublicIpRow:
    """A whole public address of the exclusive ``pool`` for the project (counted in its
    quota), bound to ``vm_uuid`` if given."""
    if pool.kind != EXCLUSIVE:
        raise Conflict(f"address pool {pool.name} is {pool.kind}: it hands out ports, not "
                       f"whole addresses")
    await lock_pool(session, pool.uuid)
    await quotas.claim(session, project_uuid, {QuotaResource.PUBLIC_IPS: 1})
    ranges = await _ranges(session, pool)
    for _ in range(_ATTEMPTS):
        held = set((await session.scalars(select(PublicIpRow.ip).where(
            PublicIpRow.address_pool_uuid == pool.uuid))).all())
        ip = next((a for a in _addresses(ranges) if a not in held), None)
        if ip is None:
            raise InsufficientCapacity(f"address pool {pool.name} has no free address left")
        row = PublicIpRow(uuid=str(uuidlib.uuid4()), name=name, description=description,
                          address_pool_uuid=pool.uuid, project_uuid=project_uuid, kind=kind,
                          ip=ip, port=0, protocol="", vm_uuid=vm_uuid, vm_port=None)
        if await _insert(session, row):
            if vm_uuid:
                note_change(session, vm_uuid)
            log.info("public address allocated", extra={
                "address_pool": pool.name, "ip": ip, "kind": kind, "vm": vm_uuid,
                "project": project_uuid})
            return row
    raise Conflict(f"address pool {pool.name}: every free address was taken by concurrent "
                   f"requests; try again")


async def allocate_port(session: AsyncSession, pool: AddressPoolRow, project_uuid: str, *,
                        vm_uuid: str, vm_port: int, protocol: str = "tcp",
                        name: str) -> PublicIpRow:
    """A public ``ip:port`` of the shared ``pool`` mapped to ``vm_port`` of the VM."""
    if pool.kind != SHARED:
        raise Conflict(f"address pool {pool.name} is {pool.kind}: it hands out whole "
                       f"addresses, not ports")
    await lock_pool(session, pool.uuid)
    ranges = await _ranges(session, pool)
    for _ in range(_ATTEMPTS):
        held = {(ip, port) for ip, port in (await session.execute(
            select(PublicIpRow.ip, PublicIpRow.port).where(
                PublicIpRow.address_pool_uuid == pool.uuid,
                PublicIpRow.protocol == protocol))).all()}
        free = next((p for p in _ports(ranges) if p not in held), None)
        if free is None:
            raise InsufficientCapacity(
                f"address pool {pool.name} has no free {protocol} port left")
        row = PublicIpRow(uuid=str(uuidlib.uuid4()), name=name, description="",
                          address_pool_uuid=pool.uuid, project_uuid=project_uuid,
                          kind=KIND_VM, ip=free[0], port=free[1], protocol=protocol,
                          vm_uuid=vm_uuid, vm_port=vm_port)
        if await _insert(session, row):
            note_change(session, vm_uuid)
            log.info("public port allocated", extra={
                "address_pool": pool.name, "ip": free[0], "port": free[1],
                "protocol": protocol, "vm": vm_uuid, "vm_port": vm_port})
            return row
    raise Conflict(f"address pool {pool.name}: every free port was taken by concurrent "
                   f"requests; try again")


async def release(session: AsyncSession, row: PublicIpRow) -> None:
    """Give one address or port back to its pool (and a whole address to the quota)."""
    if row.port == 0:
        await quotas.release(session, row.project_uuid, {QuotaResource.PUBLIC_IPS: 1})
    if row.vm_uuid:
        note_change(session, row.vm_uuid)
    await session.execute(delete(PublicIpRow).where(PublicIpRow.uuid == row.uuid))
    log.info("public address released", extra={
        "ip": row.ip, "port": row.port, "protocol": row.protocol, "vm": row.vm_uuid,
        "kind": row.kind})


async def release_vm(session: AsyncSession, vm_uuid: str) -> list[str]:
    """Everything the VM holds: its own addresses and ports go back to their pools, its
    elastic IPs are unbound (the project keeps them). Returns what was released."""
    rows = (await session.scalars(select(PublicIpRow).where(
        PublicIpRow.vm_uuid == vm_uuid))).all()
    done = []
    for row in rows:
        if row.kind == KIND_EIP:
            row.vm_uuid = None
            note_change(session, vm_uuid)
            done.append(f"{row.ip} (elastic, unbound)")
        else:
            await release(session, row)
            done.append(f"{row.ip}:{row.port}" if row.port else row.ip)
    return done
