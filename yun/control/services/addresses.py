"""Address pools and elastic IPs (F-ADDR).

An address pool is a set of non-overlapping ranges of public addresses inside one
network: an exclusive pool hands out whole addresses (to mono VMs and elastic IPs), a
shared one ports of its addresses (to share VMs). Pools are platform resources (every
user sees them, to name one; only platform administrators change them); elastic IPs
belong to a project, like VMs.

The allocation itself is :mod:`yun.control.network.public_ips` (the one allocator); this
module checks the input, keeps the ranges consistent with what is handed out, and links
compute pools to address pools.

Concurrency: range changes are serialised platform-wide (a PostgreSQL advisory lock;
SQLite has one writer anyway) so two overlapping ranges can never both be accepted, and
they lock the pool row FOR UPDATE, while an allocation holds it FOR SHARE
(:func:`lock_for_allocation`): a range is never removed under an address being taken
from it.
"""

from __future__ import annotations

import ipaddress
import logging
import uuid as uuidlib
from typing import Any

from sqlalchemy import and_, func, or_, select, text
from sqlalchemy.ext.asyncio import AsyncSession

from yun.control.access.policy import (
    Permission,
    Scope,
    require,
    require_in_project,
    require_project_write,
)
from yun.control.access.visibility import visible
from yun.control.context import ControlContext
from yun.control.db.models import (
    AddressPoolRow,
    AddressRangeRow,
    PoolRow,
    ProjectRow,
    PublicIpRow,
    VmRow,
)
from yun.control.db.tags import drop_tags, tags_of, update_tags
from yun.control.network import public_ips
from yun.control.network.changes import note_change
from yun.control.services.common import find
from yun.proto.errors import BadRequest, Conflict, NotFound
from yun.proto.resources import (
    AddressPool,
    AddressPoolCreate,
    AddressPoolKind,
    AddressPoolUpdate,
    AddressRange,
    AddressRangeCreate,
    ElasticIp,
    ElasticIpAllocate,
    NetworkMode,
    VmState,
)

log = logging.getLogger("yun.control.addresses")

# Any constant: the key of the advisory lock serialising range changes on PostgreSQL.
_RANGES_LOCK = 0x59554E41  # "YUNA"
# Which kind of address pool each network mode takes (the others take none).
POOL_KIND_OF_MODE = {NetworkMode.SANDBOX_MONO: AddressPoolKind.EXCLUSIVE,
                     NetworkMode.SANDBOX_SHARE: AddressPoolKind.SHARED}
_HOLDERS_SHOWN = 5


# -- checking input -------------------------------------------------------------------


def _ip(text_: str, what: str) -> ipaddress.IPv4Address:
    try:
        return ipaddress.IPv4Address(text_.strip())
    except ValueError:
        raise BadRequest(f"{what} '{text_}' is not an IPv4 address") from None


def _network(text_: str) -> ipaddress.IPv4Network:
    try:
        return ipaddress.IPv4Network(text_.strip())
    except ValueError as exc:
        raise BadRequest(f"network '{text_}' is not an IPv4 network in CIDR form "
                         f"(e.g. 203.0.113.0/24): {exc}") from None


def smallest_network(first: ipaddress.IPv4Address,
                     last: ipaddress.IPv4Address) -> ipaddress.IPv4Network:
    """The smallest network holding both addresses."""
    prefix = 32
    while True:
        net = ipaddress.IPv4Network((int(first), prefix), strict=False)
        if last in net:
            return net
        prefix -= 1


def range_text(first_ip: str, last_ip: str) -> str:
    return f"{first_ip}-{last_ip}"


class _Range:
    """A checked range: integers, for comparisons."""

    def __init__(self, first: ipaddress.IPv4Address, last: ipaddress.IPv4Address,
                 first_port: int | None, last_port: int | None) -> None:
        self.first, self.last = first, last
        self.first_port, self.last_port = first_port, last_port

    @property
    def label(self) -> str:
        return range_text(str(self.first), str(self.last))

    def overlaps(self, first: int, last: int) -> bool:
        return int(self.first) <= last and first <= int(self.last)


