"""Cascading deletes (Z-CASCADE): a project or an image deleted with its children, each
child through its own flow, so nothing is orphaned and nothing is removed twice.

A cascade cannot be undone: its rollback does nothing, and a failed cascade leaves the
parent in place with the children it could not delete, its error naming them.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from sqlalchemy import select

from yun.control.allocators import quotas
from yun.control.db.models import FlowRow, ImageRow, ProjectRow, VmRow
from yun.control.db.tags import drop_tags
from yun.control.flows.engine import UNFINISHED, FlowContext, FlowDefinition, Step
from yun.proto.errors import Conflict, Unavailable, YunError
from yun.proto.identity import QuotaResource
from yun.proto.resources import ImageStatus, VmState

log = logging.getLogger("yun.control.cascade")

ROUNDS = 3
VM_DELETE_TIMEOUT = 600.0


def _control(ctx: FlowContext) -> Any:
    return ctx.services


async def start_vm_delete(control: Any, vm_uuid: str) -> str | None:
    """Start the delete flow of a VM (or find the flow it is busy with); None if it is gone."""
    for _ in range(ROUNDS):
        try:
            async with control.db.session() as session:
                vm = await session.get(VmRow, vm_uuid)
                if vm is None:
                    return None
                running = (await session.scalars(select(FlowRow).where(
                    FlowRow.resource_uuid == vm_uuid, FlowRow.state.in_(UNFINISHED)
                ).limit(1))).first()
                if running is not None:
                    return running.uuid  # type: ignore[no-any-return]
                flow = await control.engine.add_flow(
                    session, "vm.delete", vm.uuid, {"previous_state": vm.state},
                    project_uuid=vm.project_uuid, what=f"VM {vm.name}")
                vm.state, vm.task_uuid = VmState.DELETING, flow.uuid
        except Conflict:
            # Another request started a flow on this VM between the look and the insert
            # (the database's one-unfinished-flow index refused ours): wait for that one.
            continue
        control.engine.launch(flow.uuid, vm_uuid)
        return flow.uuid  # type: ignore[no-any-return]
    raise Conflict(f"VM {vm_uuid} stayed busy with other tasks; retry the delete")


async def _wait_flows(control: Any, flow_uuids: list[str], timeout: float) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    for flow_uuid in flow_uuids:
        while True:
            left = deadline - asyncio.get_running_loop().time()
            await control.engine.wait(flow_uuid, max(0.0, min(left, 5.0)))
            async with control.db.session() as session:
                row = await session.get(FlowRow, flow_uuid)
                if row is None or row.state not in UNFINISHED:
                    break
            if left <= 0:
                raise Unavailable(f"task {flow_uuid} did not end within {timeout:.0f} s")
            await asyncio.sleep(0.2)


async def delete_vms(control: Any, where: Any, what: str) -> None:
    """Delete every VM matching ``where`` through its delete flow; raise naming those left."""
    for _ in range(ROUNDS):
        async with control.db.session() as session:
            vm_uuids = list((await session.scalars(select(VmRow.uuid).where(where))).all())
        if not vm_uuids:
            return
        flows = [f for f in await asyncio.gather(*(start_vm_delete(control, u)
                                                   for u in vm_uuids)) if f]
        await _wait_flows(control, flows, VM_DELETE_TIMEOUT)
    async with control.db.session() as session:
        left = (await session.execute(select(VmRow.name, VmRow.error).where(where))).all()
    if left:
        shown = "; ".join(f"{n}: {e or 'not deleted'}" for n, e in left[:10])
        raise Conflict(f"{len(left)} VM(s) of {what} could not be deleted ({shown})")


async def remove_image(control: Any, image_uuid: str) -> None:
    """Delete an image: its record first made unusable, then its bytes on its storage
    server, then the record, tags and quota.

    Marking the record first means no create can pick an image whose bytes are going
    (creates and the provision step require an ``active`` image). If the bytes cannot
    be removed the image stays ``deleting`` with the reason, and deleting it again
    retries.
    """
    async with control.db.session() as session:
        row = await session.get(ImageRow, image_uuid)
        if row is None:
            return
        storage_uuid, storage_url = row.storage_uuid, row.storage_url
        previous = row.status
        row.status, row.error = ImageStatus.DELETING, None
    async with control.db.session() as session:
        # A create that read the image as active just before the mark may have recorded
        # its VM since: then the image stays.
        user = (await session.scalars(select(VmRow.name).where(
            VmRow.image_uuid == image_uuid).limit(1))).first()
        if user is not None:
            row = await session.get(ImageRow, image_uuid)
            if row is not None and row.status == ImageStatus.DELETING:
                row.status = previous
            raise Conflict(f"image {image_uuid} is used by VM {user}; delete it first")
    if storage_url:
        peer = control.membership.peers.get(storage_uuid or "")
        client = (control.membership.client(peer) if peer is not None
                  else control.membership.client_for_url(storage_url))
        try:
            await client.request("DELETE", f"/internal/v1/images/{image_uuid}")
        except YunError as exc:
            async with control.db.session() as session:
                row = await session.get(ImageRow, image_uuid)
                if row is not None:
                    row.error = f"its bytes could not be deleted: {exc}"
            raise Unavailable(f"storage server could not delete image {image_uuid}: "
                              f"{exc}") from exc
    async with control.db.session() as session:
        row = await session.get(ImageRow, image_uuid)
        if row is not None:
            await quotas.release(session, row.project_uuid, {QuotaResource.IMAGES: 1})
            await drop_tags(session, row.uuid)
            await session.delete(row)
    log.info("image deleted", extra={"image": image_uuid})


class DeleteProjectVms(Step):
    name = "delete_vms"

    async def run(self, ctx: FlowContext) -> None:
        await delete_vms(_control(ctx), VmRow.project_uuid == ctx.resource_uuid,
                         f"project {ctx.resource_uuid}")


class DeleteProjectImages(Step):
    name = "delete_images"

    async def run(self, ctx: FlowContext) -> None:
        control = _control(ctx)
        async with control.db.session() as session:
            images = (await session.scalars(select(ImageRow.uuid).where(
                ImageRow.project_uuid == ctx.resource_uuid))).all()
            users = (await session.execute(select(VmRow.name, ImageRow.name).join(
                ImageRow, VmRow.image_uuid == ImageRow.uuid).where(
                ImageRow.project_uuid == ctx.resource_uuid).limit(10))).all()
        if users:
            shown = ", ".join(f"{vm} (image {image})" for vm, image in users)
            raise Conflict(f"images of the project are used by VMs of other projects: {shown}")
        for image_uuid in images:
            await remove_image(control, image_uuid)


class DeleteProject(Step):
    name = "delete_project"

    async def run(self, ctx: FlowContext) -> None:
        async with _control(ctx).db.session() as session:
            row = await session.get(ProjectRow, ctx.resource_uuid)
            if row is not None:
                await drop_tags(session, row.uuid)
                await session.delete(row)
        log.info("project deleted with cascade", extra={"project": ctx.resource_uuid})


class DeleteImageVms(Step):
    name = "delete_vms"

    async def run(self, ctx: FlowContext) -> None:
        await delete_vms(_control(ctx), VmRow.image_uuid == ctx.resource_uuid,
                         f"image {ctx.resource_uuid}")


class DeleteImage(Step):
    name = "delete_image"

    async def run(self, ctx: FlowContext) -> None:
        await remove_image(_control(ctx), ctx.resource_uuid)


def cascade_flows() -> list[FlowDefinition]:
    return [
        FlowDefinition("project.delete", "project",
                       [DeleteProjectVms(), DeleteProjectImages(), DeleteProject()]),
        FlowDefinition("image.delete", "image", [DeleteImageVms(), DeleteImage()]),
    ]
