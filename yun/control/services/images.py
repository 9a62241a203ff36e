"""Images: records kept by the control server, bytes kept by storage servers (F-IMAGE, C-STO)."""

from __future__ import annotations

import logging
import uuid as uuidlib

from sqlalchemy import select

from yun.control.context import ControlContext
from yun.control.db.models import ImageRow, VmRow
from yun.control.services.common import find
from yun.proto.components import ComponentType
from yun.proto.errors import Conflict, NotFound, Unavailable, YunError
from yun.proto.messages import StorageImageReport
from yun.proto.resources import Image, ImageCreate, ImageStatus, ImageUploadTicket

log = logging.getLogger("yun.control.images")


class ImageService:
    def __init__(self, ctx: ControlContext) -> None:
        self.ctx = ctx

    async def create(self, req: ImageCreate) -> ImageUploadTicket:
        """Record an image about to be uploaded and choose the storage server that keeps it."""
        storages = self.ctx.membership.peers_of(ComponentType.STORAGE)
        if not storages:
            raise Unavailable("no storage server has joined the domain")
        storage = storages[0]
        async with self.ctx.db.session() as session:
            row = ImageRow(
                uuid=str(uuidlib.uuid4()), name=req.name, description=req.description,
                tags=req.tags, status=ImageStatus.UPLOADING,
                declared_format=req.format.value if req.format else None,
                storage_uuid=storage.component_id, storage_url=storage.url,
            )
            session.add(row)
            await session.flush()
            image = Image.model_validate(row)
        log.info("image upload started", extra={"image": image.uuid, "image_name": req.name,
                                                 "storage": storage.component_id})
        return ImageUploadTicket(image=image, storage_url=storage.url)

    async def stored(self, report: StorageImageReport) -> Image:
        """The storage server has the bytes: the image becomes usable."""
        async with self.ctx.db.session() as session:
            row = await session.get(ImageRow, report.image_id)
            if row is None:
                raise NotFound(f"no image {report.image_id}")
            row.status = ImageStatus.ACTIVE
            row.size, row.sha256 = report.size, report.sha256
            row.format, row.virtual_size = report.format, report.virtual_size
            row.error = None
            image = Image.model_validate(row)
        log.info("image active", extra={"image": image.uuid, "format": report.format,
                                        "size": report.size, "sha256": report.sha256})
        return image

    async def get(self, ref: str) -> Image:
        async with self.ctx.db.session() as session:
            return Image.model_validate(await find(session, ImageRow, ref, "image"))

    async def delete(self, ref: str) -> None:
        """Remove an image nobody uses, from the storage server and the records."""
        async with self.ctx.db.session() as session:
            row = await find(session, ImageRow, ref, "image")
            users = (await session.scalars(
                select(VmRow.name).where(VmRow.image_uuid == row.uuid).limit(6))).all()
            if users:
                shown = ", ".join(users[:5]) + (" …" if len(users) > 5 else "")
                raise Conflict(f"image {row.name} is used by VM(s) {shown}; delete them first")
            image_uuid, storage_uuid, storage_url = row.uuid, row.storage_uuid, row.storage_url
        if storage_url:
            peer = self.ctx.membership.peers.get(storage_uuid or "")
            client = (self.ctx.membership.client(peer) if peer is not None
                      else self.ctx.membership.client_for_url(storage_url))
            try:
                await client.request("DELETE", f"/internal/v1/images/{image_uuid}")
            except YunError as exc:
                raise Unavailable(f"storage server could not delete image {ref}: {exc}") from exc
        async with self.ctx.db.session() as session:
            row2 = await session.get(ImageRow, image_uuid)
            if row2 is not None:
                await session.delete(row2)
        log.info("image deleted", extra={"image": image_uuid})
