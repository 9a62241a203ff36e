"""Zones, compute pools and the nodes in them (F-POOL, F-1PN, F-PUB).

A pool is a set of nodes and the template of the VMs placed on them: network and storage
mode, thin provisioning, HA, linked address pool, default QoS level, overcommit ratios,
and the scheduler filters and weighers it uses. A node belongs to at most one pool (none:
unassigned); it is drained to stop getting new VMs while it keeps its own, and leaves its
pool only once empty.
"""

from __future__ import annotations

import logging
import uuid as uuidlib
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from yun.control.access.policy import Permission, Scope, require
from yun.control.context import ControlContext
from yun.control.db.models import NodeRow, PoolRow, VmRow, ZoneRow
from yun.control.db.tags import tags_of, update_tags
from yun.control.scheduler.base import filter_names, weigher_names
from yun.control.scheduler.hoststate import DEFAULT_FILTERS, DEFAULT_WEIGHTS
from yun.control.scheduler.inventory import DISK_GB, MEMORY_MB, RESOURCE_CLASSES, VCPU, inventories
from yun.control.services.addresses import (
    POOL_KIND_OF_MODE,
    address_pool_names,
    resolve_link,
)
from yun.control.services.common import find
from yun.control.services.nodes import node_models
from yun.proto.components import ComponentType
from yun.proto.errors import Conflict, Unprocessable, YunError
from yun.proto.messages import CpuQos, StorageServerInfo
from yun.proto.resources import (
    NetworkMode,
    Node,
    NodeAdminState,
    NodeLabelsUpdate,
    Pool,
    PoolCapacity,
    PoolCreate,
    PoolUpdate,
    ResourceClass,
    StorageMode,
    Zone,
    ZoneCreate,
    ZoneUpdate,
)

log = logging.getLogger("yun.control.pools")

DEFAULT_ZONE = "default"
DEFAULT_POOL = "default"


def check_scheduler(filters: list[str] | None, weights: dict[str, float] | None) -> None:
    """Refuse unknown filter or weigher names, naming them and the known ones."""
    known_filters, known_weighers = set(filter_names()), set(weigher_names())
    unknown = [f for f in filters or [] if f not in known_filters]
    if unknown:
        raise Unprocessable(f"unknown scheduler filter(s): {', '.join(unknown)}; known: "
                            f"{', '.join(sorted(known_filters))}")
    unknown = [w for w in weights or {} if w not in known_weighers]
    if unknown:
        raise Unprocessable(f"unknown scheduler weigher(s): {', '.join(unknown)}; known: "
                            f"{', '.join(sorted(known_weighers))}")
    if filters is not None and len(set(filters)) != len(filters):
        raise Unprocessable("a scheduler filter is named twice")


def check_storage(storage_mode: str, backing: bool) -> None:
    """Backing images need shared storage (F-BACKING): in local mode each node copies
    its image anyway, and a base on one node's disk cannot be shared (422)."""
    if backing and storage_mode != StorageMode.SHARED:
        raise Unprocessable(f"backing=true needs storage_mode shared: a {storage_mode} pool "
                            "keeps each VM's disk on its own node")


def pool_warnings(row: PoolRow) -> list[str]:
    """What an operator should know about a pool's template."""
    warnings = []
    if row.storage_mode == StorageMode.SHARED and row.backing:
        warnings.append("backing images: every VM is an overlay on one read-only base per "
                        "image, so all their reads of unchanged blocks hit that base (its "
                        "IOPS are shared by all of them), and a broken or lost base breaks "
                        "every VM built on it")
    if row.memory_ratio > 1.0:
        warnings.append(f"memory is overcommitted {row.memory_ratio:g}x: guests can be "
                        "killed by the host when they all use their memory")
    if row.ha and row.storage_mode != StorageMode.SHARED:
        warnings.append("HA restarts VMs elsewhere only with shared storage; on local "
                        "storage a failed node's VMs wait for it to return")
    return warnings