def check_range(req: AddressRangeCreate, kind: AddressPoolKind,
                network: ipaddress.IPv4Network | None) -> _Range:
    """The range after every check a range alone allows (400 naming what is wrong)."""
    first, last = _ip(req.first_ip, "first address"), _ip(req.last_ip, "last address")
    label = range_text(str(first), str(last))
    if int(first) > int(last):
        raise BadRequest(f"range {label}: the first address is after the last")
    ports = (req.first_port, req.last_port)
    if kind == AddressPoolKind.EXCLUSIVE:
        if ports != (None, None):
            raise BadRequest(f"range {label}: ports are given only in a shared pool; an "
                             "exclusive pool hands out whole addresses")
    else:
        if req.first_port is None or req.last_port is None:
            raise BadRequest(f"range {label}: a shared pool needs its port range "
                             "(--ports P-Q, e.g. 10000-19999)")
        for port in ports:
            if not 1 <= int(port or 0) <= 65535:
                raise BadRequest(f"range {label}: port {port} is outside 1..65535")
        if req.first_port > req.last_port:
            raise BadRequest(f"range {label}: the first port {req.first_port} is after "
                             f"the last {req.last_port}")
    if network is not None:
        for address in (first, last):
            if address not in network:
                raise BadRequest(f"range {label}: address {address} is outside the pool's "
                                 f"network {network}")
        # /31 and /32 have no network or broadcast address (RFC 3021).
        if network.prefixlen < 31:
            for special, name in ((network.network_address, "network"),
                                  (network.broadcast_address, "broadcast")):
                if int(first) <= int(special) <= int(last):
                    raise BadRequest(f"range {label} holds {special}, the {name} address "
                                     f"of {network}")
    return _Range(first, last, req.first_port, req.last_port)


def _size(r: AddressRangeRow | _Range) -> int:
    first = int(ipaddress.IPv4Address(str(r.first_ip if isinstance(r, AddressRangeRow)
                                          else r.first)))
    last = int(ipaddress.IPv4Address(str(r.last_ip if isinstance(r, AddressRangeRow)
                                         else r.last)))
    ports = 1 if r.first_port is None or r.last_port is None else (
        r.last_port - r.first_port + 1)
    return (last - first + 1) * ports


async def _serialise_ranges(session: AsyncSession) -> None:
    """Hold the platform-wide lock of range changes until the transaction ends."""
    if session.get_bind().dialect.name == "postgresql":
        await session.execute(text("SELECT pg_advisory_xact_lock(:key)"),
                              {"key": _RANGES_LOCK})


async def _check_no_overlap(session: AsyncSession, ranges: list[_Range]) -> None:
    """Refuse (409) ranges overlapping each other or any range of any address pool."""
    for i, r in enumerate(ranges):
        for other in ranges[i + 1:]:
            if r.overlaps(int(other.first), int(other.last)):
                raise Conflict(f"ranges {r.label} and {other.label} overlap")
    existing = (await session.execute(
        select(AddressRangeRow.first_ip, AddressRangeRow.last_ip, AddressPoolRow.name)
        .join(AddressPoolRow, AddressPoolRow.uuid == AddressRangeRow.address_pool_uuid)
    )).all()
    for first_ip, last_ip, pool_name in existing:
        first, last = int(ipaddress.IPv4Address(first_ip)), int(ipaddress.IPv4Address(last_ip))
        for r in ranges:
            if r.overlaps(first, last):
                raise Conflict(f"range {r.label} overlaps range "
                               f"{range_text(first_ip, last_ip)} of address pool {pool_name}")


def _range_row(pool: AddressPoolRow, r: _Range) -> AddressRangeRow:
    return AddressRangeRow(uuid=str(uuidlib.uuid4()), address_pool_uuid=pool.uuid,
                           first_ip=str(r.first), last_ip=str(r.last),
                           first_port=r.first_port, last_port=r.last_port)


def _held_in(rows: list[tuple[str, int]], r: AddressRangeRow) -> list[tuple[str, int]]:
    first = int(ipaddress.IPv4Address(r.first_ip))
    last = int(ipaddress.IPv4Address(r.last_ip))
    return [(ip, port) for ip, port in rows
            if first <= int(ipaddress.IPv4Address(ip)) <= last]


# -- the API views --------------------------------------------------------------------


