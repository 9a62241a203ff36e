"""Virtual machines: the requests the API makes of the control server (F-VM, F-LIFE)."""

from __future__ import annotations

import hashlib
import logging
import uuid as uuidlib
from types import MappingProxyType
from typing import Any

from sqlalchemy import bindparam, select
from sqlalchemy.ext.asyncio import AsyncSession

from yun.control.access.policy import (
    Permission,
    Scope,
    require_in_project,
    require_project_write,
)
from yun.control.allocators import quotas
from yun.control.context import ControlContext
from yun.control.db.idempotency import current_key
from yun.control.db.models import (
    FlowRow,
    ImageRow,
    NodeRow,
    PoolRow,
    ProjectRow,
    VmGroupRow,
    VmRow,
    ZoneRow,
)
from yun.control.db.prepared import column_rows
from yun.control.db.tags import tags_of, update_tags
from yun.control.flows.engine import UNFINISHED
from yun.control.flows.vm import (
    CDROM_IMAGE,
    POOLS,
    effective_qos,
    network_needs,
    qos_needs,
)
from yun.control.flows.volumes import root_volume
from yun.control.network.modes import mode_for
from yun.control.network.modes.base import address_pool_of
from yun.control.nodeclient import node_client
from yun.control.scheduler.placement import Request
from yun.control.services.common import find
from yun.control.services.pools import DEFAULT_POOL
from yun.control.services.port_forwards import (
    PortForwardService,
    addressing_of,
)
from yun.control.services.ssh_keys import resolve_keys
from yun.control.services.tasks import task_model
from yun.control.services.vm_addresses import VmAddressService
from yun.control.services.vm_nics import VmNicService
from yun.control.services.volumes import keep_data_volumes
from yun.proto.context import RequestContext
from yun.proto.errors import Conflict, Unprocessable
from yun.proto.messages import QosSpec, StopRequest
from yun.proto.resources import (
    Accepted,
    CdromInsert,
    Console,
    ImageStatus,
    PortForward,
    Vm,
    VmCreate,
    VmQosUpdate,
    VmState,
    VmStop,
)
from yun.proto.ssh_keys import SshKeyError, parse_public_key

log = logging.getLogger("yun.control.vms")

ACTIONS_ALLOWED: dict[str, set[VmState]] = {
    "start": {VmState.STOPPED, VmState.RUNNING, VmState.ERROR, VmState.UNKNOWN},
    "stop": {VmState.RUNNING, VmState.STOPPED, VmState.ERROR, VmState.UNKNOWN},
    "reboot": {VmState.RUNNING},
}
TRANSIENT = {"start": VmState.STARTING, "stop": VmState.STOPPING, "reboot": VmState.REBOOTING}
# A power action asked of a VM already in its target state: nothing to do (U-IDEMP).
ALREADY = {"start": VmState.RUNNING, "stop": VmState.STOPPED}
# QoS is changed on a VM whose domain exists (live when it runs, in its definition when not).
QOS_ALLOWED = {VmState.RUNNING, VmState.STOPPED}
# The CD drive is changed on a VM whose domain exists (live when it runs).
CDROM_ALLOWED = {VmState.RUNNING, VmState.STOPPED}


def vm_model(row: VmRow, node_name: str | None = None,
             tags: dict[str, str] | None = None, pool: tuple[str, str, str] | None = None,
             public_ip: str | None = None, forwards: list[PortForward] | None = None) -> Vm:
    """The API view of a VM; ``pool`` is its pool's (name, QoS level, network mode)."""
    # One validation of everything: a page of 50 VMs spent a third of its CPU validating
    # each row, then each computed field and the QoS again by assignment.
    fields: dict[str, Any] = {name: getattr(row, name) for name in _ROW_FIELDS}
    if row.user_data is not None:
        data = row.user_data.encode()
        fields["user_data_size"] = len(data)
        fields["user_data_sha256"] = hashlib.sha256(data).hexdigest()
    fields.update(
        ssh_key_fingerprints=_fingerprints(row.ssh_keys or []), node_name=node_name,
        tags=tags or {}, pool_name=pool[0] if pool else None,
        qos=effective_qos(row, pool[1] if pool else None),
        network_mode=pool[2] if pool else None, public_ip=public_ip,
        port_forwards=forwards or [])
    return Vm.model_validate(fields)


