"""The flows of a VM's life: create, delete, start, stop, reboot (F-LIFE, Z-FLOW).

Create (F-BALANCE): schedule (reserve capacity on a node and, in sandbox mode, an
address of its sandbox subnet, in one transaction) → address (a mono VM's public address
from its pool's address pool) → provision (the node fetches the image, makes the disk
and NIC, defines and starts the domain) → forwarders (the routers are told the VM's
public mappings; best effort, a router down catches up) → confirm (the node reports the
domain running). Each step rolls back what it took. The network mode of the VM's pool
(:mod:`yun.control.network.modes`) decides what the network steps do.

A rollback never releases what the node may still hold: when the node cannot confirm
the VM's removal, the VM ends in error still holding its address and reservation
(``node_cleanup``), and the node's reports release them once it holds nothing for it.
Delete: remove from the node → release. A VM whose node is down stays ``deleting``
(``node_cleanup``) until the node returns and its report shows nothing left for it.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Mapping
from types import MappingProxyType
from typing import TYPE_CHECKING

from sqlalchemy import delete, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from yun.control.allocators import quotas
from yun.control.db.models import ImageRow, NodeRow, PoolRow, VmNicRow, VmRow, utcnow
from yun.control.db.tags import drop_tags
from yun.control.flows.engine import FlowContext, FlowDefinition, Step
from yun.control.flows.volumes import disk_specs, release_volumes, volumes_going_with
from yun.control.network import public_ips
from yun.control.network.modes import (
    NetworkMode,
    mode_for,
    release_all,
    release_node_scoped,
)
from yun.control.network.modes.publish import notify, publish
from yun.control.network.subnets import sandbox_settings
from yun.control.nodeclient import PowerAction, node_client
from yun.control.scheduler import inventory
from yun.control.scheduler.placement import Request
from yun.proto.components import ComponentType
from yun.proto.errors import Conflict, NotFound, Unavailable, YunError
from yun.proto.messages import (
    CdromChange,
    CdromSpec,
    CloudInitSpec,
    CpuQos,
    DomainSpec,
    DomainState,
    ImageLocation,
    NodeCapability,
    ProvisionRequest,
    QosSpec,
    StopRequest,
)
from yun.proto.network import NicNetwork
from yun.proto.resources import ImageStatus, VmState

if TYPE_CHECKING:  # the context holds the engine that runs these flows
    from yun.control.context import ControlContext

log = logging.getLogger("yun.control.vm")

ROOT_DISK = "root"
# Keys of a flow's data: the node may still hold the VM after a failed rollback; the
# VM's node was down when it was deleted.
NODE_HOLDS = "node_holds"
DEFERRED = "deferred_to_node"
# The pools a create may use (one, or those of the zone it named); the nodes tried.
POOLS = "pools"
TRIED = "tried_nodes"
# The node and domain state the provision step's answer reported.
PROVISIONED = "provisioned"
# What the VM's network mode needs of the create (recorded when its pool is known at
# create; absent, as for a zone's VM, the steps they spare run and find it out).
PUBLIC_AT_CREATE = "public_at_create"
ROUTED = "routed"


def network_needs(mode: NetworkMode) -> dict[str, bool]:
    """The create's flow data saying whether the VM takes a public address at create
    (its "address" step) and whether the routers may forward to it ("forwarders")."""
    return {PUBLIC_AT_CREATE: mode.public_at_create, ROUTED: mode.routed}
# How many nodes a create tries before it rolls back (the scheduler's alternates).
MAX_NODES_TRIED = 3


def hostname_for(name: str) -> str | None:
    """The VM's name as a DNS label for DHCP (None when nothing of it is usable)."""
    label = re.sub(r"[^a-z0-9-]+", "-", name.lower()).strip("-")[:63].rstrip("-")
    return label or None


def _ctl(ctx: FlowContext) -> ControlContext:
    return ctx.services  # type: ignore[no-any-return]


async def _vm(session: AsyncSession, vm_uuid: str) -> VmRow:
    vm = await session.get(VmRow, vm_uuid)
    if vm is None:
        raise NotFound(f"VM {vm_uuid} no longer exists")
    return vm


