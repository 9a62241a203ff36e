"""Images: records kept by the control server, bytes kept by storage servers (F-IMAGE, C-STO)."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import uuid as uuidlib
from datetime import timedelta

from sqlalchemy import or_, select, update
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
    ImageRow,
    NodeRow,
    ProjectRow,
    VmRow,
    VolumeRow,
    utcnow,
)
from yun.control.db.tags import tags_of, update_tags
from yun.control.flows.cascade import remove_image
from yun.control.flows.engine import UNFINISHED
from yun.control.flows.image_capture import CAPTURABLE, DISK_ID, IMAGE, KIND, VOLUME
from yun.control.flows.volumes import vm_volumes
from yun.control.services.common import find
from yun.control.services.tasks import task_model
from yun.proto.components import ComponentType
from yun.proto.context import RequestContext
from yun.proto.errors import Conflict, Forbidden, NotFound, Unavailable, Unprocessable, YunError
from yun.proto.identity import QuotaResource
from yun.proto.messages import StorageImageReport
from yun.proto.resources import (
    Accepted,
    Image,
    ImageCreate,
    ImageFromVm,
    ImageStatus,
    ImageUpdate,
    ImageUploadTicket,
    ImageVisibility,
    VolumeKind,
)

log = logging.getLogger("yun.control.images")
IMAGE_QUOTA = {QuotaResource.IMAGES: 1}


def image_model(row: ImageRow, tags: dict[str, str] | None = None) -> Image:
    image = Image.model_validate(row)
    image.tags = tags or {}
    return image


async def image_models(session: AsyncSession, rows: list[ImageRow]) -> list[Image]:
    tags = await tags_of(session, [r.uuid for r in rows])
    return [image_model(r, tags.get(r.uuid)) for r in rows]


def upload_key(user: RequestContext, key: str) -> str:
    """An Idempotency-Key as stored with the image: scoped to its user."""
    return hashlib.sha256(f"{user.user_uuid}\0{key}".encode()).hexdigest()


class ImageService:
    def __init__(self, ctx: ControlContext) -> None:
        self.ctx = ctx

    async def create(self, req: ImageCreate, user: RequestContext,
                     idempotency_key: str | None) -> ImageUploadTicket:
        """Record an image about to be uploaded and choose the storage server that keeps it.

        A keyed upload that already stored its image answers that image (``existing``), so
        a client retrying after a lost answer does not make a second one."""
        require_project_write(user, "upload images")
        if req.visibility is ImageVisibility.PUBLIC and not user.is_super_admin:
            raise Forbidden("only a super admin may make an image public")
        key = upload_key(user, idempotency_key) if idempotency_key else None
        if idempotency_key is not None and not 1 <= len(idempotency_key) <= 255:
            raise Unprocessable("Idempotency-Key must have 1 to 255 characters")
        storages = self.ctx.membership.peers_of(ComponentType.STORAGE)
        if not storages:
            raise Unavailable("no storage server has joined the domain")
        storage = storages[0]
        if key is not None:
            existing = await self._keyed(key)
            if existing is not None:
                return existing
        try:
            async with self.ctx.db.session() as session:
                project = await session.get(ProjectRow, user.project_uuid)
                if project is None:
                    raise Unprocessable(f"project {user.project_name} no longer exists")
                await quotas.claim(session, project, IMAGE_QUOTA)
                row = ImageRow(
                    uuid=str(uuidlib.uuid4()), name=req.name, description=req.description,
                    project_uuid=project.uuid, visibility=req.visibility.value,
                    upload_key=key, status=ImageStatus.UPLOADING,
                    declared_format=req.format.value if req.format else None,
                    expected_sha256=req.sha256, protected=False,
                    storage_uuid=storage.component_id, storage_url=storage.url,
                )
                session.add(row)
                tags = await update_tags(session, "image", row.uuid, req.tags) if req.tags \
                    else {}
                await session.flush()
                image = image_model(row, tags)
        except IntegrityError:
            # Two uploads with one key at once: the other one made the record.
            existing = await self._keyed(key) if key else None
            if existing is None:
                raise
            return existing
        log.info("image upload started", extra={"image": image.uuid, "image_name": req.name,
                                                 "project": image.project_uuid,
                                                 "storage": storage.component_id})
        return ImageUploadTicket(image=image, storage_url=storage.url)

    async def from_vm(self, req: ImageFromVm, user: RequestContext, scope: Scope) -> Accepted:
        """Start making image ``req.name`` of a VM's disk (F-IMAGE): the image is recorded
        ``uploading`` in the user's project (its quota claimed) and the VM's capture
        task started; the image becomes ``active`` when the storage server has the copy.

        The VM must be running (a live copy) or stopped, with no other task under way
        (409 naming its state or task); the user needs write access to the project and
        read access to the VM (another project's VM is a 404)."""
        require_project_write(user, "make images")
        if req.visibility is ImageVisibility.PUBLIC and not user.is_super_admin:
            raise Forbidden("only a super admin may make an image public")
        storages = self.ctx.membership.peers_of(ComponentType.STORAGE)
        if not storages:
            raise Unavailable("no storage server has joined the domain: the image has "
                              "nowhere to go")
        storage = storages[0]
        async with self.ctx.db.session() as session:
            vm = await find(session, VmRow, req.vm, "VM", scope)
            require_in_project(scope.context, Permission.READ, vm.project_uuid,
                               what=f"copy the disks of VM {vm.name}")
            busy = (await session.scalars(select(FlowRow).where(
                FlowRow.resource_uuid == vm.uuid, FlowRow.state.in_(UNFINISHED))
                .limit(1))).first()
            if busy is not None:
                raise Conflict(f"VM {vm.name} is busy with task {busy.uuid} ({busy.kind}); "
                               "make the image when it has finished")
            if vm.state not in CAPTURABLE:
                raise Conflict(f"VM {vm.name} is {vm.state}: an image is made of a running "
                               "or stopped VM only")
            volume = await _capture_volume(session, vm, req.disk)
            if volume.node_uuid is None or await session.get(NodeRow, volume.node_uuid) \
                    is None:
                raise Conflict(f"disk {volume.disk_id} of VM {vm.name} is on no node yet")
            project = await session.get(ProjectRow, user.project_uuid)
            if project is None:
                raise Unprocessable(f"project {user.project_name} no longer exists")
            await quotas.claim(session, project, IMAGE_QUOTA)
            description = req.description or f"made of disk {volume.disk_id} of VM {vm.name}"
            row = ImageRow(
                uuid=str(uuidlib.uuid4()), name=req.name, description=description,
                project_uuid=project.uuid, visibility=req.visibility.value,
                status=ImageStatus.UPLOADING, declared_format="qcow2", protected=False,
                storage_uuid=storage.component_id, storage_url=storage.url,
            )
            session.add(row)
            tags = await update_tags(session, "image", row.uuid, req.tags) if req.tags else {}
            flow = await self.ctx.engine.add_flow(
                session, KIND, vm.uuid,
                {IMAGE: row.uuid, VOLUME: volume.uuid, DISK_ID: volume.disk_id},
                project_uuid=project.uuid, what=f"VM {vm.name}")
            image = image_model(row, tags)
            accepted = Accepted(task=task_model(flow), resource=image.model_dump(mode="json"))
        self.ctx.engine.launch(flow.uuid, vm.uuid)
        log.info("image capture started", extra={
            "image": image.uuid, "image_name": req.name, "vm": vm.uuid, "volume": volume.uuid,
            "state": vm.state, "project": image.project_uuid, "storage": storage.component_id,
            "task": flow.uuid})
        return accepted

    async def _keyed(self, key: str) -> ImageUploadTicket | None:
        async with self.ctx.db.session() as session:
            row = (await session.scalars(select(ImageRow).where(
                ImageRow.upload_key == key))).first()
            if row is None:
                return None
            if row.status == ImageStatus.UPLOADING:
                raise Conflict(f"image {row.name} is still being uploaded with this "
                               "Idempotency-Key; retry when that upload has ended")
            if row.status != ImageStatus.ACTIVE:
                return None
            image = (await image_models(session, [row]))[0]
            return ImageUploadTicket(image=image, storage_url=row.storage_url or "",
                                     existing=True)

    async def stored(self, report: StorageImageReport) -> Image:
        """The storage server has the bytes: the image becomes usable."""
        async with self.ctx.db.session() as session:
            row = await session.get(ImageRow, report.image_id)
            if row is None:
                raise NotFound(f"no image {report.image_id}")
            if row.status == ImageStatus.DELETING:
                raise Conflict(f"image {row.name} is being deleted")
            row.status = ImageStatus.ACTIVE
            row.size, row.sha256 = report.size, report.sha256
            row.format, row.virtual_size = report.format, report.virtual_size
            row.source_format = report.source_format
            row.error = None
            image = (await image_models(session, [row]))[0]
        log.info("image active", extra={"image": image.uuid, "format": report.format,
                                        "source_format": report.source_format,
                                        "size": report.size, "sha256": report.sha256})
        return image

    async def aborted(self, image_uuid: str, reason: str) -> None:
        """The storage server saw the upload of ``image_uuid`` break off."""
        await upload_aborted(self.ctx, image_uuid, reason)

    async def resume(self, ref: str, scope: Scope) -> ImageUploadTicket:
        """Where to send the rest of an interrupted upload of ``ref`` (still ``uploading``).

        Resuming counts as activity: the upload's expiry (``upload_timeout``) starts again.
        """
        async with self.ctx.db.session() as session:
            row = await find(session, ImageRow, ref, "image", scope)
            require_in_project(scope.context, Permission.WRITE, row.project_uuid,
                               what=f"upload image {row.name}")
            if row.status == ImageStatus.ERROR:
                raise Conflict(f"the upload of image {row.name} failed ({row.error}); delete "
                               "the image and upload it again")
            if row.status == ImageStatus.DELETING:
                raise Conflict(f"image {row.name} is being deleted")
            if row.status == ImageStatus.UPLOADING:
                row.updated_at = utcnow()
            image = (await image_models(session, [row]))[0]
            return ImageUploadTicket(image=image, storage_url=row.storage_url or "",
                                     existing=row.status == ImageStatus.ACTIVE)

    async def update(self, ref: str, req: ImageUpdate, scope: Scope) -> Image:
        """Change an image's description or protection."""
        async with self.ctx.db.session() as session:
            row = await find(session, ImageRow, ref, "image", scope)
            require_in_project(scope.context, Permission.WRITE, row.project_uuid,
                               what=f"change image {row.name}")
            if req.description is not None:
                row.description = req.description
            if req.protected is not None and req.protected != row.protected:
                row.protected = req.protected
                log.info("image protected" if req.protected else "image unprotected",
                         extra={"image": row.uuid, "image_name": row.name})
            row.updated_at = utcnow()
            return (await image_models(session, [row]))[0]

    async def get(self, ref: str, scope: Scope) -> Image:
        async with self.ctx.db.reading() as session:
            row = await find(session, ImageRow, ref, "image", scope)
            return (await image_models(session, [row]))[0]

    async def users_of(self, ref: str, scope: Scope) -> tuple[ImageRow, list[VmRow]]:
        """The image and the VMs made from it or with it in their CD drive (any
        project's: an image in use stays). Refuses a protected image."""
        async with self.ctx.db.session() as session:
            row = await find(session, ImageRow, ref, "image", scope)
            require_in_project(scope.context, Permission.WRITE, row.project_uuid,
                               what=f"delete image {row.name}")
            _refuse_protected(row)
            vms = list((await session.scalars(select(VmRow).where(or_(
                VmRow.image_uuid == row.uuid, VmRow.cdrom_image_uuid == row.uuid)))).all())
            return row, vms

    async def volumes_of(self, image_uuid: str) -> list[VolumeRow]:
        """The volumes made from the image (any project's)."""
        async with self.ctx.db.session() as session:
            return list((await session.scalars(select(VolumeRow).where(
                VolumeRow.image_uuid == image_uuid).limit(51))).all())

    async def delete(self, ref: str, scope: Scope) -> None:
        """Remove an image nobody uses, from the storage server and the records.

        Refused (409) while it is protected, while a VM was made from it or has it in
        its CD drive, and while a volume was made from it."""
        row, users = await self.users_of(ref, scope)
        if users:
            names = [v.name for v in users]
            shown = ", ".join(names[:5]) + (" …" if len(names) > 5 else "")
            raise Conflict(f"image {row.name} is used by VM(s) {shown} (as their image or in "
                           "their CD drive); delete them (or eject it) first or delete with "
                           "cascade", errors=[{"vm": v.uuid, "name": v.name}
                                              for v in users[:50]])
        volumes = await self.volumes_of(row.uuid)
        if volumes:
            names = [v.name for v in volumes]
            shown = ", ".join(names[:5]) + (" …" if len(names) > 5 else "")
            raise Conflict(f"image {row.name} is used by volume(s) {shown}; delete them first",
                           errors=[{"volume": v.uuid, "name": v.name} for v in volumes[:50]])
        await self.remove(row.uuid)

    async def remove(self, image_uuid: str) -> None:
        """Delete the image's bytes and record (no checks: callers made them)."""
        await remove_image(self.ctx, image_uuid)

    async def delete_cascade(self, ref: str, scope: Scope) -> Accepted:
        """Delete the image after the VMs made from it, each through its own flow.

        Refused while it is protected or while a volume not belonging to one of those
        VMs was made from it (volumes are deleted on their own)."""
        row, users = await self.users_of(ref, scope)
        ours = {v.uuid for v in users}
        volumes = [v for v in await self.volumes_of(row.uuid) if v.vm_uuid not in ours]
        if volumes:
            names = ", ".join(v.name for v in volumes[:5])
            raise Conflict(f"image {row.name} is used by volume(s) {names}, which a cascade "
                           "does not delete; delete them first",
                           errors=[{"volume": v.uuid, "name": v.name} for v in volumes[:50]])
        async with self.ctx.db.session() as session:
            flow = self.ctx.engine.new_flow(session, "image.delete", row.uuid, {},
                                            project_uuid=row.project_uuid)
            await session.flush()
            accepted = Accepted(task=task_model(flow), resource=(await image_models(
                session, [row]))[0].model_dump(mode="json"))
        self.ctx.engine.launch(flow.uuid, row.uuid)
        return accepted


async def _capture_volume(session: AsyncSession, vm: VmRow, disk: str | None) -> VolumeRow:
    """The volume of ``vm`` an image is made of: its root one, or the one ``disk``
    names (a disk id, a volume uuid or a volume name); 404 naming the VM's disks."""
    volumes = await vm_volumes(session, vm.uuid)
    if disk is None:
        found = next((v for v in volumes if v.kind == VolumeKind.ROOT), None)
        if found is None:
            raise Conflict(f"VM {vm.name} has no root volume")
        return found
    for volume in volumes:
        if disk in (volume.disk_id, volume.uuid, volume.name):
            return volume
    names = ", ".join(f"{v.disk_id} ({v.name})" for v in volumes) or "none"
    raise NotFound(f"VM {vm.name} has no disk '{disk}'; its disks: {names}")


def _refuse_protected(row: ImageRow) -> None:
    if row.protected:
        raise Conflict(f"image {row.name} is protected; unprotect it first "
                       f"(yun image unprotect {row.name}, or PATCH "
                       "/api/v1/images/{ref} with protected=false)")


async def expire_uploads(ctx: ControlContext, older_than: float) -> list[str]:
    """Uploads left unfinished for ``older_than`` seconds become ``error``, and the bytes
    their storage server keeps for resuming them are removed.

    An interrupted upload stays ``uploading`` so that it can be resumed (each resume
    restarts the clock); one nobody resumes would keep its partial bytes for ever. The
    image keeps counting against its project's quota until it is deleted; its
    Idempotency-Key is freed so a client can upload again with it. Returns the expired
    image uuids.
    """
    limit = utcnow() - timedelta(seconds=older_than)
    async with ctx.db.session() as session:
        stale = list((await session.scalars(
            select(ImageRow.uuid).where(ImageRow.status == ImageStatus.UPLOADING)
            .where(ImageRow.updated_at < limit))).all())
        if not stale:
            return []
        stale = await _fail_uploads(
            session, stale, f"upload abandoned: not finished or resumed within "
                            f"{older_than:.0f} s; delete the image and upload it again")
        rows = (await session.execute(select(ImageRow.uuid, ImageRow.storage_uuid).where(
            ImageRow.uuid.in_(stale)))).all() if stale else []
        where = {uuid: storage for uuid, storage in rows}
    for image_uuid in stale:
        log.warning("image upload abandoned; marked error", extra={
            "image": image_uuid, "timeout": older_than})
        await _drop_partial(ctx, image_uuid, where.get(image_uuid))
    return stale


async def _drop_partial(ctx: ControlContext, image_uuid: str, storage_uuid: str | None) -> None:
    """Ask the storage server to remove what it holds of an abandoned upload (best effort:
    deleting the image later removes it too)."""
    peer = ctx.membership.peers.get(storage_uuid or "")
    if peer is None:
        return
    try:
        await ctx.membership.client(peer).request(
            "DELETE", f"/internal/v1/images/{image_uuid}", timeout=30)
    except YunError as exc:
        log.warning("partial bytes of an abandoned upload not removed: %s", exc,
                    extra={"image": image_uuid, "storage": storage_uuid})


async def upload_aborted(ctx: ControlContext, image_uuid: str, reason: str) -> bool:
    """The storage server saw an upload's stream break (its gateway died or the client
    went away): the image becomes ``error`` at once instead of waiting for
    ``upload_timeout``. Returns whether an ``uploading`` image was marked."""
    async with ctx.db.session() as session:
        marked = await _fail_uploads(
            session, [image_uuid], f"upload aborted: {reason}; delete the image and upload "
                                   "it again")
    if marked:
        log.warning("image upload aborted; marked error", extra={"image": image_uuid,
                                                                 "reason": reason})
    return bool(marked)


async def _fail_uploads(session: AsyncSession, image_uuids: list[str], error: str
                        ) -> list[str]:
    """Mark those of ``image_uuids`` still ``uploading`` as ``error`` and free their
    Idempotency-Key (so a client can upload again with it); return the ones marked."""
    # Conditional: an upload that completes meanwhile stays active.
    marked = await session.scalars(
        update(ImageRow).where(ImageRow.uuid.in_(image_uuids))
        .where(ImageRow.status == ImageStatus.UPLOADING)
        .values(status=ImageStatus.ERROR, upload_key=None, updated_at=utcnow(), error=error)
        .returning(ImageRow.uuid)
        .execution_options(synchronize_session=False))
    return list(marked.all())


async def expire_uploads_loop(ctx: ControlContext, older_than: float,
                              every: float = 60.0) -> None:
    """Run :func:`expire_uploads` every ``every`` seconds, for ever."""
    while True:
        await asyncio.sleep(every)
        try:
            await expire_uploads(ctx, older_than)
        except Exception:
            log.exception("expiring abandoned uploads failed")