# The view's fields a VM's row has as they are (the others are computed by vm_model).
_ROW_FIELDS = tuple(sorted(
    set(Vm.model_fields) & set(VmRow.__mapper__.column_attrs.keys())
    - {"qos", "tags", "node_name", "pool_name", "network_mode", "public_ip",
       "port_forwards", "ssh_key_fingerprints", "user_data_size", "user_data_sha256"}))


def _fingerprints(lines: list[str]) -> list[str]:
    """The SHA256 fingerprints of the public key lines a VM was given."""
    out = []
    for line in lines:
        try:
            out.append(parse_public_key(line).fingerprint)
        except SshKeyError:  # stored checked; never expected, but a view must not fail
            out.append("unparsable")
    return out


# A VM's node name and its pool's name, QoS level and network mode, for vm_models.
_PLACEMENT_NAMES = (
    select(VmRow.uuid, NodeRow.name, PoolRow.name, PoolRow.qos_level, PoolRow.network_mode)
    .outerjoin(NodeRow, NodeRow.uuid == VmRow.node_uuid)
    .outerjoin(PoolRow, PoolRow.uuid == VmRow.pool_uuid)
    .where(VmRow.uuid.in_(bindparam("uuids", expanding=True))))


async def vm_models(session: AsyncSession, rows: list[VmRow]) -> list[Vm]:
    """The API view of many VMs, with their node and pool names and tags (four statements:
    node and pool names, tags, forwards, public addresses)."""
    uuids = [r.uuid for r in rows]
    names: dict[str, str] = {}
    pools: dict[str, tuple[str, str, str]] = {}
    if any(r.node_uuid or r.pool_uuid for r in rows):
        placed = await column_rows(session, _PLACEMENT_NAMES, {"uuids": uuids})
        for uuid, node_name, pool_name, qos_level, network_mode in placed:
            if node_name is not None:
                names[uuid] = node_name
            if pool_name is not None:
                pools[uuid] = (pool_name, qos_level, network_mode)
    tags = await tags_of(session, uuids)
    public, forwards = await addressing_of(session, uuids)
    return [vm_model(r, names.get(r.uuid), tags.get(r.uuid), pools.get(r.uuid),
                     public.get(r.uuid), forwards.get(r.uuid))
            for r in rows]