async def _build_rows(session: AsyncSession, vm_uuid: str
                      ) -> tuple[VmRow, NodeRow, ImageRow | None, PoolRow | None]:
    """What building the VM on its node starts from, in one statement: the VM, its node,
    its image and its pool. NotFound when the VM, its node or its image is gone."""
    found = (await session.execute(
        select(VmRow, NodeRow, ImageRow, PoolRow)
        .outerjoin(NodeRow, NodeRow.uuid == VmRow.node_uuid)
        .outerjoin(ImageRow, ImageRow.uuid == VmRow.image_uuid)
        .outerjoin(PoolRow, PoolRow.uuid == VmRow.pool_uuid)
        .where(VmRow.uuid == vm_uuid))).first()
    if found is None:
        raise NotFound(f"VM {vm_uuid} no longer exists")
    vm, node, image, pool = found
    if node is None or (vm.image_uuid and image is None):
        raise NotFound(f"VM {vm.name}: its node or image vanished")
    return vm, node, image, pool


async def _vm_and_node(ctx: FlowContext) -> tuple[VmRow | None, NodeRow | None]:
    """The flow's VM and the node it is placed on (either may be gone)."""
    async with _ctl(ctx).db.reading() as session:
        vm = await session.get(VmRow, ctx.resource_uuid)
        node = await session.get(NodeRow, vm.node_uuid) if vm and vm.node_uuid else None
        return vm, node


def placement_request(vm: VmRow, ctx: FlowContext, tried: Iterable[str] = ()) -> Request:
    """What the VM asks of the scheduler: its pool (or its zone's pools), its group, the
    node labels it wants and the node capabilities its QoS needs, avoiding the nodes
    already ``tried`` (what each pool's network mode needs is the pool's own policy)."""
    pools = tuple(ctx.data.get(POOLS) or ([vm.pool_uuid] if vm.pool_uuid else []))
    return Request(vm.vcpus, vm.memory_mb, vm.disk_gb, pool_uuids=pools,
                   labels=MappingProxyType(dict(vm.node_labels or {})),
                   capabilities=qos_needs(vm.qos or {}),
                   group_uuid=vm.group_uuid, exclude=frozenset(tried))


def qos_needs(qos: Mapping[str, object]) -> frozenset[str]:
    """The node capabilities a VM's QoS limits need: a node that cannot enforce a limit
    must not get the VM (the CPU level is applied by every driver)."""
    needs = set()
    if qos.get("bandwidth_kbit"):
        needs.add(NodeCapability.QOS_NET.value)
    if any(qos.get(k) for k in ("read_iops_sec", "write_iops_sec", "read_bytes_sec",
                                "write_bytes_sec")):
        needs.add(NodeCapability.QOS_DISK.value)
    return frozenset(needs)


async def _placed_vm(ctx: FlowContext) -> tuple[VmRow, NodeRow]:
    """The flow's VM and its node; NotFound or Unavailable when either is missing."""
    vm, node = await _vm_and_node(ctx)
    if vm is None:
        raise NotFound(f"VM {ctx.resource_uuid} no longer exists")
    if node is None:
        raise Unavailable(f"VM {vm.name} has no node")
    return vm, node


class Schedule(Step):
    name = "schedule"

    async def run(self, ctx: FlowContext) -> None:
        control = _ctl(ctx)
        async with control.db.session() as session:
            vm = await _vm(session, ctx.resource_uuid)
            req = placement_request(vm, ctx)
        placed = await control.placement.place(ctx.resource_uuid, req)
        ctx.data[TRIED] = [placed.node_uuid]
        log.info("VM placed", extra={"vm": ctx.resource_uuid, "node": placed.node_uuid,
                                     "node_name": placed.node_name, "pool": placed.pool_uuid,
                                     "alternates": len(placed.alternates)})

    async def rollback(self, ctx: FlowContext) -> None:
        control = _ctl(ctx)
        async with control.db.session() as session:
            vm = await session.get(VmRow, ctx.resource_uuid)
            if vm is None:
                await release_all(session, ctx.resource_uuid)
                return
            if ctx.data.get(NODE_HOLDS):
                # The node could not confirm it removed the VM: its lease may still hand
                # out the address and its disk still fill the node. Keep both held; the
                # node's reports release them once it holds nothing for the VM.
                vm.node_cleanup = True
                log.warning("create rolled back; the node may still hold the VM: address and "
                            "reservation kept until its report shows nothing left",
                            extra={"vm": vm.uuid, "node": vm.node_uuid, "ip": vm.ip})
                return
            await release_placement(session, vm)