async def address_pool_models(session: AsyncSession,
                              rows: list[AddressPoolRow]) -> list[AddressPool]:
    """Address pools with their ranges, usage and linked compute pools."""
    uuids = [r.uuid for r in rows]
    if not uuids:
        return []
    ranges: dict[str, list[AddressRangeRow]] = {}
    for rr in (await session.scalars(select(AddressRangeRow).where(
            AddressRangeRow.address_pool_uuid.in_(uuids)))).all():
        ranges.setdefault(rr.address_pool_uuid, []).append(rr)
    held: dict[str, set[tuple[str, int]]] = {}
    for pool_uuid, ip, port in (await session.execute(
            select(PublicIpRow.address_pool_uuid, PublicIpRow.ip, PublicIpRow.port)
            .where(PublicIpRow.address_pool_uuid.in_(uuids)))).all():
        # A port taken for tcp and udp is one pair of the pool.
        held.setdefault(pool_uuid, set()).add((ip, port))
    linked: dict[str, list[str]] = {}
    for linked_uuid, name in (await session.execute(
            select(PoolRow.address_pool_uuid, PoolRow.name)
            .where(PoolRow.address_pool_uuid.in_(uuids)).order_by(PoolRow.name))).all():
        linked.setdefault(str(linked_uuid), []).append(name)
    tags = await tags_of(session, uuids)
    models = []
    for row in rows:
        pool_held = sorted(held.get(row.uuid, set()))
        parts = []
        for rr in sorted(ranges.get(row.uuid, []),
                         key=lambda r: int(ipaddress.IPv4Address(r.first_ip))):
            parts.append(AddressRange(uuid=rr.uuid, first_ip=rr.first_ip, last_ip=rr.last_ip,
                                      first_port=rr.first_port, last_port=rr.last_port,
                                      total=_size(rr), used=len(_held_in(pool_held, rr))))
        total = sum(p.total for p in parts)
        used = len(pool_held)
        models.append(AddressPool(
            uuid=row.uuid, name=row.name, description=row.description,
            tags=tags.get(row.uuid, {}), created_at=row.created_at,
            updated_at=row.updated_at, kind=AddressPoolKind(row.kind), network=row.network,
            ranges=parts, total=total, used=used, free=max(total - used, 0),
            compute_pools=linked.get(row.uuid, [])))
    return models


async def eip_models(session: AsyncSession, rows: list[PublicIpRow]) -> list[ElasticIp]:
    """Elastic IPs with the names of their address pool and VM."""
    if not rows:
        return []
    pools = dict((await session.execute(select(AddressPoolRow.uuid, AddressPoolRow.name).where(
        AddressPoolRow.uuid.in_({r.address_pool_uuid for r in rows})))).all())
    vm_uuids = {r.vm_uuid for r in rows if r.vm_uuid}
    vms = dict((await session.execute(select(VmRow.uuid, VmRow.name).where(
        VmRow.uuid.in_(vm_uuids)))).all()) if vm_uuids else {}
    tags = await tags_of(session, [r.uuid for r in rows])
    return [ElasticIp(uuid=r.uuid, name=r.name, description=r.description,
                      project_uuid=r.project_uuid, tags=tags.get(r.uuid, {}),
                      created_at=r.created_at, updated_at=r.updated_at, ip=r.ip,
                      address_pool_uuid=r.address_pool_uuid,
                      address_pool_name=pools.get(r.address_pool_uuid), vm_uuid=r.vm_uuid,
                      vm_name=vms.get(r.vm_uuid) if r.vm_uuid else None)
            for r in rows]


def eip_clause() -> Any:
    """What makes a public-address row an elastic IP (the VMs' own are not listed)."""
    return PublicIpRow.kind == public_ips.KIND_EIP


# -- linking compute pools -------------------------------------------------------------


async def resolve_link(session: AsyncSession, scope: Scope, mode: str,
                       ref: str | None) -> str | None:
    """The uuid of the address pool a compute pool of network ``mode`` links to (``ref``:
    its name or uuid), after checking the mode takes one of that kind (400 otherwise)."""
    wanted = POOL_KIND_OF_MODE.get(NetworkMode(mode))
    if ref is None:
        if wanted is not None:
            raise BadRequest(f"network mode {mode} needs an {wanted} address pool "
                             f"(address_pool, e.g. --address-pool NAME)")
        return None
    pool = await find(session, AddressPoolRow, ref, "address pool", scope)
    if wanted is None:
        raise BadRequest(f"network mode {mode} takes no address pool; address pool "
                         f"{pool.name} is used only by sandbox-mono (exclusive) and "
                         "sandbox-share (shared) pools")
    if pool.kind != wanted:
        raise BadRequest(f"address pool {pool.name} is {pool.kind}; network mode {mode} "
                         f"needs an {wanted} one")
    return pool.uuid


