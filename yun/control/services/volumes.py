"""Volumes (C-STO, U-HOTPLUG for disks, F-THIN): data volumes created, attached to and
detached from VMs, resized, snapshotted and deleted.

The rule of where a data volume lives, the same in both storage modes: a new volume is
a record only (no node, no space taken) until it is first attached; it is then made on
the node of the VM it is attached to (local mode: in one of that node's storage
directories, and it stays on that node for good; shared mode: on the pool's shared
mount, so any node of the pool opens it later). So a volume larger than the node's free
space is refused at that first attach (or at create with ``vm``), naming the node.
A volume belongs to the pool of its storage: it is attached to VMs of that pool only
(until it is made, the pool of the VM it is first attached to).

Each change runs under the volume's queue and asks its node first, then records what
the node did; a VM is claimed by a conditional UPDATE so a volume is attached to one
VM at most even across control servers. Operations are quick on the node (no image is
fetched for a data volume), so they answer at once, as NIC hot-plug does.

Quotas: data volumes count in the project's ``disk_gb`` (the root volume is counted
with its VM).
"""

from __future__ import annotations

import contextlib
import logging
import uuid as uuidlib
from collections.abc import AsyncIterator
from typing import Any, Literal

from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from yun.control.access.policy import (
    Permission,
    Scope,
    require_in_project,
    require_project_write,
)
from yun.control.allocators import quotas
from yun.control.context import ControlContext
from yun.control.db.models import (
    FlowRow,
    NodeRow,
    PoolRow,
    VmRow,
    VolumeRow,
    VolumeSnapshotRow,
)
from yun.control.db.tags import tags_of, update_tags
from yun.control.flows.engine import UNFINISHED
from yun.control.flows.volumes import disk_spec
from yun.control.nodeclient import NodeClient, node_client
from yun.control.services.common import find
from yun.control.services.pools import DEFAULT_POOL
from yun.proto.context import RequestContext
from yun.proto.errors import (
    Conflict,
    InsufficientCapacity,
    NotFound,
    PeerError,
    Unprocessable,
    YunError,
)
from yun.proto.identity import QuotaResource
from yun.proto.messages import DiskAttach, VolumeEnsure
from yun.proto.resources import (
    StorageMode,
    VmState,
    Volume,
    VolumeAttach,
    VolumeCreate,
    VolumeKind,
    VolumeResize,
    VolumeSnapshot,
    VolumeSnapshotCreate,
    VolumeStatus,
)

log = logging.getLogger("yun.control.volumes")

#: how long a node may take for a volume operation (a thick volume is preallocated)
NODE_TIMEOUT = 300.0
# VMs whose disks may change: a running one (hot-plug) or a stopped one.
_CHANGEABLE = (VmState.RUNNING, VmState.STOPPED)
NO_SPACE = 507


def volume_model(row: VolumeRow, names: dict[str, str] | None = None,
                 tags: dict[str, str] | None = None, snapshots: int = 0) -> Volume:
    """The API view of a volume; ``names`` maps node, pool and VM uuids to names."""
    names = names or {}
    model = Volume.model_validate(row)
    model.tags = tags or {}
    model.pool_name = names.get(row.pool_uuid or "")
    model.node_name = names.get(row.node_uuid or "")
    model.vm_name = names.get(row.vm_uuid or "")
    model.snapshot_count = snapshots
    return model


async def volume_models(session: AsyncSession, rows: list[VolumeRow]) -> list[Volume]:
    """The API view of many volumes, with the names of their node, pool and VM."""
    names: dict[str, str] = {}
    for model, column in ((NodeRow, "node_uuid"), (PoolRow, "pool_uuid"),
                          (VmRow, "vm_uuid")):
        uuids = {getattr(r, column) for r in rows if getattr(r, column)}
        if uuids:
            names.update(dict((await session.execute(select(
                model.uuid, model.name).where(model.uuid.in_(uuids)))).all()))  # type: ignore[attr-defined]
    volume_uuids = [r.uuid for r in rows]
    counts: dict[str, int] = {}
    if volume_uuids:
        counts = dict((await session.execute(select(
            VolumeSnapshotRow.volume_uuid, func.count()).where(
            VolumeSnapshotRow.volume_uuid.in_(volume_uuids)).group_by(
            VolumeSnapshotRow.volume_uuid))).all())  # type: ignore[arg-type]
    tags = await tags_of(session, volume_uuids)
    return [volume_model(r, names, tags.get(r.uuid), counts.get(r.uuid, 0)) for r in rows]