async def release_placement(session: AsyncSession, vm: VmRow) -> bool:
    """Give back what the VM holds on its node (sandbox addresses, NAT ports) and the
    node's reservation, once.

    The VM's ``node_uuid`` is cleared by a conditional UPDATE, so two releasers (a flow
    and a node report, or two control servers) never both give back the reservation.
    Returns whether this call released it.
    """
    await release_node_scoped(session, vm.uuid)
    # NICs plugged in later hold addresses of the node's subnet, given back just above:
    # they go with the placement (their MACs with their rows).
    await session.execute(delete(VmNicRow).where(VmNicRow.vm_uuid == vm.uuid))
    node_uuid = vm.node_uuid
    vm.ip = None
    if vm.extra_ips:
        vm.extra_ips = []  # addresses of the node's subnet: given back with it
    if not node_uuid:
        vm.node_cleanup = False
        return False
    claimed = await session.execute(
        update(VmRow).where(VmRow.uuid == vm.uuid).where(VmRow.node_uuid == node_uuid)
        .values(node_uuid=None, ip=None, node_cleanup=False)
        .execution_options(synchronize_session=False))
    vm.node_uuid, vm.node_cleanup = None, False
    if not claimed.rowcount:  # type: ignore[attr-defined]
        return False
    await inventory.release(session, vm.uuid)
    return True


async def finish_delete(session: AsyncSession, vm: VmRow) -> list[str]:
    """The VM's node holds nothing for it: give back everything and forget it (its
    public addresses and ports too, recorded as a change of the routers' rules).
    Returns the public addresses and ports released."""
    await release_placement(session, vm)
    released = await public_ips.release_vm(session, vm.uuid)
    if released:
        log.info("VM's public addresses released", extra={"vm": vm.uuid,
                                                           "released": released})
    await quotas.release(session, vm.project_uuid,
                         quotas.vm_amounts(vm.vcpus, vm.memory_mb, vm.disk_gb))
    await release_volumes(session, vm.uuid)
    await drop_tags(session, vm.uuid)
    await session.delete(vm)
    return released


def effective_qos(row: VmRow, pool_level: str | None) -> QosSpec:
    """The VM's QoS: what was set on it, its CPU level from its pool unless set."""
    qos = dict(row.qos or {})
    qos.setdefault("cpu", pool_level or CpuQos.MEDIUM)
    return QosSpec.model_validate(qos)


def image_location(control: ControlContext, image: ImageRow) -> ImageLocation:
    """Where a node fetches ``image`` from (its storage server now); Conflict when the
    image is not active and stored."""
    storage_url = image.storage_url or ""
    peer = control.membership.peers.get(image.storage_uuid or "")
    if peer is not None and peer.type == ComponentType.STORAGE:
        storage_url = peer.url  # the storage server may have moved since the upload
    if image.status != ImageStatus.ACTIVE:
        raise Conflict(f"image {image.name} is {image.status}, not active")
    if not storage_url or not image.sha256 or not image.format:
        raise Conflict(f"image {image.name} is not ready")
    return ImageLocation(
        image_id=image.uuid, url=f"{storage_url.rstrip('/')}/internal/v1/images/{image.uuid}/data",
        sha256=image.sha256, size=image.size or 0, format=image.format,
    )


async def guest_media(control: ControlContext, session: AsyncSession, vm: VmRow,
                      request: ProvisionRequest) -> None:
    """Put into ``request`` what the VM's guest gets beside its disks: its CD drive (the
    ISO in it, fetched into the node's cache like a disk image), what it boots from, and
    its cloud-init NoCloud seed (every VM has one: instance id, hostname, SSH keys, user
    data).

    Every VM has a CD drive, empty when no ISO is in it: a CD drive cannot be plugged
    into a running guest, so the drive is there for an ISO inserted later."""
    spec = request.spec
    spec.boot = "cdrom" if vm.boot == "cdrom" else "disk"
    spec.cdrom = CdromSpec()
    if vm.cdrom_image_uuid:
        iso = await session.get(ImageRow, vm.cdrom_image_uuid)
        if iso is None:
            raise NotFound(f"VM {vm.name}: the ISO in its CD drive vanished")
        location = image_location(control, iso)
        spec.cdrom = CdromSpec(image_id=iso.uuid, image_sha256=iso.sha256)
        if all(i.image_id != iso.uuid for i in request.images):
            request.images.append(location)
    spec.cloud_init = CloudInitSpec(
        instance_id=vm.uuid, hostname=hostname_for(vm.name) or f"vm-{vm.uuid[:8]}",
        ssh_keys=list(vm.ssh_keys or []), user_data=vm.user_data)


