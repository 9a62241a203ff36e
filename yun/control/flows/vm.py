"""The flows of a VM's life: create, delete, start, stop, reboot (F-LIFE, Z-FLOW).

Create: schedule (reserve capacity on a node and an address on its NAT network, in
one transaction) → provision (the node fetches the image, makes the disk and NIC, defines
and starts the domain) → confirm (the node reports the domain running).
"""

from __future__ import annotations

import logging
import re
import uuid as uuidlib
from typing import TYPE_CHECKING

from sqlalchemy.ext.asyncio import AsyncSession

from yun.control.allocators import quotas
from yun.control.allocators.addresses import AddressAllocator
from yun.control.db.models import ImageRow, NodeRow, VmRow
from yun.control.db.tags import drop_tags
from yun.control.flows.engine import FlowContext, FlowDefinition, Step
from yun.control.nodeclient import node_client
from yun.control.scheduler.placement import Placement, Request
from yun.proto.components import ComponentType
from yun.proto.errors import Conflict, NotFound, Unavailable
from yun.proto.messages import (
    DiskSpec,
    DomainInfo,
    DomainSpec,
    DomainState,
    ImageLocation,
    NicSpec,
    ProvisionRequest,
    StopRequest,
)
from yun.proto.resources import VmState

if TYPE_CHECKING:  # the context holds the engine that runs these flows
    from yun.control.context import ControlContext

log = logging.getLogger("yun.control.vm")

ROOT_DISK = "root"


def hostname_for(name: str) -> str | None:
    """The VM's name as a DNS label for DHCP (None when nothing of it is usable)."""
    label = re.sub(r"[^a-z0-9-]+", "-", name.lower()).strip("-")[:63].rstrip("-")
    return label or None


def nic_id_for(vm_uuid: str, index: int = 0) -> str:
    return str(uuidlib.uuid5(uuidlib.UUID(vm_uuid), f"nic{index}"))


def _ctl(ctx: FlowContext) -> ControlContext:
    return ctx.services  # type: ignore[no-any-return]


async def _vm(session: AsyncSession, vm_uuid: str) -> VmRow:
    vm = await session.get(VmRow, vm_uuid)
    if vm is None:
        raise NotFound(f"VM {vm_uuid} no longer exists")
    return vm


async def _vm_and_node(ctx: FlowContext) -> tuple[VmRow | None, NodeRow | None]:
    """The flow's VM and the node it is placed on (either may be gone)."""
    async with _ctl(ctx).db.session() as session:
        vm = await session.get(VmRow, ctx.resource_uuid)
        node = await session.get(NodeRow, vm.node_uuid) if vm and vm.node_uuid else None
        return vm, node


class Schedule(Step):
    name = "schedule"

    async def run(self, ctx: FlowContext) -> None:
        control = _ctl(ctx)
        async with control.db.session() as session:
            vm = await _vm(session, ctx.resource_uuid)
            req = Request(vm.vcpus, vm.memory_mb, vm.disk_gb)
        node = await control.placement.place(ctx.resource_uuid, req)
        log.info("VM placed", extra={"vm": ctx.resource_uuid, "node": node.uuid,
                                     "node_name": node.name})

    async def rollback(self, ctx: FlowContext) -> None:
        control = _ctl(ctx)
        async with control.db.session() as session:
            await AddressAllocator.release(session, ctx.resource_uuid)
            vm = await session.get(VmRow, ctx.resource_uuid)
            if vm is None:
                return
            vm.ip = None
            if vm.node_uuid:
                await Placement.release(session, vm.node_uuid,
                                        Request(vm.vcpus, vm.memory_mb, vm.disk_gb))
                vm.node_uuid = None


async def provision_request(control: ControlContext, vm: VmRow, image: ImageRow
                            ) -> ProvisionRequest:
    storage_url = image.storage_url or ""
    peer = control.membership.peers.get(image.storage_uuid or "")
    if peer is not None and peer.type == ComponentType.STORAGE:
        storage_url = peer.url  # the storage server may have moved since the upload
    if not storage_url or not image.sha256 or not image.format:
        raise Conflict(f"image {image.name} is not ready")
    assert vm.ip and vm.mac
    spec = DomainSpec(
        uuid=vm.uuid, name=vm.name, vcpus=vm.vcpus, memory_mb=vm.memory_mb,
        disks=[DiskSpec(disk_id=ROOT_DISK, size_gb=vm.disk_gb, image_id=image.uuid,
                        image_sha256=image.sha256, image_format=image.format)],
        nics=[NicSpec(nic_id=nic_id_for(vm.uuid), mac=vm.mac, ip=vm.ip,
                      hostname=hostname_for(vm.name))],
    )
    location = ImageLocation(
        image_id=image.uuid, url=f"{storage_url.rstrip('/')}/internal/v1/images/{image.uuid}/data",
        sha256=image.sha256, size=image.size or 0, format=image.format,
    )
    return ProvisionRequest(spec=spec, images=[location], start=True)