async def address_pool_names(session: AsyncSession, uuids: set[str]) -> dict[str, str]:
    """The names of these address pools, by uuid."""
    if not uuids:
        return {}
    return dict((await session.execute(select(AddressPoolRow.uuid, AddressPoolRow.name).where(
        AddressPoolRow.uuid.in_(uuids)))).all())


# -- the service ----------------------------------------------------------------------


class AddressService:
    """Address pools (platform administrators) and elastic IPs (projects)."""

    def __init__(self, ctx: ControlContext) -> None:
        self.ctx = ctx

    # -- address pools ------------------------------------------------------------------

    async def create_pool(self, req: AddressPoolCreate, scope: Scope) -> AddressPool:
        require(scope.context, Permission.MANAGE_PLATFORM, "create address pools")
        kind = AddressPoolKind(req.kind)
        network = _network(req.network) if req.network else None
        ranges = [check_range(r, kind, network) for r in req.ranges]
        if network is None:
            network = smallest_network(ranges[0].first, ranges[0].last)
            # The derived network must still hold every other range.
            ranges = [check_range(r, kind, network) for r in req.ranges]
        async with self.ctx.db.session() as session:
            await _serialise_ranges(session)
            if (await session.scalars(select(AddressPoolRow.uuid).where(
                    AddressPoolRow.name == req.name))).first():
                raise Conflict(f"an address pool named {req.name} already exists")
            await _check_no_overlap(session, ranges)
            row = AddressPoolRow(uuid=str(uuidlib.uuid4()), name=req.name,
                                 description=req.description, kind=kind.value,
                                 network=str(network))
            session.add(row)
            await session.flush()  # the ranges refer to it
            for r in ranges:
                session.add(_range_row(row, r))
            if req.tags:
                await update_tags(session, "address_pool", row.uuid, req.tags)
            await session.flush()
            log.info("address pool created", extra={
                "address_pool": row.uuid, "address_pool_name": row.name, "kind": row.kind,
                "network": row.network, "ranges": [r.label for r in ranges]})
            return (await address_pool_models(session, [row]))[0]

    async def update_pool(self, ref: str, req: AddressPoolUpdate,
                          scope: Scope) -> AddressPool:
        require(scope.context, Permission.MANAGE_PLATFORM, "change address pools")
        async with self.ctx.db.session() as session:
            row = await find(session, AddressPoolRow, ref, "address pool", scope)
            if req.description is not None:
                row.description = req.description
            await session.flush()
            return (await address_pool_models(session, [row]))[0]

    async def get_pool(self, ref: str, scope: Scope) -> AddressPool:
        async with self.ctx.db.reading() as session:
            row = await find(session, AddressPoolRow, ref, "address pool", scope)
            return (await address_pool_models(session, [row]))[0]

    async def add_range(self, ref: str, req: AddressRangeCreate,
                        scope: Scope) -> AddressPool:
        """Grow a pool online: the new addresses are handed out at once."""
        require(scope.context, Permission.MANAGE_PLATFORM, "change address pools")
        async with self.ctx.db.session() as session:
            await _serialise_ranges(session)
            row = await find(session, AddressPoolRow, ref, "address pool", scope)
            await session.refresh(row, with_for_update=True)
            r = check_range(req, AddressPoolKind(row.kind), _network(row.network))
            await _check_no_overlap(session, [r])
            session.add(_range_row(row, r))
            await session.flush()
            log.info("address range added", extra={
                "address_pool": row.uuid, "address_pool_name": row.name, "range": r.label})
            return (await address_pool_models(session, [row]))[0]

    async def remove_range(self, ref: str, range_ref: str, scope: Scope) -> AddressPool:
        """Take a range out of a pool; refused (409, naming the holders) while any of its
        addresses or ports is handed out."""
        require(scope.context, Permission.MANAGE_PLATFORM, "change address pools")
        async with self.ctx.db.session() as session:
            await _serialise_ranges(session)
            row = await find(session, AddressPoolRow, ref, "address pool", scope)
            await session.refresh(row, with_for_update=True)
            ranges = (await session.scalars(select(AddressRangeRow).where(
                AddressRangeRow.address_pool_uuid == row.uuid))).all()
            wanted = range_ref.strip()
            target = next((r for r in ranges if r.uuid == wanted
                           or range_text(r.first_ip, r.last_ip) == wanted), None)
            if target is None:
                known = ", ".join(range_text(r.first_ip, r.last_ip) for r in ranges)
                raise NotFound(f"address pool {row.name} has no range '{range_ref}'; its "
                               f"ranges: {known or 'none'}")
            holders = await _holders(session, row, target)
            if holders:
                raise Conflict(f"range {range_text(target.first_ip, target.last_ip)} of "
                               f"address pool {row.name} is in use by {holders}; release "
                               "them first")
            await session.delete(target)
            await session.flush()
            log.info("address range removed", extra={
                "address_pool": row.uuid, "address_pool_name": row.name,
                "range": range_text(target.first_ip, target.last_ip)})
            return (await address_pool_models(session, [row]))[0]

    async def delete_pool(self, ref: str, scope: Scope) -> str:
        """Delete an address pool; refused while a compute pool links to it or any of its
        addresses is handed out."""
        require(scope.context, Permission.MANAGE_PLATFORM, "delete address pools")
        async with self.ctx.db.session() as session:
            row = await find(session, AddressPoolRow, ref, "address pool", scope)
            await session.refresh(row, with_for_update=True)
            linked = (await session.scalars(select(PoolRow.name).where(
                PoolRow.address_pool_uuid == row.uuid).limit(_HOLDERS_SHOWN))).all()
            if linked:
                raise Conflict(f"address pool {row.name} is linked to compute pool(s) "
                               f"{', '.join(linked)}; link them elsewhere first")
            held = int(await session.scalar(select(func.count()).select_from(PublicIpRow)
                                            .where(PublicIpRow.address_pool_uuid == row.uuid))
                       or 0)
            if held:
                raise Conflict(f"address pool {row.name} still hands out {held} address(es) "
                               "or port(s); release them first")
            await drop_tags(session, row.uuid)
            await session.delete(row)
            await session.flush()
            log.info("address pool deleted", extra={"address_pool": row.uuid,
                                                    "address_pool_name": row.name})
            return row.uuid

    # -- elastic IPs ----------------------------------------------------------------------

    async def allocate_eip(self, req: ElasticIpAllocate, scope: Scope) -> ElasticIp:
        """A whole address of an exclusive pool for the token's project (its quota)."""
        user = scope.context
        project_uuid = require_project_write(user, "allocate elastic IPs")
        async with self.ctx.db.session() as session:
            pool = await find(session, AddressPoolRow, req.address_pool, "address pool",
                              scope)
            if pool.kind != AddressPoolKind.EXCLUSIVE:
                raise BadRequest(f"address pool {pool.name} is shared: elastic IPs are "
                                 "whole addresses, taken from an exclusive pool")
            if req.name is not None and (await session.scalars(select(PublicIpRow.uuid).where(
                    PublicIpRow.project_uuid == project_uuid, eip_clause(),
                    PublicIpRow.name == req.name))).first():
                raise Conflict(f"project {user.project_name} already has an elastic IP "
                               f"named {req.name}")
            row = await public_ips.allocate_address(
                session, pool, project_uuid, kind=public_ips.KIND_EIP,
                name=req.name or "eip", description=req.description)
            if req.name is None:
                row.name = f"eip-{row.ip}"
            if req.tags:
                await update_tags(session, "eip", row.uuid, req.tags)
            await session.flush()
            log.info("elastic IP allocated", extra={
                "eip": row.uuid, "eip_name": row.name, "ip": row.ip,
                "address_pool_name": pool.name, "project": row.project_uuid})
            return (await eip_models(session, [row]))[0]

    async def get_eip(self, ref: str, scope: Scope) -> ElasticIp:
        async with self.ctx.db.reading() as session:
            return (await eip_models(session, [await _find_eip(session, ref, scope)]))[0]

    async def bind_eip(self, ref: str, vm_ref: str, scope: Scope) -> ElasticIp:
        """Bind the EIP to a VM of a sandbox-mono pool of its project, moving it from
        the VM it was bound to, if any."""
        async with self.ctx.db.session() as session:
            row = await _find_eip(session, ref, scope)
            require_in_project(scope.context, Permission.WRITE, row.project_uuid,
                               what=f"bind elastic IP {row.name}")
            await session.refresh(row, with_for_update=True)
            vm = await find(session, VmRow, vm_ref, "VM", scope)
            if vm.project_uuid != row.project_uuid:
                # Another project's VM is answered like a missing one.
                raise NotFound(f"no VM '{vm_ref}'")
            if vm.state in (VmState.DELETING, VmState.ERROR):
                raise Conflict(f"VM {vm.name} is {vm.state}: an elastic IP is bound to a "
                               "working VM only")
            pool = await session.get(PoolRow, vm.pool_uuid) if vm.pool_uuid else None
            if pool is None or pool.network_mode != NetworkMode.SANDBOX_MONO:
                mode = pool.network_mode if pool else "no"
                raise Conflict(f"VM {vm.name} is in a {mode} pool: elastic IPs are bound "
                               "only to VMs of sandbox-mono pools")
            previous = row.vm_uuid
            if previous == vm.uuid:
                return (await eip_models(session, [row]))[0]
            if previous:
                note_change(session, previous)
            row.vm_uuid = vm.uuid
            note_change(session, vm.uuid)
            await session.flush()
            log.info("elastic IP bound", extra={
                "eip": row.uuid, "ip": row.ip, "vm": vm.uuid, "vm_name": vm.name,
                "moved_from": previous})
            return (await eip_models(session, [row]))[0]

    async def unbind_eip(self, ref: str, scope: Scope) -> ElasticIp:
        async with self.ctx.db.session() as session:
            row = await _find_eip(session, ref, scope)
            require_in_project(scope.context, Permission.WRITE, row.project_uuid,
                               what=f"unbind elastic IP {row.name}")
            await session.refresh(row, with_for_update=True)
            if row.vm_uuid is None:
                raise Conflict(f"elastic IP {row.name} ({row.ip}) is not bound to a VM")
            previous, row.vm_uuid = row.vm_uuid, None
            note_change(session, previous)
            await session.flush()
            log.info("elastic IP unbound", extra={"eip": row.uuid, "ip": row.ip,
                                                  "vm": previous})
            return (await eip_models(session, [row]))[0]

    async def release_eip(self, ref: str, scope: Scope) -> ElasticIp:
        """Give the address back to its pool (and the project's quota); a bound EIP is
        unbound first. Returns the EIP as it was (``vm_uuid``: what it was bound to)."""
        async with self.ctx.db.session() as session:
            row = await _find_eip(session, ref, scope)
            require_in_project(scope.context, Permission.WRITE, row.project_uuid,
                               what=f"release elastic IP {row.name}")
            await session.refresh(row, with_for_update=True)
            model = (await eip_models(session, [row]))[0]
            await drop_tags(session, row.uuid)
            await public_ips.release(session, row)  # records the change if it was bound
            log.info("elastic IP released", extra={"eip": row.uuid, "ip": row.ip,
                                                   "unbound_from": row.vm_uuid})
            return model