async def provision_request(control: ControlContext, session: AsyncSession, vm: VmRow,
                            node: NodeRow, image: ImageRow | None,
                            pool: PoolRow | None = None) -> ProvisionRequest:
    """What the node is asked to build: the domain (a blank root disk when ``image`` is
    None), its NICs as the pool's network mode makes them and, for sandbox NICs, the
    node's sandbox settings; its CD drive and cloud-init seed (:func:`guest_media`)."""
    images = [image_location(control, image)] if image is not None else []
    mode = mode_for(pool.network_mode if pool is not None else None)
    nics = (await session.scalars(select(VmNicRow).where(VmNicRow.vm_uuid == vm.uuid))).all()
    spec = DomainSpec(
        uuid=vm.uuid, name=vm.name, vcpus=vm.vcpus, memory_mb=vm.memory_mb,
        qos=effective_qos(vm, pool.qos_level if pool is not None else None),
        disks=await disk_specs(session, vm, node, image, pool),
        nics=mode.nic_specs(vm, nics, hostname=hostname_for(vm.name)),
    )
    sandbox = None
    if any(n.network == NicNetwork.SANDBOX for n in spec.nics):
        sandbox = await sandbox_settings(session, node, control.settings,
                                         control.live_routers)
        if sandbox is None:
            raise Conflict(f"node {node.name} has no sandbox subnet yet")
    request = ProvisionRequest(spec=spec, images=images, start=True, sandbox=sandbox)
    await guest_media(control, session, vm, request)
    return request


class Provision(Step):
    """Build the VM on its node; when the node fails, move to the next best node (the
    scheduler's alternates) before giving up, up to ``MAX_NODES_TRIED`` nodes."""

    name = "provision"

    async def run(self, ctx: FlowContext) -> None:
        control = _ctl(ctx)
        while True:
            async with control.db.session() as session:
                vm, node, image, pool = await _build_rows(session, ctx.resource_uuid)
                request = await provision_request(control, session, vm, node, image, pool)
                client = node_client(control, node)
            try:
                info = await client.provision(request, request_id=f"{ctx.flow_uuid}:provision",
                                              timeout=control.settings.create_timeout)
                # What the node answered is what the confirm step checks first.
                ctx.data[PROVISIONED] = {"node": node.uuid, "state": str(info.state)}
                return
            except YunError as exc:
                tried = list(ctx.data.get(TRIED) or [node.uuid])
                if len(tried) >= MAX_NODES_TRIED or not await _move(ctx, node, tried, exc):
                    raise

    async def rollback(self, ctx: FlowContext) -> None:
        control = _ctl(ctx)
        _, node = await _vm_and_node(ctx)
        if node is None:
            return
        try:
            await remove_from_node(control, node, ctx, "unprovision")
        except Exception:
            # The node may hold the domain, disk or lease (half removed, or never
            # reached): the journal says rollback_failed, the schedule's rollback keeps
            # the address and reservation, and the orphan cleanup finishes the removal
            # once the node reports.
            ctx.data[NODE_HOLDS] = node.uuid
            raise


async def _move(ctx: FlowContext, node: NodeRow, tried: list[str], exc: YunError) -> bool:
    """Provisioning failed on ``node``: clear it there and place the VM on another node.

    Returns False (the create rolls back) when the node cannot confirm it removed what it
    made, or when no other node fits."""
    control = _ctl(ctx)
    log.warning("provisioning failed on a node; trying the next best", extra={
        "vm": ctx.resource_uuid, "node": node.uuid, "node_name": node.name, "error": str(exc)})
    try:
        await remove_from_node(control, node, ctx, f"unprovision-{len(tried)}")
    except YunError:
        return False  # the rollback tries again and keeps what the node may hold
    async with control.db.session() as session:
        vm = await _vm(session, ctx.resource_uuid)
        # Its sandbox address was of the failed node's subnet: the placement's hook takes
        # one of the new node's (a public address stays: it is not node-scoped).
        await release_placement(session, vm)
        req = placement_request(vm, ctx, tried)
    try:
        placed = await control.placement.place(ctx.resource_uuid, req)
    except YunError:
        return False
    # Persisted with the step's end; after a crash the VM's node (committed with the
    # placement) says where it went.
    ctx.data[TRIED] = [*tried, placed.node_uuid]
    log.info("VM moved to the next best node", extra={
        "vm": ctx.resource_uuid, "node": placed.node_uuid, "node_name": placed.node_name})
    return True


