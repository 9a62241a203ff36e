"""Host images (F-IMAGE): a VM's disk turned into a new image kept by a storage server.

The flow ``image.capture`` runs on the VM (its resource), so the VM's queue is held and
no other flow of the VM (delete, stop, start, a CD change, later a migration) runs
meanwhile; the one-unfinished-flow index answers those a 409 naming the capture. Its
data names the new image (recorded ``uploading`` by the request, its quota claimed),
the volume to copy and the storage server chosen for it.

One step, ``export``: the VM's node copies the volume — live through the hypervisor
when the VM runs (a point-in-time copy while the guest goes on writing), with
``qemu-img convert`` when it is stopped; either way a flattened qcow2 with no backing
file — and uploads the copy to the storage server itself with its node credentials.
The storage server checks and checksums it as any upload and tells the control server,
which marks the image ``active``. A repeated step first asks the storage server
whether the image is already stored (a live copy made again would differ from the one
stored), so a retry never uploads twice.

On failure the image is removed: its record, tags and quota, and what the storage
server holds of it (best effort: a storage server that cannot be reached keeps the
partial bytes of an upload that never completed); the task's error says why.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from sqlalchemy import select

from yun.control.allocators import quotas
from yun.control.db.models import ImageRow, NodeRow, VmRow, VolumeRow
from yun.control.db.tags import drop_tags
from yun.control.flows.engine import FlowContext, FlowDefinition, PermanentError, Step
from yun.control.nodeclient import node_client
from yun.proto.components import ComponentType
from yun.proto.errors import NotFound, PeerError, YunError
from yun.proto.identity import QuotaResource
from yun.proto.messages import StorageImageReport, VolumeExport
from yun.proto.resources import ImageStatus, VmState

if TYPE_CHECKING:
    from yun.control.context import ControlContext

log = logging.getLogger("yun.control.image_capture")

KIND = "image.capture"
# Keys of the flow's data.
IMAGE = "image"
VOLUME = "volume"
DISK_ID = "disk_id"
# A VM whose disk may be copied: running (a live copy) or stopped.
CAPTURABLE = (VmState.RUNNING, VmState.STOPPED)
# How long a node may take to copy and upload one disk (a 100 GiB disk on a slow host).
EXPORT_TIMEOUT = 6 * 3600.0


def _ctl(ctx: FlowContext) -> ControlContext:
    return ctx.services  # type: ignore[no-any-return]


def storage_client(control: ControlContext, image: ImageRow) -> tuple[str, Any]:
    """The URL and client of the storage server keeping ``image`` (its current address
    when it is a member now, else the one recorded)."""
    peer = control.membership.peers.get(image.storage_uuid or "")
    if peer is not None and peer.type == ComponentType.STORAGE:
        return peer.url, control.membership.client(peer)
    url = image.storage_url or ""
    return url, control.membership.client_for_url(url)


async def mark_stored(control: ControlContext, report: StorageImageReport) -> bool:
    """Record what the storage server stored: the image becomes ``active`` (as its own
    announcement does; doing it again changes nothing). False when the image is gone
    or being deleted."""
    async with control.db.session() as session:
        row = await session.get(ImageRow, report.image_id)
        if row is None or row.status == ImageStatus.DELETING:
            return False
        row.status = ImageStatus.ACTIVE
        row.size, row.sha256 = report.size, report.sha256
        row.format, row.virtual_size = report.format, report.virtual_size
        row.source_format, row.error = report.source_format, None
    return True


async def _already_stored(control: ControlContext, image: ImageRow
                          ) -> StorageImageReport | None:
    """The storage server's record of ``image`` when it holds it whole, else None. An
    unreachable storage server raises (a temporary error: the step is retried)."""
    _url, client = storage_client(control, image)
    try:
        data = await client.request("GET", f"/internal/v1/images/{image.uuid}", timeout=30)
    except NotFound:
        return None
    except PeerError as exc:
        if exc.peer_status == 404:
            return None
        raise
    return StorageImageReport(
        image_id=image.uuid, size=data["size"], sha256=data["sha256"], format=data["format"],
        virtual_size=data["virtual_size"], source_format=data.get("source_format"))


class ExportVolume(Step):
    """The VM's node copies the volume and uploads it to the storage server."""

    name = "export"
    # Temporary failures (the storage server or the node briefly unreachable) are
    # retried this long; tests shorten it.
    retry_deadline: float | None = 60.0

    async def run(self, ctx: FlowContext) -> None:
        control = _ctl(ctx)
        image_uuid, volume_uuid = ctx.data[IMAGE], ctx.data[VOLUME]
        async with control.db.session() as session:
            image = await session.get(ImageRow, image_uuid)
            if image is None or image.status == ImageStatus.DELETING:
                raise PermanentError(f"image {image_uuid} was deleted during its capture")
            if image.status == ImageStatus.ACTIVE:
                return  # a repeated step after the image was stored
            vm = await session.get(VmRow, ctx.resource_uuid)
            if vm is None:
                raise PermanentError(f"VM {ctx.resource_uuid} no longer exists")
            if vm.state not in CAPTURABLE:
                raise PermanentError(f"VM {vm.name} is {vm.state}: a disk is copied from a "
                                     "running or stopped VM only")
            volume = await session.get(VolumeRow, volume_uuid)
            if volume is None or volume.vm_uuid != vm.uuid:
                raise PermanentError(f"volume {volume_uuid} is no longer a disk of VM "
                                     f"{vm.name}")
            node = await session.get(NodeRow, volume.node_uuid or vm.node_uuid or "")
            if node is None:
                raise PermanentError(f"volume {volume.name} is on no node")
            client = node_client(control, node)  # 503 while the node is down: retried
            live = vm.state == VmState.RUNNING
            vm_name, disk_id = vm.name, volume.disk_id
        stored = await _already_stored(control, image)
        if stored is not None:
            await mark_stored(control, stored)
            return
        storage_url, _client = storage_client(control, image)
        req = VolumeExport(image_id=image_uuid, storage_url=storage_url, vm_uuid=vm.uuid,
                           disk_id=disk_id, live=live, name=image.name)
        log.info("capturing a VM's disk as an image", extra={
            "vm": vm.uuid, "vm_name": vm_name, "volume": volume_uuid, "image": image_uuid,
            "node": node.name, "live": live, "storage": storage_url})
        try:
            report = await client.export_volume(
                volume_uuid, req, request_id=f"{ctx.flow_uuid}:export", timeout=EXPORT_TIMEOUT)
        except YunError:
            # The node's answer may be lost after the storage server stored the copy.
            async with control.db.session() as session:
                again = await session.get(ImageRow, image_uuid)
                if again is not None and again.status == ImageStatus.ACTIVE:
                    return
            raise
        if not await mark_stored(control, report):
            raise PermanentError(f"image {image_uuid} was deleted during its capture")
        log.info("VM's disk captured as an image", extra={
            "vm": vm.uuid, "image": image_uuid, "size": report.size,
            "sha256": report.sha256, "live": live})

    async def rollback(self, ctx: FlowContext) -> None:
        await discard_image(_ctl(ctx), ctx.data[IMAGE], ctx.error)