class Provision(Step):
    name = "provision"

    async def run(self, ctx: FlowContext) -> None:
        control = _ctl(ctx)
        async with control.db.session() as session:
            vm = await _vm(session, ctx.resource_uuid)
            node = await session.get(NodeRow, vm.node_uuid)
            image = await session.get(ImageRow, vm.image_uuid)
            if node is None or image is None:
                raise NotFound("the VM's node or image vanished")
            request = await provision_request(control, vm, image)
            client = node_client(control, node)
        await client.request("PUT", f"/internal/v1/domains/{vm.uuid}", body=request,
                             request_id=f"{ctx.flow_uuid}:provision",
                             timeout=control.settings.create_timeout)

    async def rollback(self, ctx: FlowContext) -> None:
        control = _ctl(ctx)
        _, node = await _vm_and_node(ctx)
        if node is None:
            return
        # Raises when the node is unreachable: the journal then says rollback_failed, and
        # reconciliation removes the domain once the node reports it.
        await remove_from_node(control, node, ctx, "unprovision")


async def remove_from_node(control: ControlContext, node: NodeRow, ctx: FlowContext,
                           why: str) -> None:
    """Have the node remove the VM's domain, disks and leases (idempotent on the node)."""
    await node_client(control, node).request(
        "DELETE", f"/internal/v1/domains/{ctx.resource_uuid}",
        request_id=f"{ctx.flow_uuid}:{why}", timeout=180)


class Confirm(Step):
    name = "confirm"

    async def run(self, ctx: FlowContext) -> None:
        control = _ctl(ctx)
        vm, node = await _vm_and_node(ctx)
        if vm is None or node is None:
            raise NotFound("the VM or its node vanished")
        data = await node_client(control, node).request(
            "GET", f"/internal/v1/domains/{vm.uuid}", timeout=30)
        info = DomainInfo.model_validate(data)
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
    await _set_state(ctx, VmState.RUNNING, None, DomainState.RUNNING)


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
            # The node's own reconciliation removes the domain when it comes back: it
            # reports a domain that no VM owns.
            log.warning("deleting a VM whose node is down", extra={"vm": vm.uuid,
                                                                  "node": node.uuid})
            return
        await remove_from_node(control, node, ctx, "delete")


class ReleaseResources(Step):
    name = "release"

    async def run(self, ctx: FlowContext) -> None:
        async with _ctl(ctx).db.session() as session:
            vm = await _vm(session, ctx.resource_uuid)
            await AddressAllocator.release(session, vm.uuid)
            if vm.node_uuid:
                await Placement.release(session, vm.node_uuid,
                                        Request(vm.vcpus, vm.memory_mb, vm.disk_gb))
            await quotas.release(session, vm.project_uuid,
                                 quotas.vm_amounts(vm.vcpus, vm.memory_mb, vm.disk_gb))
            await drop_tags(session, vm.uuid)
            await session.delete(vm)
        log.info("VM deleted", extra={"vm": ctx.resource_uuid})


async def _delete_failed(ctx: FlowContext) -> None:
    await _set_state(ctx, VmState.ERROR, f"delete failed: {ctx.error}")


# --- power -------------------------------------------------------------------------------


class PowerStep(Step):
    """Ask the VM's node to start, stop or reboot the domain."""

    def __init__(self, action: str) -> None:
        self.name = action
        self.action = action

    async def run(self, ctx: FlowContext) -> None:
        control = _ctl(ctx)
        vm, node = await _vm_and_node(ctx)
        if vm is None:
            raise NotFound(f"VM {ctx.resource_uuid} no longer exists")
        if node is None:
            raise Unavailable(f"VM {vm.name} has no node")
        body = StopRequest.model_validate(ctx.data["stop"]) if self.action == "stop" else None
        timeout = (body.timeout + 30) if body is not None else 120
        data = await node_client(control, node).request(
            "POST", f"/internal/v1/domains/{vm.uuid}/{self.action}", body=body,
            request_id=f"{ctx.flow_uuid}:{self.action}", timeout=timeout)
        ctx.data["power"] = DomainInfo.model_validate(data).state


def _power_done(state: VmState) -> object:
    async def hook(ctx: FlowContext) -> None:
        await _set_state(ctx, state, None, ctx.data.get("power"))
    return hook


async def _power_failed(ctx: FlowContext) -> None:
    previous = VmState(ctx.data.get("previous_state", VmState.UNKNOWN))
    await _set_state(ctx, previous, f"{ctx.kind.split('.')[-1]} failed: {ctx.error}")


def vm_flows() -> list[FlowDefinition]:
    return [
        FlowDefinition("vm.create", "vm", [Schedule(), Provision(), Confirm()],
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
    ]