async def remove_from_node(control: ControlContext, node: NodeRow, ctx: FlowContext,
                           why: str) -> None:
    """Have the node remove the VM's domain, leases and the volumes that go with it (its
    root volume, and data volumes marked ``delete_with_vm``; idempotent on the node)."""
    async with control.db.session() as session:
        volumes = await volumes_going_with(session, ctx.resource_uuid)
    await node_client(control, node).remove(
        ctx.resource_uuid, request_id=f"{ctx.flow_uuid}:{why}", timeout=180,
        delete_volumes=volumes)


class Address(Step):
    """F-BALANCE "address from the pool": the public address the VM's network mode takes
    at create (a mono VM's own address); given back on rollback."""

    name = "address"

    def needed(self, ctx: FlowContext) -> bool:
        return bool(ctx.data.get(PUBLIC_AT_CREATE, True))

    async def run(self, ctx: FlowContext) -> None:
        async with _ctl(ctx).db.session() as session:
            vm = await _vm(session, ctx.resource_uuid)
            pool = await session.get(PoolRow, vm.pool_uuid) if vm.pool_uuid else None
            if pool is None:
                return
            taken = await mode_for(pool.network_mode).allocate_public(session, vm, pool)
        if taken:
            log.info("VM given its public address", extra={
                "vm": ctx.resource_uuid, "ips": [r.ip for r in taken]})

    async def rollback(self, ctx: FlowContext) -> None:
        async with _ctl(ctx).db.session() as session:
            released = await public_ips.release_vm(session, ctx.resource_uuid)
        if released:
            log.info("create rolled back: public addresses released",
                     extra={"vm": ctx.resource_uuid, "released": released})
            await notify(_ctl(ctx), ctx.resource_uuid)


class Forwarders(Step):
    """F-BALANCE "forwarders on the routers": the VM's mappings (its public address to
    its address on the new node) are published. Best effort past the database: a router
    that is down catches up when it returns, so the create never fails because of it."""

    name = "forwarders"

    def needed(self, ctx: FlowContext) -> bool:
        return bool(ctx.data.get(ROUTED, True))

    async def run(self, ctx: FlowContext) -> None:
        await publish(_ctl(ctx), ctx.resource_uuid)

    async def rollback(self, ctx: FlowContext) -> None:
        # The address step's rollback unmaps the VM; the routers are told then.
        return None


class Confirm(Step):
    name = "confirm"

    def needed(self, ctx: FlowContext) -> bool:
        # The node's answer to the provision (of this flow: the VM held by it, so on the
        # node that answered) reported the domain running: asking again would cost a
        # read and a round trip per VM and prove nothing more.
        return bool((ctx.data.get(PROVISIONED) or {}).get("state") != DomainState.RUNNING)

    async def run(self, ctx: FlowContext) -> None:
        control = _ctl(ctx)
        vm, node = await _vm_and_node(ctx)
        if vm is None or node is None:
            raise NotFound("the VM or its node vanished")
        info = await node_client(control, node).get_domain(vm.uuid, timeout=30)
        if info.state is not DomainState.RUNNING:
            raise Conflict(f"node {node.name} reports the domain {info.state}, not running")


async def _set_state(ctx: FlowContext, state: VmState, error: str | None,
                     power: str | None = None) -> None:
    async with _ctl(ctx).db.session() as session:
        vm = await session.get(VmRow, ctx.resource_uuid)
        if vm is None:
            return
        vm.state = state
        vm.error = error
        if power is not None:
            vm.power_state = power


async def _created(ctx: FlowContext) -> None:
    # With the flow's end, in its transaction: no commit of its own per VM.
    ctx.at_end.append(update(VmRow).where(VmRow.uuid == ctx.resource_uuid).values(
        state=VmState.RUNNING, error=None, power_state=DomainState.RUNNING,
        updated_at=utcnow()))


async def _create_failed(ctx: FlowContext) -> None:
    await _set_state(ctx, VmState.ERROR, f"create failed: {ctx.error}", DomainState.ABSENT)


# --- delete ------------------------------------------------------------------------------