async def _find_eip(session: AsyncSession, ref: str, scope: Scope) -> PublicIpRow:
    """The elastic IP (by uuid, name or address) that ``scope`` sees; 404 otherwise."""
    where = and_(visible(PublicIpRow, scope), eip_clause())
    rows = (await session.scalars(select(PublicIpRow).where(
        where, or_(PublicIpRow.uuid == ref, PublicIpRow.name == ref, PublicIpRow.ip == ref))
        .limit(2))).all()
    if not rows:
        raise NotFound(f"no elastic IP '{ref}'")
    if len(rows) > 1:
        raise Conflict(f"more than one elastic IP is named '{ref}'; use its uuid")
    return rows[0]


async def _holders(session: AsyncSession, pool: AddressPoolRow,
                   target: AddressRangeRow) -> str:
    """Who holds addresses of the range, for the error (empty: nobody)."""
    rows = (await session.execute(
        select(PublicIpRow.ip, PublicIpRow.port, PublicIpRow.kind, PublicIpRow.name,
               VmRow.name, ProjectRow.name)
        .outerjoin(VmRow, VmRow.uuid == PublicIpRow.vm_uuid)
        .outerjoin(ProjectRow, ProjectRow.uuid == PublicIpRow.project_uuid)
        .where(PublicIpRow.address_pool_uuid == pool.uuid))).all()
    first = int(ipaddress.IPv4Address(target.first_ip))
    last = int(ipaddress.IPv4Address(target.last_ip))
    inside = [r for r in rows if first <= int(ipaddress.IPv4Address(r[0])) <= last]
    described = []
    for ip, port, kind, name, vm_name, project_name in inside[:_HOLDERS_SHOWN]:
        where = f"{ip}:{port}" if port else ip
        who = (f"elastic IP {name}" if kind == public_ips.KIND_EIP
               else f"VM {vm_name or '?'}")
        described.append(f"{where} ({who}, project {project_name})")
    more = len(inside) - len(described)
    return ", ".join(described) + (f" and {more} more" if more > 0 else "")