async def discard_image(control: ControlContext, image_uuid: str, reason: str | None) -> None:
    """Remove an image whose capture failed: what the storage server holds of it (best
    effort), then its record, tags and quota. An image that was stored whole
    (``active``) is kept: it is complete."""
    async with control.db.session() as session:
        image = await session.get(ImageRow, image_uuid)
        if image is None or image.status == ImageStatus.ACTIVE:
            return
        _url, client = storage_client(control, image)
    try:
        await client.request("DELETE", f"/internal/v1/images/{image_uuid}", timeout=30)
    except YunError as exc:
        log.warning("bytes of a failed image capture not removed from the storage server: "
                    "%s", exc, extra={"image": image_uuid})
    async with control.db.session() as session:
        image = (await session.scalars(select(ImageRow).where(
            ImageRow.uuid == image_uuid).with_for_update())).first()
        if image is None or image.status == ImageStatus.ACTIVE:
            return
        await quotas.release(session, image.project_uuid, {QuotaResource.IMAGES: 1})
        await drop_tags(session, image.uuid)
        await session.delete(image)
    log.warning("image capture failed; image removed", extra={
        "image": image_uuid, "reason": reason})


def image_capture_flows() -> list[FlowDefinition]:
    """The flow that makes an image of a VM's disk (runs on the VM)."""
    return [FlowDefinition(KIND, "vm", [ExportVolume()])]