class VmService:
    def __init__(self, ctx: ControlContext) -> None:
        self.ctx = ctx
        self.forwards = PortForwardService(ctx)
        self.addresses = VmAddressService(ctx)
        self.nics = VmNicService(ctx)

    async def create(self, req: VmCreate, user: RequestContext, scope: Scope) -> Accepted:
        """Record the VM, count it against its project's quota, and start its create flow."""
        require_project_write(user, "create VMs")
        key = current_key.get()
        async with self.ctx.db.session() as session:
            if key is not None:
                made = await self._made_under_key(session, key)
                if made is not None:
                    return made
            image = iso = None
            if req.image is not None:
                image = await _usable_image(session, req.image, scope)
                if image.format == "iso":
                    raise Unprocessable(
                        f"image {image.name} is an ISO; a VM boots from a disk image. To "
                        f"install from it, give it as the VM's iso (`--iso {image.name}`), "
                        "with no image for a blank disk")
                if image.virtual_size and image.virtual_size > req.disk_gb * 1024**3:
                    raise Unprocessable(
                        f"disk_gb={req.disk_gb} is smaller than image {image.name} "
                        f"({image.virtual_size / 1024**3:.1f} GiB)")
            if req.iso is not None:
                iso = await _iso(session, req.iso, scope)
            keys = await resolve_keys(session, req.ssh_keys, user)
            pools, pool = await self._pools_for(session, req, scope)
            group = await self._group_for(session, req, user, scope)
            mode = mode_for(pool.network_mode) if pool is not None else None
            if mode is not None and pool is not None and mode.name == "sandbox-mono":
                await address_pool_of(session, pool)  # refused at once when none is linked
            vm_uuid = str(uuidlib.uuid4())
            # Answer at once when no node can take the VM now (the placement in the
            # create's flow is the real check: this one only saves a doomed task).
            await self.ctx.placement.check(session, Request(
                req.vcpus, req.memory_mb, req.disk_gb, pool_uuids=tuple(pools),
                labels=MappingProxyType(dict(req.node_labels)),
                capabilities=qos_needs({"bandwidth_kbit": req.bandwidth_kbit}),
                group_uuid=group.uuid if group else None))
            await quotas.claim(session, await _project(session, user),
                               quotas.vm_amounts(req.vcpus, req.memory_mb, req.disk_gb))
            qos = {"bandwidth_kbit": req.bandwidth_kbit} if req.bandwidth_kbit else {}
            vm = VmRow(
                uuid=vm_uuid, name=req.name, description=req.description,
                project_uuid=user.project_uuid, state=VmState.BUILDING, vcpus=req.vcpus,
                memory_mb=req.memory_mb, disk_gb=req.disk_gb,
                image_uuid=image.uuid if image is not None else None,
                # A blank VM boots from its ISO to be installed; one with a disk image
                # boots from it, the ISO only inserted.
                cdrom_image_uuid=iso.uuid if iso is not None else None,
                boot="cdrom" if image is None else "disk",
                ssh_keys=keys, user_data=req.user_data,
                pool_uuid=pool.uuid if pool else None, group_uuid=group.uuid if group else None,
                node_labels=dict(req.node_labels), qos=qos,
                # In the transaction that makes the VM and its flow: a create carried out
                # again after a crash finds this VM (U-IDEMP).
                idempotency_key=key,
                # Its create task, named here so the row is written once.
                task_uuid=str(uuidlib.uuid4()),
            )
            session.add(vm)
            session.add(root_volume(vm, pool))  # C-STO: every disk is a volume
            tags = await update_tags(session, "vm", vm.uuid, req.tags) if req.tags else {}
            flow = await self.ctx.engine.add_flow(session, "vm.create", vm.uuid,
                                                  {POOLS: pools} if mode is None
                                                  else network_needs(mode),
                                                  project_uuid=vm.project_uuid,
                                                  what=f"VM {vm.name}",
                                                  flow_uuid=vm.task_uuid)
            accepted = Accepted(task=task_model(flow), resource=vm_model(
                vm, tags=tags,
                pool=(pool.name, pool.qos_level, pool.network_mode) if pool else None,
            ).model_dump(mode="json"))
        self.ctx.engine.launch(flow.uuid, vm.uuid)
        return accepted

    @staticmethod
    async def _pools_for(session: AsyncSession, req: VmCreate, scope: Scope
                         ) -> tuple[list[str], PoolRow | None]:
        """The pools the VM may go to, and its pool when it named one (not a zone)."""
        if req.pool and req.zone:
            raise Unprocessable("name a pool or a zone, not both")
        if req.zone:
            zone = await find(session, ZoneRow, req.zone, "zone", scope)
            pools = list((await session.scalars(select(PoolRow.uuid).where(
                PoolRow.zone_uuid == zone.uuid).order_by(PoolRow.name))).all())
            if not pools:
                raise Unprocessable(f"zone {zone.name} has no compute pool")
            return pools, None
        if req.pool is None:
            pool = (await session.scalars(select(PoolRow).where(
                PoolRow.name == DEFAULT_POOL))).first()
            if pool is None:
                raise Unprocessable(f"name a pool: there is no pool named {DEFAULT_POOL}")
        else:
            pool = await find(session, PoolRow, req.pool, "pool", scope)
        return [pool.uuid], pool

    @staticmethod
    async def _group_for(session: AsyncSession, req: VmCreate, user: RequestContext,
                         scope: Scope) -> VmGroupRow | None:
        if req.group is None:
            return None
        group = await find(session, VmGroupRow, req.group, "VM group", scope)
        if group.project_uuid != user.project_uuid:
            raise Unprocessable(f"VM group {group.name} belongs to another project")
        return group

    async def insert_cdrom(self, ref: str, req: CdromInsert, scope: Scope) -> Accepted:
        """Put an ISO into the VM's CD drive (a running guest sees the new medium at once);
        an ISO already in it is replaced. Nothing to do when it is already there."""
        async with self.ctx.db.session() as session:
            vm = await find(session, VmRow, ref, "VM", scope)
            iso = await _iso(session, req.image, scope)
            if vm.cdrom_image_uuid == iso.uuid:
                return Accepted(task=None, resource=vm_model(vm).model_dump(mode="json"),
                                message=f"ISO {iso.name} is already in the CD drive of VM "
                                        f"{vm.name}; nothing to do")
        return await self._launch(ref, "vm.cdrom", CDROM_ALLOWED, None,
                                  {CDROM_IMAGE: iso.uuid}, scope)

    async def eject_cdrom(self, ref: str, scope: Scope) -> Accepted:
        """Empty the VM's CD drive. A VM booting from it boots from its disk from now on
        (the installed system), at its next start."""
        async with self.ctx.db.session() as session:
            vm = await find(session, VmRow, ref, "VM", scope)
            if vm.cdrom_image_uuid is None:
                return Accepted(task=None, resource=vm_model(vm).model_dump(mode="json"),
                                message=f"VM {vm.name} has no ISO in its CD drive; nothing "
                                        "to do")
        return await self._launch(ref, "vm.cdrom", CDROM_ALLOWED, None, {CDROM_IMAGE: None},
                                  scope)

    async def set_qos(self, ref: str, req: VmQosUpdate, scope: Scope) -> Accepted:
        """Change a VM's QoS limits; applied at once to its running domain."""
        async with self.ctx.db.session() as session:
            vm = await find(session, VmRow, ref, "VM", scope)
            pool = await session.get(PoolRow, vm.pool_uuid) if vm.pool_uuid else None
            current = effective_qos(vm, pool.qos_level if pool else None).model_dump()
        changes = req.model_dump(exclude_none=True, exclude={"clear"})
        cleared: dict[str, Any] = dict.fromkeys(req.clear)
        wanted = {**current, **changes, **cleared}
        if not changes and not req.clear:
            raise Unprocessable("name at least one QoS limit to set or clear")
        qos = QosSpec.model_validate(wanted)
        return await self._launch(ref, "vm.set_qos", QOS_ALLOWED, None,
                                  {"qos": qos.model_dump(mode="json")}, scope)

    async def _made_under_key(self, session: AsyncSession, key: str) -> Accepted | None:
        """The answer to a create already carried out under Idempotency-Key ``key`` (by a
        control server that died before recording its answer), or None."""
        vm = (await session.scalars(select(VmRow).where(VmRow.idempotency_key == key))).first()
        if vm is None:
            return None
        flow = (await session.scalars(
            select(FlowRow).where(FlowRow.resource_uuid == vm.uuid, FlowRow.kind == "vm.create")
            .order_by(FlowRow.created_at.desc()).limit(1))).first()
        log.info("create carried out again under its Idempotency-Key: answering the VM it "
                 "made", extra={"vm": vm.uuid, "task": flow.uuid if flow else None})
        return Accepted(task=task_model(flow) if flow is not None else None,
                        resource=(await vm_models(session, [vm]))[0].model_dump(mode="json"))

    async def get(self, ref: str, scope: Scope) -> Vm:
        async with self.ctx.db.reading() as session:
            return (await vm_models(session, [await find(session, VmRow, ref, "VM", scope)]))[0]

    async def action(self, ref: str, action: str, scope: Scope,
                     stop: VmStop | None = None) -> Accepted:
        """Start, stop or reboot; asking for the state already reached does nothing and
        says so."""
        data: dict[str, Any] = {}
        if action == "stop":
            data["stop"] = StopRequest(**(stop or VmStop()).model_dump()).model_dump()
        return await self._launch(ref, f"vm.{action}", ACTIONS_ALLOWED[action],
                                  TRANSIENT[action], data, scope, ALREADY.get(action))

    async def delete(self, ref: str, scope: Scope, keep_volumes: bool = False) -> Accepted:
        """Delete the VM with its domain, root volume, address, reservation and quota, and
        the data volumes marked ``delete_with_vm`` unless ``keep_volumes`` (then every
        data volume is kept, detached; Z-CASCADE)."""
        if keep_volumes:
            await keep_data_volumes(self.ctx, ref, scope)
        return await self._launch(ref, "vm.delete", None, VmState.DELETING, {}, scope)

    async def _launch(self, ref: str, kind: str, allowed: set[VmState] | None,
                      transient: VmState | None, data: dict[str, Any], scope: Scope,
                      already: VmState | None = None) -> Accepted:
        """Start flow ``kind`` on the VM, or answer the same task if it already runs one."""
        async with self.ctx.db.session() as session:
            vm = await find(session, VmRow, ref, "VM", scope)
            require_in_project(scope.context, Permission.WRITE, vm.project_uuid,
                               what=f"{kind.split('.')[1]} VM {vm.name}")
            running = await self._running_task(session, vm.uuid)
            if running is not None:
                if running.kind == kind:  # a repeated request: the same answer (U-IDEMP)
                    return Accepted(task=task_model(running),
                                    resource=vm_model(vm).model_dump(mode="json"))
                raise Conflict(f"VM {vm.name} is busy with task {running.uuid} ({running.kind})")
            if already is not None and vm.state == already:
                return Accepted(task=None, resource=vm_model(vm).model_dump(mode="json"),
                                message=f"VM {vm.name} is already {vm.state}; nothing to do")
            if allowed is not None and vm.state not in allowed:
                raise Conflict(f"cannot {kind.split('.')[1]} VM {vm.name} while it is {vm.state}")
            flow = await self.ctx.engine.add_flow(session, kind, vm.uuid,
                                                  {"previous_state": vm.state, **data},
                                                  project_uuid=vm.project_uuid,
                                                  what=f"VM {vm.name}")
            if transient is not None:
                vm.state = transient
            vm.task_uuid = flow.uuid
            await session.flush()
            accepted = Accepted(task=task_model(flow), resource=vm_model(vm).model_dump(
                mode="json"))
        self.ctx.engine.launch(flow.uuid, vm.uuid)
        return accepted

    async def console_log(self, ref: str, max_bytes: int, scope: Scope) -> str:
        vm, node = await self._placed(ref, scope)
        return await node_client(self.ctx, node).console_log(vm.uuid, max_bytes)

    async def console(self, ref: str, scope: Scope) -> Console:
        vm, node = await self._placed(ref, scope)
        info = await node_client(self.ctx, node).console(vm.uuid)
        host = info.vnc_host
        if host in (None, "0.0.0.0", "::"):
            # The display listens on every address of the node: name the node's address.
            host = node.url.split("//", 1)[-1].rsplit(":", 1)[0]
        return Console(vm_uuid=vm.uuid, node_name=node.name, vnc_host=host,
                       vnc_port=info.vnc_port, serial_log=info.serial_log)

    async def _placed(self, ref: str, scope: Scope) -> tuple[VmRow, NodeRow]:
        async with self.ctx.db.session() as session:
            vm = await find(session, VmRow, ref, "VM", scope)
            # The console shows what a guest prints: members only, not readers.
            require_in_project(scope.context, Permission.WRITE, vm.project_uuid,
                               what=f"open the console of VM {vm.name}")
            node = await session.get(NodeRow, vm.node_uuid) if vm.node_uuid else None
            if node is None:
                raise Conflict(f"VM {vm.name} is not placed on a node")
            return vm, node

    @staticmethod
    async def _running_task(session: AsyncSession, vm_uuid: str) -> FlowRow | None:
        return (await session.scalars(
            select(FlowRow).where(FlowRow.resource_uuid == vm_uuid)
            .where(FlowRow.state.in_(UNFINISHED)).limit(1))).first()


async def _usable_image(session: AsyncSession, ref: str, scope: Scope) -> ImageRow:
    """The active image ``ref`` names, read again under a share lock (PostgreSQL; SQLite
    serialises writers anyway): an image delete that marks the record `deleting` waits
    for this VM to be committed and then sees it, or this request sees the mark."""
    image = await find(session, ImageRow, ref, "image", scope)
    await session.refresh(image, with_for_update={"read": True})
    if image.status != ImageStatus.ACTIVE:
        raise Conflict(f"image {image.name} is {image.status}, not active")
    return image


async def _iso(session: AsyncSession, ref: str, scope: Scope) -> ImageRow:
    """The active ISO image ``ref`` names; a disk image is refused, saying how it is
    used instead."""
    iso = await _usable_image(session, ref, scope)
    if iso.format != "iso":
        raise Unprocessable(
            f"image {iso.name} is a {iso.format} disk image, not an ISO: a CD drive takes "
            f"ISO images only (boot a VM from it with `--image {iso.name}`)")
    return iso


async def _project(session: AsyncSession, user: RequestContext) -> ProjectRow:
    project = await session.get(ProjectRow, user.project_uuid)
    if project is None:
        raise Unprocessable(f"project {user.project_name} no longer exists")
    return project
