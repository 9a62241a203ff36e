"""Virtual machines: the requests the API makes of the control server (F-VM, F-LIFE)."""

from __future__ import annotations

import uuid as uuidlib
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from yun.control.context import ControlContext
from yun.control.db.models import FlowRow, ImageRow, NodeRow, VmRow
from yun.control.flows.engine import UNFINISHED
from yun.control.services.common import find
from yun.control.services.nodes import node_client
from yun.control.services.tasks import task_model
from yun.proto.errors import Conflict, Unprocessable
from yun.proto.messages import DomainInfo, StopRequest
from yun.proto.resources import Accepted, Console, ImageStatus, Vm, VmCreate, VmState, VmStop

ACTIONS_ALLOWED: dict[str, set[VmState]] = {
    "start": {VmState.STOPPED, VmState.RUNNING, VmState.ERROR, VmState.UNKNOWN},
    "stop": {VmState.RUNNING, VmState.STOPPED, VmState.ERROR, VmState.UNKNOWN},
    "reboot": {VmState.RUNNING},
}
TRANSIENT = {"start": VmState.STARTING, "stop": VmState.STOPPING, "reboot": VmState.REBOOTING}


def vm_model(row: VmRow, node_name: str | None = None) -> Vm:
    vm = Vm.model_validate(row)
    vm.node_name = node_name
    return vm


async def vm_with_node(session: AsyncSession, row: VmRow) -> Vm:
    node = await session.get(NodeRow, row.node_uuid) if row.node_uuid else None
    return vm_model(row, node.name if node else None)


class VmService:
    def __init__(self, ctx: ControlContext) -> None:
        self.ctx = ctx

    async def create(self, req: VmCreate) -> Accepted:
        async with self.ctx.db.session() as session:
            image = await find(session, ImageRow, req.image, "image")
            if image.status != ImageStatus.ACTIVE:
                raise Conflict(f"image {image.name} is {image.status}, not active")
            if image.format == "iso":
                raise Unprocessable(f"image {image.name} is an ISO; a VM boots from a disk image")
            vm = VmRow(
                uuid=str(uuidlib.uuid4()), name=req.name, description=req.description,
                tags=req.tags, project=req.project, state=VmState.BUILDING, vcpus=req.vcpus,
                memory_mb=req.memory_mb, disk_gb=req.disk_gb, image_uuid=image.uuid,
            )
            if image.virtual_size and image.virtual_size > req.disk_gb * 1024**3:
                raise Unprocessable(
                    f"disk_gb={req.disk_gb} is smaller than image {image.name} "
                    f"({image.virtual_size / 1024**3:.1f} GiB)")
            session.add(vm)
            flow = self.ctx.engine.new_flow(session, "vm.create", vm.uuid, {})
            vm.task_uuid = flow.uuid
            await session.flush()
            accepted = Accepted(task=task_model(flow), resource=vm_model(vm).model_dump(
                mode="json"))
        self.ctx.engine.launch(flow.uuid, vm.uuid)
        return accepted

    async def get(self, ref: str) -> Vm:
        async with self.ctx.db.session() as session:
            return await vm_with_node(session, await find(session, VmRow, ref, "VM"))

    async def action(self, ref: str, action: str, stop: VmStop | None = None) -> Accepted:
        """Start, stop or reboot; repeating a request for the state already reached is harmless."""
        data: dict[str, Any] = {}
        if action == "stop":
            data["stop"] = StopRequest(**(stop or VmStop()).model_dump()).model_dump()
        return await self._launch(ref, f"vm.{action}", ACTIONS_ALLOWED[action],
                                  TRANSIENT[action], data)

    async def delete(self, ref: str) -> Accepted:
        """Delete the VM with its domain, disks, address and reservation."""
        return await self._launch(ref, "vm.delete", None, VmState.DELETING, {})

    async def _launch(self, ref: str, kind: str, allowed: set[VmState] | None,
                      transient: VmState, data: dict[str, Any]) -> Accepted:
        """Start flow ``kind`` on the VM, or answer the same task if it already runs one."""
        async with self.ctx.db.session() as session:
            vm = await find(session, VmRow, ref, "VM")
            running = await self._running_task(session, vm.uuid)
            if running is not None:
                if running.kind == kind:  # a repeated request: the same answer (U-IDEMP)
                    return Accepted(task=task_model(running),
                                    resource=vm_model(vm).model_dump(mode="json"))
                raise Conflict(f"VM {vm.name} is busy with task {running.uuid} ({running.kind})")
            if allowed is not None and vm.state not in allowed:
                raise Conflict(f"cannot {kind.split('.')[1]} VM {vm.name} while it is {vm.state}")
            flow = self.ctx.engine.new_flow(session, kind, vm.uuid,
                                            {"previous_state": vm.state, **data})
            vm.state = transient
            vm.task_uuid = flow.uuid
            await session.flush()
            accepted = Accepted(task=task_model(flow), resource=vm_model(vm).model_dump(
                mode="json"))
        self.ctx.engine.launch(flow.uuid, vm.uuid)
        return accepted

    async def console_log(self, ref: str, max_bytes: int) -> str:
        vm, node = await self._placed(ref)
        data = await node_client(self.ctx, node).request(
            "GET", f"/internal/v1/domains/{vm.uuid}/console-log",
            params={"max_bytes": max_bytes})
        return str(data["text"])

    async def console(self, ref: str) -> Console:
        vm, node = await self._placed(ref)
        data = await node_client(self.ctx, node).request(
            "GET", f"/internal/v1/domains/{vm.uuid}/console")
        host = data.get("vnc_host")
        if host in (None, "0.0.0.0", "::"):
            # The display listens on every address of the node: name the node's address.
            host = node.url.split("//", 1)[-1].rsplit(":", 1)[0]
        return Console(vm_uuid=vm.uuid, node_name=node.name, vnc_host=host,
                       vnc_port=data.get("vnc_port"), serial_log=data.get("serial_log"))

    async def domain(self, ref: str) -> DomainInfo:
        vm, node = await self._placed(ref)
        data = await node_client(self.ctx, node).request("GET", f"/internal/v1/domains/{vm.uuid}")
        return DomainInfo.model_validate(data)

    async def _placed(self, ref: str) -> tuple[VmRow, NodeRow]:
        async with self.ctx.db.session() as session:
            vm = await find(session, VmRow, ref, "VM")
            node = await session.get(NodeRow, vm.node_uuid) if vm.node_uuid else None
            if node is None:
                raise Conflict(f"VM {vm.name} is not placed on a node")
            return vm, node

    @staticmethod
    async def _running_task(session: AsyncSession, vm_uuid: str) -> FlowRow | None:
        return (await session.scalars(
            select(FlowRow).where(FlowRow.resource_uuid == vm_uuid)
            .where(FlowRow.state.in_(UNFINISHED)).limit(1))).first()