class RemoveDomain(Step):
    name = "remove_domain"

    async def run(self, ctx: FlowContext) -> None:
        control = _ctl(ctx)
        vm, node = await _vm_and_node(ctx)
        if vm is None or node is None:
            return
        if node.status != "up":
            # The guest may well run on (U-SPLIT): nothing is released now. The VM stays
            # `deleting`; when the node returns, the orphan cleanup removes what it holds
            # and its report showing nothing left finishes the delete.
            log.warning("deleting a VM whose node is down: deferred until the node returns",
                        extra={"vm": vm.uuid, "node": node.uuid, "node_name": node.name})
            ctx.data[DEFERRED] = node.uuid
            return
        await remove_from_node(control, node, ctx, "delete")


class ReleaseResources(Step):
    name = "release"

    async def run(self, ctx: FlowContext) -> None:
        async with _ctl(ctx).db.session() as session:
            vm = await session.get(VmRow, ctx.resource_uuid)
            if vm is None:
                # Already deleted: an earlier try committed and only its answer was lost.
                log.info("VM already deleted", extra={"vm": ctx.resource_uuid})
                return
            if ctx.data.get(DEFERRED):
                node = await session.get(NodeRow, vm.node_uuid) if vm.node_uuid else None
                vm.state, vm.node_cleanup = VmState.DELETING, True
                vm.error = (f"node {node.name if node else vm.node_uuid} is down: the VM is "
                            "deleted when the node returns and confirms its removal")
                return
            released = await finish_delete(session, vm)
        log.info("VM deleted", extra={"vm": ctx.resource_uuid})
        if released:  # the routers forward to it no more
            await notify(_ctl(ctx), ctx.resource_uuid)


async def _delete_failed(ctx: FlowContext) -> None:
    await _set_state(ctx, VmState.ERROR, f"delete failed: {ctx.error}")


# --- power -------------------------------------------------------------------------------


class PowerStep(Step):
    """Ask the VM's node to start, stop or reboot the domain."""

    def __init__(self, action: PowerAction) -> None:
        self.name = action
        self.action = action

    async def run(self, ctx: FlowContext) -> None:
        control = _ctl(ctx)
        vm, node = await _placed_vm(ctx)
        body = StopRequest.model_validate(ctx.data["stop"]) if self.action == "stop" else None
        timeout = (body.timeout + 30) if body is not None else 120
        info = await node_client(control, node).power(
            vm.uuid, self.action, body, request_id=f"{ctx.flow_uuid}:{self.action}",
            timeout=timeout)
        ctx.data["power"] = info.state


def _power_done(state: VmState) -> object:
    async def hook(ctx: FlowContext) -> None:
        await _set_state(ctx, state, None, ctx.data.get("power"))
    return hook


async def _power_failed(ctx: FlowContext) -> None:
    previous = VmState(ctx.data.get("previous_state", VmState.UNKNOWN))
    await _set_state(ctx, previous, f"{ctx.kind.split('.')[-1]} failed: {ctx.error}")


# --- QoS ---------------------------------------------------------------------------------


class SetQos(Step):
    """Apply the VM's new QoS on its node: live on a running domain, and in its definition."""

    name = "set_qos"

    async def run(self, ctx: FlowContext) -> None:
        control = _ctl(ctx)
        vm, node = await _placed_vm(ctx)
        qos = QosSpec.model_validate(ctx.data["qos"])
        await node_client(control, node).set_qos(
            vm.uuid, qos, request_id=f"{ctx.flow_uuid}:set_qos", timeout=60)
        log.info("VM QoS applied", extra={"vm": vm.uuid, "node": node.uuid,
                                          "qos": qos.model_dump(exclude_none=True)})


async def _qos_set(ctx: FlowContext) -> None:
    async with _ctl(ctx).db.session() as session:
        vm = await session.get(VmRow, ctx.resource_uuid)
        if vm is not None:
            vm.qos = dict(ctx.data["qos"])
            vm.error = None


async def _qos_failed(ctx: FlowContext) -> None:
    async with _ctl(ctx).db.session() as session:
        vm = await session.get(VmRow, ctx.resource_uuid)
        if vm is not None:
            vm.error = f"set_qos failed: {ctx.error}"


# --- CD drive (F-ISO) ---------------------------------------------------------------------