def no_space(exc: YunError, node: NodeRow, volume: VolumeRow) -> YunError:
    """A node's 507 (no room for the volume) as a clear answer naming the node."""
    if isinstance(exc, PeerError) and exc.peer_status == NO_SPACE:
        return InsufficientCapacity(
            f"node {node.name} has not enough free storage for volume {volume.name} "
            f"({volume.size_gb} GiB{'' if volume.thin else ', thick'}): "
            f"{exc.detail}")
    return exc


class VolumeService:
    """Creates, attaches, detaches, resizes, snapshots and deletes volumes."""

    def __init__(self, ctx: ControlContext) -> None:
        self.ctx = ctx

    # -- reading --------------------------------------------------------------------------

    async def get(self, ref: str, scope: Scope) -> Volume:
        async with self.ctx.db.reading() as session:
            row = await find(session, VolumeRow, ref, "volume", scope)
            return (await volume_models(session, [row]))[0]

    async def snapshots(self, ref: str, scope: Scope) -> list[VolumeSnapshot]:
        async with self.ctx.db.reading() as session:
            row = await find(session, VolumeRow, ref, "volume", scope)
            rows = (await session.scalars(select(VolumeSnapshotRow).where(
                VolumeSnapshotRow.volume_uuid == row.uuid).order_by(
                VolumeSnapshotRow.created_at, VolumeSnapshotRow.name))).all()
            return [VolumeSnapshot.model_validate(r) for r in rows]

    # -- create and delete ----------------------------------------------------------------

    async def create(self, req: VolumeCreate, user: RequestContext, scope: Scope) -> Volume:
        """Record a data volume (counted in the project's ``disk_gb``); with ``vm``,
        attach it at once (and forget it again when that fails)."""
        require_project_write(user, "create volumes")
        async with self.ctx.db.session() as session:
            pool = await self._pool_for(session, req, scope)
            await quotas.claim(session, user.project_uuid or "",
                               {QuotaResource.DISK_GB: req.size_gb})
            row = VolumeRow(
                uuid=str(uuidlib.uuid4()), name=req.name, description=req.description,
                project_uuid=user.project_uuid, pool_uuid=pool.uuid, node_uuid=None,
                vm_uuid=None, disk_id=None, kind=VolumeKind.DATA, size_gb=req.size_gb,
                thin=pool.thin if req.thin is None else req.thin,
                storage_mode=pool.storage_mode, image_uuid=None,
                status=VolumeStatus.AVAILABLE, delete_with_vm=req.delete_with_vm)
            session.add(row)
            if req.tags:
                await update_tags(session, "volume", row.uuid, req.tags)
            await session.flush()
            uuid = row.uuid
        log.info("volume created", extra={"volume": uuid, "volume_name": req.name,
                                          "size_gb": req.size_gb, "thin": row.thin,
                                          "storage": row.storage_mode, "pool": pool.uuid})
        if req.vm is not None:
            try:
                return await self.attach(uuid, VolumeAttach(vm=req.vm), scope)
            except Exception:
                with contextlib.suppress(Exception):
                    await self._forget(uuid)
                raise
        return await self.get(uuid, scope)

    async def _pool_for(self, session: AsyncSession, req: VolumeCreate,
                        scope: Scope) -> PoolRow:
        """The pool whose storage the volume uses: the one named, else the pool of the VM
        it is attached to at once, else the default pool."""
        vm_pool = None
        if req.vm is not None:
            vm = await find(session, VmRow, req.vm, "VM", scope)
            vm_pool = vm.pool_uuid
        if req.pool is not None:
            pool = await find(session, PoolRow, req.pool, "pool", scope)
            if vm_pool is not None and pool.uuid != vm_pool:
                raise Unprocessable(f"pool {pool.name}: VM {req.vm} is in another pool, and a "
                                    "volume is attached to VMs of its own pool only")
            return pool
        if vm_pool is not None:
            found = await session.get(PoolRow, vm_pool)
            if found is not None:
                return found
        default = (await session.scalars(select(PoolRow).where(
            PoolRow.name == DEFAULT_POOL))).first()
        if default is None:
            raise Unprocessable(f"name a pool: there is no pool named {DEFAULT_POOL}")
        return default

    async def delete(self, ref: str, scope: Scope) -> str:
        """Delete a detached data volume (its file on its node first); 409 while it is
        attached. Returns its uuid."""
        async with self._held(ref, scope, "delete") as uuid:
            async with self.ctx.db.session() as session:
                row = await self._writable(session, uuid, scope, "delete")
                if row.kind == VolumeKind.ROOT:
                    raise Conflict(f"volume {row.name} is the root disk of VM "
                                   f"{await _vm_name(session, row.vm_uuid)}: it goes with "
                                   "its VM")
                if row.vm_uuid is not None:
                    raise Conflict(f"volume {row.name} is attached to VM "
                                   f"{await _vm_name(session, row.vm_uuid)}; detach it first")
                node = await session.get(NodeRow, row.node_uuid) if row.node_uuid else None
                client = node_client(self.ctx, node) if node is not None else None
            if client is not None:
                await client.delete_volume(uuid, request_id=f"volume:{uuid}:delete",
                                           timeout=NODE_TIMEOUT)
            await self._forget(uuid)
        log.info("volume deleted", extra={"volume": uuid})
        return uuid

    async def _forget(self, uuid: str) -> None:
        """Drop the volume's record, tags and quota."""
        from yun.control.db.tags import drop_tags
        async with self.ctx.db.session() as session:
            row = await session.get(VolumeRow, uuid)
            if row is None:
                return
            await quotas.release(session, row.project_uuid,
                                 {QuotaResource.DISK_GB: row.size_gb})
            await drop_tags(session, uuid)
            await session.delete(row)

    # -- attach and detach ----------------------------------------------------------------

    async def attach(self, ref: str, req: VolumeAttach, scope: Scope) -> Volume:
        """Attach a data volume to a running (hot-plug) or stopped VM, making it on the
        VM's node first if it was never made."""
        async with self._held(ref, scope, "attach") as uuid:
            async with self.ctx.db.session() as session:
                row = await self._writable(session, uuid, scope, "attach")
                vm, node = await self._changeable_vm(session, req.vm, scope, "attach volumes to")
                if row.vm_uuid == vm.uuid:
                    return (await volume_models(session, [row]))[0]  # already so
                if row.vm_uuid is not None:
                    raise Conflict(f"volume {row.name} is already attached to VM "
                                   f"{await _vm_name(session, row.vm_uuid)}; a volume is "
                                   "attached to one VM at most: detach it first")
                if vm.project_uuid != row.project_uuid:
                    raise Unprocessable(f"VM {vm.name} belongs to another project than "
                                        f"volume {row.name}")
                made = row.node_uuid is not None
                pool = await session.get(PoolRow, vm.pool_uuid) if vm.pool_uuid else None
                if pool is not None and row.pool_uuid != pool.uuid:
                    if made:
                        raise Unprocessable(
                            f"volume {row.name} is kept by the storage of pool "
                            f"{await _pool_name(session, row.pool_uuid)}; VM {vm.name} is in "
                            f"pool {pool.name}")
                    # Never made: it takes the storage of the VM's pool.
                    row.pool_uuid, row.storage_mode = pool.uuid, pool.storage_mode
                if made and row.storage_mode == StorageMode.LOCAL \
                        and row.node_uuid != node.uuid:
                    raise Conflict(f"volume {row.name} is on node "
                                   f"{await _node_name(session, row.node_uuid)} (local "
                                   f"storage); VM {vm.name} runs on node {node.name}")
                disk_id = f"vol-{row.uuid[:8]}"
                claimed = await session.execute(
                    update(VolumeRow).where(VolumeRow.uuid == row.uuid,
                                            VolumeRow.vm_uuid.is_(None))
                    .values(vm_uuid=vm.uuid, disk_id=disk_id, status=VolumeStatus.IN_USE,
                            pool_uuid=row.pool_uuid, storage_mode=row.storage_mode,
                            **({"delete_with_vm": req.delete_with_vm}
                               if req.delete_with_vm is not None else {}))
                    .execution_options(synchronize_session=False))
                if not claimed.rowcount:  # type: ignore[attr-defined]
                    raise Conflict(f"volume {row.name} was attached to another VM meanwhile")
                await session.refresh(row)
                spec = disk_spec(row)
                vm_uuid, client = vm.uuid, node_client(self.ctx, node)
            try:
                if not made:
                    await client.ensure_volume(
                        VolumeEnsure(disk=spec.model_copy(update={"create": True})),
                        request_id=f"volume:{uuid}:make", timeout=NODE_TIMEOUT)
                    await self._set(uuid, node_uuid=node.uuid)
                await client.attach_disk(vm_uuid, DiskAttach(disk=spec),
                                         request_id=f"volume:{uuid}:attach:{vm_uuid}",
                                         timeout=NODE_TIMEOUT)
            except YunError as exc:
                # The node may have plugged it after all (an answer lost to a timeout).
                with contextlib.suppress(Exception):
                    await client.detach_disk(vm_uuid, spec.disk_id,
                                             request_id=f"volume:{uuid}:undo:{vm_uuid}",
                                             timeout=NODE_TIMEOUT)
                await self._set(uuid, vm_uuid=None, disk_id=None,
                                status=VolumeStatus.AVAILABLE)
                log.warning("volume not attached: the node failed", extra={
                    "volume": uuid, "vm": vm_uuid, "node": node.uuid, "error": str(exc)})
                async with self.ctx.db.session() as session:
                    fresh = await session.get(VolumeRow, uuid)
                raise no_space(exc, node, fresh or row) from exc
        log.info("volume attached", extra={"volume": uuid, "vm": vm_uuid, "node": node.uuid,
                                           "disk": spec.disk_id, "made": not made})
        return await self.get(uuid, scope)

    async def detach(self, ref: str, scope: Scope) -> Volume:
        """Unplug a data volume from its VM (live when it runs); the volume is kept."""
        async with self._held(ref, scope, "detach") as uuid:
            async with self.ctx.db.session() as session:
                row = await self._writable(session, uuid, scope, "detach")
                if row.kind == VolumeKind.ROOT:
                    raise Conflict(f"volume {row.name} is the root disk of its VM: it cannot "
                                   "be detached")
                if row.vm_uuid is None:
                    return (await volume_models(session, [row]))[0]  # already so
                vm, node = await self._changeable_vm(session, row.vm_uuid, scope,
                                                     "detach volumes from")
                vm_uuid, disk_id = vm.uuid, row.disk_id or ""
                client = node_client(self.ctx, node)
            await client.detach_disk(vm_uuid, disk_id,
                                     request_id=f"volume:{uuid}:detach:{vm_uuid}",
                                     timeout=NODE_TIMEOUT)
            await self._set(uuid, vm_uuid=None, disk_id=None, status=VolumeStatus.AVAILABLE)
        log.info("volume detached", extra={"volume": uuid, "vm": vm_uuid})
        return await self.get(uuid, scope)

    # -- resize ---------------------------------------------------------------------------

    async def resize(self, ref: str, req: VolumeResize, scope: Scope) -> Volume:
        """Grow a data volume: online when its VM runs (the guest sees the new size)."""
        async with self._held(ref, scope, "resize") as uuid:
            async with self.ctx.db.session() as session:
                row = await self._writable(session, uuid, scope, "resize")
                if row.kind == VolumeKind.ROOT:
                    raise Conflict(f"volume {row.name} is a root disk: its size is the VM's "
                                   "disk_gb")
                check_grow(row.size_gb, req.size_gb, row.name)
                if row.vm_uuid is not None:
                    await self._changeable_vm(session, row.vm_uuid, scope, "resize volumes of")
                await quotas.claim(session, row.project_uuid,
                                   {QuotaResource.DISK_GB: req.size_gb - row.size_gb})
                node = await self._node_of(session, row)
                client = node_client(self.ctx, node) if node is not None else None
                if client is not None:
                    try:
                        await client.resize_volume(
                            uuid, req.size_gb, request_id=f"volume:{uuid}:size:{req.size_gb}",
                            timeout=NODE_TIMEOUT)
                    except YunError as exc:
                        assert node is not None
                        raise no_space(exc, node, row) from exc  # the claim rolls back
                row.size_gb = req.size_gb
        log.info("volume resized", extra={"volume": uuid, "size_gb": req.size_gb})
        return await self.get(uuid, scope)

    # -- snapshots ------------------------------------------------------------------------

    async def snapshot(self, ref: str, req: VolumeSnapshotCreate, scope: Scope
                       ) -> VolumeSnapshot:
        """Take a snapshot of a closed volume (detached, or its VM stopped)."""
        async with self._held(ref, scope, "snapshot") as uuid:
            async with self.ctx.db.session() as session:
                row = await self._writable(session, uuid, scope, "snapshot")
                taken = (await session.scalars(select(VolumeSnapshotRow.uuid).where(
                    VolumeSnapshotRow.volume_uuid == uuid,
                    VolumeSnapshotRow.name == req.name))).first()
                if taken is not None:
                    raise Conflict(f"volume {row.name} already has a snapshot {req.name}")
                client = await self._closed(session, row, "take a snapshot of")
                size = row.size_gb
            await self._on_node(client, uuid, req.name, "create")
            try:
                async with self.ctx.db.session() as session:
                    snap = VolumeSnapshotRow(uuid=str(uuidlib.uuid4()), volume_uuid=uuid,
                                             name=req.name, size_gb=size)
                    session.add(snap)
                    await session.flush()
                    model = VolumeSnapshot.model_validate(snap)
            except IntegrityError as exc:
                raise Conflict(f"volume {uuid} already has a snapshot {req.name}") from exc
        log.info("volume snapshot taken", extra={"volume": uuid, "snapshot": req.name})
        return model

    async def revert(self, ref: str, name: str, scope: Scope) -> Volume:
        """Bring a closed volume back to its snapshot ``name``."""
        await self._snapshot_op(ref, name, scope, "revert")
        return await self.get(ref, scope)

    async def delete_snapshot(self, ref: str, name: str, scope: Scope) -> str:
        """Delete the snapshot ``name`` of a closed volume; returns the volume's uuid."""
        return await self._snapshot_op(ref, name, scope, "delete")

    async def _snapshot_op(self, ref: str, name: str, scope: Scope,
                           action: Literal["revert", "delete"]) -> str:
        async with self._held(ref, scope, f"{action} snapshots of") as uuid:
            async with self.ctx.db.session() as session:
                row = await self._writable(session, uuid, scope, f"{action} snapshots of")
                snap = (await session.scalars(select(VolumeSnapshotRow).where(
                    VolumeSnapshotRow.volume_uuid == uuid,
                    VolumeSnapshotRow.name == name))).first()
                if snap is None:
                    raise NotFound(f"volume {row.name} has no snapshot {name!r}")
                client = await self._closed(
                    session, row, "revert" if action == "revert" else "delete a snapshot of")
                if action == "revert" and snap.size_gb != row.size_gb:
                    # qemu-img keeps the current virtual size on revert: say so.
                    log.info("reverting a volume grown since its snapshot; it keeps its "
                             "size", extra={"volume": uuid, "snapshot": name})
            await self._on_node(client, uuid, name, action)
            if action == "delete":
                async with self.ctx.db.session() as session:
                    found = await session.get(VolumeSnapshotRow, snap.uuid)
                    if found is not None:
                        await session.delete(found)
        log.info(f"volume snapshot {'reverted to' if action == 'revert' else 'deleted'}",
                 extra={"volume": uuid, "snapshot": name})
        return uuid

    async def _on_node(self, client: NodeClient, uuid: str, name: str,
                       action: Literal["create", "revert", "delete"]) -> None:
        await client.snapshot_volume(uuid, name, action,
                                     request_id=f"volume:{uuid}:snapshot:{name}:{action}",
                                     timeout=NODE_TIMEOUT)

    async def _closed(self, session: AsyncSession, row: VolumeRow, what: str) -> NodeClient:
        """The client of the node holding a volume no running guest has open: detached,
        or its VM stopped (409 naming the VM otherwise)."""
        if row.vm_uuid is not None:
            vm = await session.get(VmRow, row.vm_uuid)
            if vm is not None and vm.state != VmState.STOPPED:
                raise Conflict(f"cannot {what} volume {row.name} while VM {vm.name} is "
                               f"{vm.state}: stop the VM or detach the volume first")
            await self._not_busy(session, row.vm_uuid)
        node = await self._node_of(session, row)
        if node is None:
            raise Conflict(f"volume {row.name} was never attached, so it holds no data yet: "
                           "attach it to a VM first")
        return node_client(self.ctx, node)

    # -- helpers --------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _held(self, ref: str, scope: Scope, action: str) -> AsyncIterator[str]:
        """The uuid of volume ``ref``, which the caller may ``action``, while this control
        server holds the volume's queue (one change of a volume at a time)."""
        async with self.ctx.db.session() as session:
            uuid = (await self._writable(session, ref, scope, action)).uuid
        async with self.ctx.queues.hold(f"volume:{uuid}"):
            yield uuid

    async def _writable(self, session: AsyncSession, ref: str, scope: Scope,
                        what: str) -> VolumeRow:
        row = await find(session, VolumeRow, ref, "volume", scope)
        require_in_project(scope.context, Permission.WRITE, row.project_uuid,
                           what=f"{what} volume {row.name}")
        return row

    async def _changeable_vm(self, session: AsyncSession, ref: str, scope: Scope,
                             what: str) -> tuple[VmRow, NodeRow]:
        """The VM and its node, when its disks may change now (running or stopped, no task
        under way, placed on a node that is up)."""
        vm = await find(session, VmRow, ref, "VM", scope)
        require_in_project(scope.context, Permission.WRITE, vm.project_uuid,
                           what=f"{what} VM {vm.name}")
        await self._not_busy(session, vm.uuid)
        if vm.state not in _CHANGEABLE:
            raise Conflict(f"VM {vm.name} is {vm.state}: volumes change on running or "
                           "stopped VMs only")
        node = await session.get(NodeRow, vm.node_uuid) if vm.node_uuid else None
        if node is None:
            raise Conflict(f"VM {vm.name} is not placed on a node")
        return vm, node

    @staticmethod
    async def _not_busy(session: AsyncSession, vm_uuid: str) -> None:
        busy = (await session.execute(select(FlowRow.kind, VmRow.name).join(
            VmRow, VmRow.uuid == FlowRow.resource_uuid).where(
            FlowRow.resource_uuid == vm_uuid, FlowRow.state.in_(UNFINISHED)))).first()
        if busy is not None:
            raise Conflict(f"VM {busy[1]} is busy ({busy[0]}); try again when it is done")

    @staticmethod
    async def _node_of(session: AsyncSession, row: VolumeRow) -> NodeRow | None:
        """The node to ask about a volume: its VM's when attached, else the one holding it
        (local) or that last used it (shared); None when it was never made."""
        if row.node_uuid is None:
            return None
        if row.vm_uuid is not None:
            vm = await session.get(VmRow, row.vm_uuid)
            if vm is not None and vm.node_uuid:
                return await session.get(NodeRow, vm.node_uuid)
        return await session.get(NodeRow, row.node_uuid)

    async def _set(self, uuid: str, **values: Any) -> None:
        async with self.ctx.db.session() as session:
            await session.execute(update(VolumeRow).where(VolumeRow.uuid == uuid)
                                  .values(**values)
                                  .execution_options(synchronize_session=False))


