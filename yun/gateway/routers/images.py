"""Images: streamed uploads, lists, deletion."""

from __future__ import annotations

import hashlib
import hmac
import logging
from collections.abc import AsyncIterator
from typing import Annotated

import httpx
from fastapi import Query, Request, Response
from fastapi.responses import JSONResponse
from pydantic import ValidationError

from yun.gateway.routers.common import (
    Cascade,
    Ctx,
    IdempotencyKey,
    Listing,
    RefPath,
    Up,
    Wait,
    accepted,
    answer,
    make_router,
)
from yun.gateway.upstream import REPLAYED_HEADER, Reply, Upstream, fill_path
from yun.proto import signing
from yun.proto.client import error_for
from yun.proto.context import RequestContext
from yun.proto.errors import Conflict, PeerError, Unauthorized, YunError
from yun.proto.resources import (
    Accepted,
    Description,
    Image,
    ImageCreate,
    ImageFormat,
    ImageStatus,
    ImageUploadTicket,
    ImageVisibility,
    Page,
    ResourceName,
)
from yun.util.ids import uuid_problem

log = logging.getLogger("yun.gateway")
router = make_router("images")
UPLOAD_BODY = {"requestBody": {"required": True, "description": "the image's bytes", "content": {
    "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}}


class BodyMismatch(Exception):
    """The streamed body's sha256 is not the one the request was signed with."""


@router.post("/images", response_model=Image, status_code=201, openapi_extra=UPLOAD_BODY)
async def upload_image(
    request: Request, ctx: Ctx, up: Up,
    name: Annotated[ResourceName, Query()],
    format: Annotated[ImageFormat | None, Query(
        description="declared format; required only for raw disks")] = None,
    description: Annotated[Description, Query()] = "",
    visibility: Annotated[ImageVisibility, Query(
        description="'public' images are seen by every project")] = ImageVisibility.PROJECT,
    idempotency_key: IdempotencyKey = None,
) -> Response:
    """Upload a disk image (qcow2, vmdk, vdi, vhdx, vpc, ISO; raw when declared) as the
    request body, streamed to a storage server. Its format is detected and its checksum
    computed; a file that is not an image is refused and leaves nothing behind."""
    create = ImageCreate(name=name, description=description, format=format,
                         visibility=visibility)
    reply = await up.call(ctx, "POST", "/images", body=create,
                          idempotency_key=idempotency_key)
    ticket = _ticket(reply)
    if ticket.existing:
        # A retried keyed upload whose first attempt completed: its image, not a second one.
        if ticket.image.status != ImageStatus.ACTIVE:
            raise Conflict(f"image {ticket.image.name} already exists and is "
                           f"{ticket.image.status}; wait for it or delete it")
        return JSONResponse(ticket.image.model_dump(mode="json"), status_code=201,
                            headers={REPLAYED_HEADER: "true"})
    image_uuid = ticket.image.uuid
    try:
        await _stream_to_storage(up, ctx, ticket, request, format)
    except BaseException:
        try:
            await up.call(ctx, "DELETE", "/images/{image_uuid}", path={"image_uuid": image_uuid})
        except YunError as exc:
            log.warning("could not remove the record of a failed upload: %s", exc,
                        extra={"image": image_uuid, "request_id": ctx.request_id})
        raise
    final = await up.call(ctx, "GET", "/images/{image_uuid}", path={"image_uuid": image_uuid})
    return answer(Reply(201, final.data, reply.replayed), Image)


@router.get("/images", response_model=Page[Image])
async def list_images(ctx: Ctx, up: Up, listing: Listing) -> Response:
    """The project's images and the public ones."""
    return answer(await up.call(ctx, "GET", "/images", params=listing), Page[Image])


@router.get("/images/{ref}", response_model=Image)
async def show_image(ref: RefPath, ctx: Ctx, up: Up) -> Response:
    """One image, by uuid or name."""
    return answer(await up.call(ctx, "GET", "/images/{ref}", path={"ref": ref}), Image)


@router.delete("/images/{ref}", status_code=204, responses={
    202: {"model": Accepted, "description": "with `cascade=true`: a task deletes the VMs "
                                            "using the image, then the image"}})
async def delete_image(ref: RefPath, ctx: Ctx, up: Up, cascade: Cascade = False,
                       wait: Wait = 0, idempotency_key: IdempotencyKey = None) -> Response:
    """Delete an image; refused (409) while VMs use it unless `cascade=true`, which
    answers a task deleting those VMs first."""
    reply = await up.call(ctx, "DELETE", "/images/{ref}", path={"ref": ref},
                          params={"cascade": cascade}, idempotency_key=idempotency_key)
    return await accepted(up, ctx, reply, wait)


def _ticket(reply: Reply) -> ImageUploadTicket:
    try:
        ticket = ImageUploadTicket.model_validate(reply.data)
    except ValidationError as exc:
        raise PeerError("the control server answered a malformed ImageUploadTicket") from exc
    if uuid_problem(ticket.image.uuid, "image uuid") is not None:
        # It becomes part of internal paths: only a canonical uuid may.
        raise PeerError("the control server answered an image without a canonical uuid")
    return ticket


async def _stream_to_storage(up: Upstream, ctx: RequestContext, ticket: ImageUploadTicket,
                             request: Request, declared: ImageFormat | None) -> None:
    """Send the request body to the storage server as it arrives.

    When the request was signed with the body's sha256, the bytes are hashed on the way
    and a mismatch aborts the transfer before its end, so the storage server keeps nothing.
    """
    expected: str | None = getattr(request.state, "body_sha256", None)
    path = fill_path("/images/{image_uuid}/data", {"image_uuid": ticket.image.uuid})
    storage = up.membership.client_for_url(ticket.storage_url)

    async def body() -> AsyncIterator[bytes]:
        digest = hashlib.sha256()
        async for chunk in request.stream():
            digest.update(chunk)
            yield chunk
        if expected is not None and not hmac.compare_digest(digest.hexdigest(), expected):
            raise BodyMismatch

    params = {"name": ticket.image.name}
    if declared is not None:
        params["format"] = declared.value
    mismatch = Unauthorized(f"the body does not match {signing.CONTENT_HEADER}")
    try:
        resp = await storage.http.put(
            f"/internal/v1{path}", content=body(), params=params,
            headers={**storage.headers(ctx.request_id or None),
                     "Content-Type": "application/octet-stream"},
            timeout=httpx.Timeout(60.0, read=3600.0),
        )
    except BodyMismatch as exc:
        raise mismatch from exc
    except httpx.HTTPError as exc:
        if isinstance(exc.__cause__ or exc.__context__, BodyMismatch):
            raise mismatch from exc
        raise PeerError(f"storage server unreachable: {exc}") from exc
    if not resp.is_success:
        raise error_for(resp, ticket.storage_url)