class PoolService:
    def __init__(self, ctx: ControlContext) -> None:
        self.ctx = ctx

    async def storage_server_modes(self) -> dict[str, str]:
        """The storage mode of every storage server in the domain (name -> mode); one
        that does not answer is left out."""
        modes: dict[str, str] = {}
        membership = self.ctx.membership
        for peer in membership.peers_of(ComponentType.STORAGE):
            try:
                info = StorageServerInfo.model_validate(await membership.client(peer).request(
                    "GET", "/internal/v1/info", timeout=10))
            except YunError as exc:
                log.warning("storage server did not tell its mode: %s", exc,
                            extra={"storage": peer.component_id})
                continue
            modes[peer.name] = info.mode
        return modes

    async def check_storage_server(self, pool_name: str, storage_mode: str) -> None:
        """A pool's storage mode must be the mode of a storage server of the domain
        (F-STO-MODEL): its VMs' images are kept where its nodes take them. 409 naming
        the storage servers and their modes otherwise; no storage server yet: nothing to
        match (the first one to join must match)."""
        modes = await self.storage_server_modes()
        if not modes or storage_mode in modes.values():
            return
        listed = ", ".join(f"{name} ({mode})" for name, mode in sorted(modes.items()))
        raise Conflict(
            f"pool {pool_name}: storage mode {storage_mode} needs a storage server in "
            f"{storage_mode} mode, and the domain has {listed}; set [storage] mode = "
            f"\"{storage_mode}\"" + (" and shared_storage to the pool's mount"
                                      if storage_mode == StorageMode.SHARED else "")
            + " on a storage server")

    # -- zones --------------------------------------------------------------------------

    async def create_zone(self, req: ZoneCreate, scope: Scope) -> Zone:
        require(scope.context, Permission.MANAGE_PLATFORM, "create zones")
        async with self.ctx.db.session() as session:
            await _unique(session, ZoneRow, req.name, "zone")
            row = ZoneRow(uuid=str(uuidlib.uuid4()), name=req.name,
                          description=req.description)
            session.add(row)
            tags = await update_tags(session, "zone", row.uuid, req.tags) if req.tags else {}
            await session.flush()
            log.info("zone created", extra={"zone": row.uuid, "zone_name": row.name})
            return _zone(row, 0, tags)

    async def update_zone(self, ref: str, req: ZoneUpdate, scope: Scope) -> Zone:
        require(scope.context, Permission.MANAGE_PLATFORM, "change zones")
        async with self.ctx.db.session() as session:
            row = await find(session, ZoneRow, ref, "zone", scope)
            if req.description is not None:
                row.description = req.description
            await session.flush()
            return (await zone_models(session, [row]))[0]

    async def get_zone(self, ref: str, scope: Scope) -> Zone:
        async with self.ctx.db.reading() as session:
            return (await zone_models(session, [await find(session, ZoneRow, ref, "zone",
                                                           scope)]))[0]

    async def delete_zone(self, ref: str, scope: Scope) -> str:
        require(scope.context, Permission.MANAGE_PLATFORM, "delete zones")
        async with self.ctx.db.session() as session:
            row = await find(session, ZoneRow, ref, "zone", scope)
            pools = (await session.scalars(select(PoolRow.name).where(
                PoolRow.zone_uuid == row.uuid).limit(5))).all()
            if pools:
                raise Conflict(f"zone {row.name} still has pools: {', '.join(pools)}")
            await session.delete(row)
            log.info("zone deleted", extra={"zone": row.uuid, "zone_name": row.name})
            return row.uuid

    # -- pools --------------------------------------------------------------------------

    async def create_pool(self, req: PoolCreate, scope: Scope) -> Pool:
        require(scope.context, Permission.MANAGE_PLATFORM, "create pools")
        check_scheduler(req.filters, req.weights)
        check_storage(req.storage_mode or StorageMode.LOCAL, bool(req.backing))
        if req.storage_mode is not None:
            await self.check_storage_server(req.name, req.storage_mode)
        async with self.ctx.db.session() as session:
            await _unique(session, PoolRow, req.name, "pool")
            zone = await find(session, ZoneRow, req.zone or DEFAULT_ZONE, "zone", scope)
            mode = req.network_mode or NetworkMode.SANDBOX_PRIVATE
            address_pool_uuid = await resolve_link(session, scope, mode, req.address_pool)
            row = PoolRow(
                uuid=str(uuidlib.uuid4()), name=req.name, description=req.description or "",
                zone_uuid=zone.uuid,
                network_mode=mode,
                storage_mode=req.storage_mode or StorageMode.LOCAL,
                thin=True if req.thin is None else req.thin, backing=bool(req.backing),
                ha=bool(req.ha), address_pool_uuid=address_pool_uuid,
                qos_level=req.qos_level or CpuQos.MEDIUM,
                cpu_ratio=req.cpu_ratio or 4.0, memory_ratio=req.memory_ratio or 1.0,
                disk_ratio=req.disk_ratio or 1.0,
                filters=list(req.filters) if req.filters is not None else list(DEFAULT_FILTERS),
                weights=dict(req.weights) if req.weights is not None else dict(
                    DEFAULT_WEIGHTS))
            session.add(row)
            if req.tags:
                await update_tags(session, "pool", row.uuid, req.tags)
            await session.flush()
            log.info("pool created", extra={"pool": row.uuid, "pool_name": row.name,
                                            "zone_name": zone.name, **_template(row)})
            return (await pool_models(session, [row]))[0]

    async def update_pool(self, ref: str, req: PoolUpdate, scope: Scope) -> Pool:
        """Change a pool's template; the storage mode, the network mode and the address
        pool only while it has no VM (its VMs were built and addressed by them)."""
        require(scope.context, Permission.MANAGE_PLATFORM, "change pools")
        check_scheduler(req.filters, req.weights)
        if req.storage_mode is not None:
            await self.check_storage_server(ref, req.storage_mode)
        async with self.ctx.db.session() as session:
            row = await find(session, PoolRow, ref, "pool", scope)
            await session.refresh(row, with_for_update=True)
            changes = req.model_dump(exclude_unset=True, exclude_none=True)
            check_storage(changes.get("storage_mode", row.storage_mode),
                          changes.get("backing", row.backing))
            storage = [k for k in ("storage_mode", "backing")
                       if k in changes and changes[k] != getattr(row, k)]
            if storage:
                vms = await _count(session, VmRow.pool_uuid == row.uuid)
                if vms:
                    named = " and ".join(k.replace("_", " ") for k in storage)
                    raise Conflict(f"pool {row.name} has {vms} VM(s): its {named} can change "
                                   "only while it has none (its VMs' disks were made "
                                   "with them, F-STO-MODEL)")
            if "network_mode" in changes or "address_pool" in changes:
                await self._relink(session, row, changes, scope)
            if "zone" in changes:
                row.zone_uuid = (await find(session, ZoneRow, changes.pop("zone"), "zone",
                                            scope)).uuid
            for key, value in changes.items():
                setattr(row, key, value)
            await session.flush()
            self.ctx.placement.invalidate(row.uuid)
            log.info("pool changed", extra={"pool": row.uuid, "pool_name": row.name,
                                            "changed": sorted(changes)})
            return (await pool_models(session, [row]))[0]

    async def _relink(self, session: AsyncSession, row: PoolRow, changes: dict[str, Any],
                      scope: Scope) -> None:
        """Apply a change of network mode or address pool (popped from ``changes``):
        refused while the pool has VMs, and the address pool must fit the mode (a mode
        that takes none drops the link)."""
        mode = changes.pop("network_mode", row.network_mode)
        ref = changes.pop("address_pool", None)
        if ref is None and mode == row.network_mode:
            return
        if ref is None and mode in POOL_KIND_OF_MODE and row.address_pool_uuid:
            ref = row.address_pool_uuid  # keep the link if it fits the new mode
        uuid = await resolve_link(session, scope, mode, ref)
        if mode == row.network_mode and uuid == row.address_pool_uuid:
            return
        vms = await _count(session, VmRow.pool_uuid == row.uuid)
        if vms:
            raise Conflict(f"pool {row.name} has {vms} VM(s): its network mode and address "
                           "pool change only while it has none")
        row.network_mode, row.address_pool_uuid = mode, uuid

    async def get_pool(self, ref: str, scope: Scope) -> Pool:
        async with self.ctx.db.reading() as session:
            return (await pool_models(session, [await find(session, PoolRow, ref, "pool",
                                                           scope)]))[0]

    async def delete_pool(self, ref: str, scope: Scope) -> str:
        require(scope.context, Permission.MANAGE_PLATFORM, "delete pools")
        async with self.ctx.db.session() as session:
            row = await find(session, PoolRow, ref, "pool", scope)
            await session.refresh(row, with_for_update=True)
            nodes = await _count(session, NodeRow.pool_uuid == row.uuid)
            vms = await _count(session, VmRow.pool_uuid == row.uuid)
            if nodes or vms:
                raise Conflict(f"pool {row.name} still has {nodes} node(s) and {vms} VM(s); "
                               "remove them first")
            await session.delete(row)
            try:
                await session.flush()
            except IntegrityError as exc:  # a VM or node joined meanwhile
                raise Conflict(f"pool {row.name} is in use") from exc
            log.info("pool deleted", extra={"pool": row.uuid, "pool_name": row.name})
        self.ctx.placement.invalidate(row.uuid)
        return row.uuid

    # -- nodes of a pool ----------------------------------------------------------------

    async def add_node(self, ref: str, node_ref: str, scope: Scope) -> Node:
        """Put an unassigned node into the pool: it gets VMs at once."""
        require(scope.context, Permission.MANAGE_PLATFORM, "add nodes to pools")
        async with self.ctx.db.session() as session:
            pool = await find(session, PoolRow, ref, "pool", scope)
            node = await find(session, NodeRow, node_ref, "node", scope)
            await session.refresh(node, with_for_update=True)
            if node.pool_uuid == pool.uuid:
                return (await node_models(session, [node], self.ctx.loads))[0]
            if node.pool_uuid is not None:
                current = await session.get(PoolRow, node.pool_uuid)
                raise Conflict(f"node {node.name} is in pool "
                               f"{current.name if current else node.pool_uuid}; a node "
                               "belongs to one pool: remove it from there first")
            node.pool_uuid, node.admin_state = pool.uuid, NodeAdminState.ACTIVE
            await session.flush()
            log.info("node added to pool", extra={"node": node.uuid, "node_name": node.name,
                                                  "pool": pool.uuid, "pool_name": pool.name})
            model = (await node_models(session, [node], self.ctx.loads))[0]
        self.ctx.placement.invalidate(pool.uuid)
        return model

    async def set_node_state(self, ref: str, node_ref: str, state: NodeAdminState,
                             scope: Scope) -> Node:
        """Drain a node (no new VM; it keeps its own) or make it active again."""
        require(scope.context, Permission.MANAGE_PLATFORM, f"{state} nodes")
        async with self.ctx.db.session() as session:
            pool, node = await self._member(session, ref, node_ref, scope)
            if node.admin_state != state:
                node.admin_state = state
                await session.flush()
                log.info("node drained" if state == NodeAdminState.DRAINED
                         else "node active again",
                         extra={"node": node.uuid, "node_name": node.name,
                                "pool_name": pool.name})
            model = (await node_models(session, [node], self.ctx.loads))[0]
        self.ctx.placement.invalidate(pool.uuid)
        return model

    async def remove_node(self, ref: str, node_ref: str, scope: Scope) -> Node:
        """Take an empty node out of its pool (unassigned)."""
        require(scope.context, Permission.MANAGE_PLATFORM, "remove nodes from pools")
        async with self.ctx.db.session() as session:
            pool, node = await self._member(session, ref, node_ref, scope)
            # The node row is locked (FOR UPDATE) and a placement locks it FOR SHARE
            # before claiming on it: a placement committed before this count is counted,
            # one after it finds the node out of the pool.
            vms = await _count(session, VmRow.node_uuid == node.uuid)
            if vms:
                raise Conflict(f"node {node.name} still hosts {vms} VM(s); drain it and "
                               "move or delete them before removing it from its pool")
            node.pool_uuid, node.admin_state = None, NodeAdminState.ACTIVE
            await session.flush()
            log.info("node removed from pool", extra={
                "node": node.uuid, "node_name": node.name, "pool_name": pool.name})
            model = (await node_models(session, [node], self.ctx.loads))[0]
        self.ctx.placement.invalidate(pool.uuid)
        return model

    async def set_labels(self, node_ref: str, req: NodeLabelsUpdate, scope: Scope) -> Node:
        require(scope.context, Permission.MANAGE_PLATFORM, "label nodes")
        async with self.ctx.db.session() as session:
            node = await find(session, NodeRow, node_ref, "node", scope)
            node.labels = dict(req.labels)
            await session.flush()
            log.info("node labels set", extra={"node": node.uuid, "node_name": node.name,
                                               "labels": node.labels})
            model = (await node_models(session, [node], self.ctx.loads))[0]
        self.ctx.placement.invalidate(node.pool_uuid)
        return model

    async def _member(self, session: AsyncSession, ref: str, node_ref: str,
                      scope: Scope) -> tuple[PoolRow, NodeRow]:
        pool = await find(session, PoolRow, ref, "pool", scope)
        node = await find(session, NodeRow, node_ref, "node", scope)
        await session.refresh(node, with_for_update=True)
        if node.pool_uuid != pool.uuid:
            raise Conflict(f"node {node.name} is not in pool {pool.name}")
        return pool, node