#: flow data: the ISO to insert (its uuid), None to eject
CDROM_IMAGE = "cdrom_image"
# An ISO is fetched into the node's cache before it is inserted: allow for the copy.
CDROM_TIMEOUT = 600.0


class ChangeCdrom(Step):
    """Insert the ISO into the VM's CD drive on its node, or eject it (live when the VM
    runs, and in its definition), then record it. An eject of the CD a VM boots from
    switches its boot to its disk: an operator who installed from the ISO and ejected it
    expects the next boot from the installed disk."""

    name = "cdrom"
    retry_deadline = CDROM_TIMEOUT

    async def run(self, ctx: FlowContext) -> None:
        control = _ctl(ctx)
        image_uuid = ctx.data.get(CDROM_IMAGE)
        async with control.db.session() as session:
            vm = await _vm(session, ctx.resource_uuid)
            node = await session.get(NodeRow, vm.node_uuid) if vm.node_uuid else None
            if node is None:
                raise Unavailable(f"VM {vm.name} has no node")
            location = None
            if image_uuid is not None:
                iso = await session.get(ImageRow, image_uuid)
                if iso is None:
                    raise NotFound(f"image {image_uuid} no longer exists")
                location = image_location(control, iso)
            client = node_client(control, node)
        await client.change_cdrom(vm.uuid, CdromChange(image=location),
                                  request_id=f"{ctx.flow_uuid}:cdrom", timeout=CDROM_TIMEOUT)
        async with control.db.session() as session:
            vm = await _vm(session, ctx.resource_uuid)
            vm.cdrom_image_uuid = image_uuid
            if image_uuid is None and vm.boot == "cdrom":
                vm.boot = "disk"
                log.info("ISO ejected from the CD the VM booted from: it boots from its disk "
                         "from now on", extra={"vm": vm.uuid})
        log.info("VM's CD drive changed", extra={"vm": ctx.resource_uuid, "node": node.uuid,
                                                 "image": image_uuid})


class Redefine(Step):
    """After an eject, define the VM again on its node from its record (no power change),
    so its boot order follows ``vms.boot`` at its next start; the running guest goes on."""

    name = "redefine"

    async def run(self, ctx: FlowContext) -> None:
        if ctx.data.get(CDROM_IMAGE) is not None:
            return  # an insert leaves the boot order as it was
        control = _ctl(ctx)
        async with control.db.session() as session:
            vm, node, image, pool = await _build_rows(session, ctx.resource_uuid)
            request = await provision_request(control, session, vm, node, image, pool)
            client = node_client(control, node)
        request.start = False
        await client.provision(request, request_id=f"{ctx.flow_uuid}:redefine",
                               timeout=control.settings.create_timeout)


async def _cdrom_changed(ctx: FlowContext) -> None:
    async with _ctl(ctx).db.session() as session:
        vm = await session.get(VmRow, ctx.resource_uuid)
        if vm is not None:
            vm.error = None


async def _cdrom_failed(ctx: FlowContext) -> None:
    async with _ctl(ctx).db.session() as session:
        vm = await session.get(VmRow, ctx.resource_uuid)
        if vm is not None:
            vm.error = f"cdrom change failed: {ctx.error}"


def vm_flows() -> list[FlowDefinition]:
    return [
        FlowDefinition("vm.create", "vm",
                       [Schedule(), Address(), Provision(), Forwarders(), Confirm()],
                       on_success=_created, on_failure=_create_failed),
        FlowDefinition("vm.delete", "vm", [RemoveDomain(), ReleaseResources()],
                       on_failure=_delete_failed),
        FlowDefinition("vm.start", "vm", [PowerStep("start")],
                       on_success=_power_done(VmState.RUNNING),  # type: ignore[arg-type]
                       on_failure=_power_failed),
        FlowDefinition("vm.stop", "vm", [PowerStep("stop")],
                       on_success=_power_done(VmState.STOPPED),  # type: ignore[arg-type]
                       on_failure=_power_failed),
        FlowDefinition("vm.reboot", "vm", [PowerStep("reboot")],
                       on_success=_power_done(VmState.RUNNING),  # type: ignore[arg-type]
                       on_failure=_power_failed),
        FlowDefinition("vm.set_qos", "vm", [SetQos()], on_success=_qos_set,
                       on_failure=_qos_failed),
        FlowDefinition("vm.cdrom", "vm", [ChangeCdrom(), Redefine()],
                       on_success=_cdrom_changed, on_failure=_cdrom_failed),
    ]