def check_grow(current: int, wanted: int, name: str) -> None:
    """Volumes only grow (a file system does not survive its disk shrinking)."""
    if wanted <= current:
        raise Unprocessable(f"size_gb={wanted}: volume {name} is {current} GiB and volumes "
                            "only grow; give a larger size")


async def keep_data_volumes(ctx: ControlContext, ref: str, scope: Scope) -> list[str]:
    """Before a VM's delete with ``keep_volumes``: none of its data volumes goes with it
    (they are detached and kept, Z-CASCADE). Returns their uuids."""
    async with ctx.db.session() as session:
        vm = await find(session, VmRow, ref, "VM", scope)
        require_in_project(scope.context, Permission.WRITE, vm.project_uuid,
                           what=f"delete VM {vm.name}")
        rows = (await session.scalars(select(VolumeRow).where(
            VolumeRow.vm_uuid == vm.uuid, VolumeRow.kind == VolumeKind.DATA))).all()
        for row in rows:
            row.delete_with_vm = False
        return [r.uuid for r in rows]


async def _vm_name(session: AsyncSession, vm_uuid: str | None) -> str:
    vm = await session.get(VmRow, vm_uuid) if vm_uuid else None
    return vm.name if vm is not None else str(vm_uuid)


async def _node_name(session: AsyncSession, node_uuid: str | None) -> str:
    node = await session.get(NodeRow, node_uuid) if node_uuid else None
    return node.name if node is not None else str(node_uuid)


async def _pool_name(session: AsyncSession, pool_uuid: str | None) -> str:
    pool = await session.get(PoolRow, pool_uuid) if pool_uuid else None
    return pool.name if pool is not None else str(pool_uuid)