async def _unique(session: AsyncSession, model: Any, name: str, what: str) -> None:
    if (await session.scalars(select(model.uuid).where(model.name == name))).first():
        raise Conflict(f"a {what} named {name} already exists")


async def _count(session: AsyncSession, where: Any) -> int:
    table = where.left.table
    return int((await session.scalar(select(func.count()).select_from(table).where(where)))
               or 0)


def _template(row: PoolRow) -> dict[str, Any]:
    return {"network_mode": row.network_mode, "storage_mode": row.storage_mode,
            "backing": row.backing,
            "cpu_ratio": row.cpu_ratio, "memory_ratio": row.memory_ratio,
            "disk_ratio": row.disk_ratio}


def _zone(row: ZoneRow, pools: int, tags: dict[str, str]) -> Zone:
    return Zone(uuid=row.uuid, name=row.name, description=row.description, tags=tags,
                created_at=row.created_at, updated_at=row.updated_at, pool_count=pools)


async def zone_models(session: AsyncSession, rows: list[ZoneRow]) -> list[Zone]:
    uuids = [r.uuid for r in rows]
    counts = dict((await session.execute(
        select(PoolRow.zone_uuid, func.count()).where(PoolRow.zone_uuid.in_(uuids))
        .group_by(PoolRow.zone_uuid))).all()) if uuids else {}
    tags = await tags_of(session, uuids)
    return [_zone(r, counts.get(r.uuid, 0), tags.get(r.uuid, {})) for r in rows]


async def pool_models(session: AsyncSession, rows: list[PoolRow]) -> list[Pool]:
    """The API view of pools: template, zone, node and VM counts, capacity, warnings."""
    uuids = [r.uuid for r in rows]
    if not uuids:
        return []
    zones = dict((await session.execute(select(ZoneRow.uuid, ZoneRow.name).where(
        ZoneRow.uuid.in_({r.zone_uuid for r in rows})))).all())
    node_rows = (await session.execute(
        select(NodeRow.uuid, NodeRow.pool_uuid, NodeRow.status, NodeRow.admin_state)
        .where(NodeRow.pool_uuid.in_(uuids)))).all()
    vm_counts = dict((await session.execute(
        select(VmRow.pool_uuid, func.count()).where(VmRow.pool_uuid.in_(uuids))
        .group_by(VmRow.pool_uuid))).all())
    inv = await inventories(session, [n.uuid for n in node_rows])
    tags = await tags_of(session, uuids)
    address_pools = await address_pool_names(
        session, {r.address_pool_uuid for r in rows if r.address_pool_uuid})
    models = []
    for row in rows:
        ratio = {VCPU: row.cpu_ratio, MEMORY_MB: row.memory_ratio, DISK_GB: row.disk_ratio}
        members = [n for n in node_rows if n.pool_uuid == row.uuid]
        capacity = []
        for rc in RESOURCE_CLASSES:
            usable = used = 0
            for n in members:
                total, reserved, held = inv.get(n.uuid, {}).get(rc, (0, 0, 0))
                used += held
                if n.status == "up" and n.admin_state == NodeAdminState.ACTIVE:
                    usable += max(int((total - reserved) * ratio[rc]), 0)
            capacity.append(PoolCapacity(resource_class=ResourceClass(rc), usable=usable,
                                         used=used, free=max(usable - used, 0)))
        models.append(Pool(
            uuid=row.uuid, name=row.name, description=row.description,
            tags=tags.get(row.uuid, {}), created_at=row.created_at, updated_at=row.updated_at,
            zone_uuid=row.zone_uuid, zone_name=zones.get(row.zone_uuid),
            network_mode=NetworkMode(row.network_mode),
            storage_mode=StorageMode(row.storage_mode), thin=row.thin, backing=row.backing,
            ha=row.ha,
            address_pool=address_pools.get(row.address_pool_uuid or ""),
            qos_level=CpuQos(row.qos_level),
            cpu_ratio=row.cpu_ratio, memory_ratio=row.memory_ratio, disk_ratio=row.disk_ratio,
            filters=list(row.filters), weights=dict(row.weights), node_count=len(members),
            vm_count=vm_counts.get(row.uuid, 0), capacity=capacity,
            warnings=pool_warnings(row)))
    return models
