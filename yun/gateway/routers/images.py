"""Images: streamed, resumable uploads, lists, protection, deletion.

An upload is ``POST /images`` with the bytes as its body (and ``size`` declaring their
number). If the transfer breaks off, the storage server keeps what it got and the image
stays ``uploading``: ``GET /images/{ref}/upload`` answers the ``offset`` it holds, and
``PUT /images/{ref}/data`` with ``Content-Range: bytes OFFSET-END/SIZE`` sends the rest
(in one or several parts). The part that brings the last byte completes the image.
A refused upload (not an image, wrong format, checksum mismatch, too large) leaves
nothing: the storage server drops its bytes and the gateway removes the record.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from collections.abc import AsyncIterator
from typing import Annotated

import httpx
from fastapi import Header, Query, Request, Response
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
    ImageFromVm,
    ImageStatus,
    ImageUpdate,
    ImageUploadStatus,
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


# Statuses with which the storage server refuses an upload for good (its bytes are gone):
# the image record goes too. A transfer that broke off, a 409 (wrong offset, upload
# busy) or a storage server error keep both, for a resume.
REFUSED = frozenset({400, 413, 422})
Sha256 = Annotated[str | None, Query(
    min_length=64, max_length=64, pattern=r"^[0-9a-fA-F]{64}$",
    description="sha256 of the whole upload; the image is refused if the bytes differ")]


class BodyMismatch(Exception):
    """The streamed body's sha256 is not the one the request was signed with."""


class UploadRefused(Exception):
    """The storage server refused the upload for good; ``error`` says why."""

    def __init__(self, error: YunError) -> None:
        super().__init__(str(error))
        self.error = error


@router.post("/images", response_model=Image, status_code=201, openapi_extra=UPLOAD_BODY)
async def upload_image(
    request: Request, ctx: Ctx, up: Up,
    name: Annotated[ResourceName, Query()],
    format: Annotated[ImageFormat | None, Query(
        description="declared format; required only for raw disks")] = None,
    description: Annotated[Description, Query()] = "",
    visibility: Annotated[ImageVisibility, Query(
        description="'public' images are seen by every project")] = ImageVisibility.PROJECT,
    sha256: Sha256 = None,
    size: Annotated[int | None, Query(
        ge=1, le=1 << 50, description="the number of bytes of the image: a body that ends early "
                          "leaves a resumable upload")] = None,
    idempotency_key: IdempotencyKey = None,
) -> Response:
    """Upload a disk image (qcow2, vmdk, vdi, vhdx, vpc, ISO; raw when declared) as the
    request body, streamed to a storage server. Its format is detected (vmdk, vdi, vhdx
    and vpc are converted to qcow2) and its checksum computed and compared with `sha256`;
    a file that is not an image is refused and leaves nothing behind. An interrupted
    upload is resumed with `GET /images/{ref}/upload` and `PUT /images/{ref}/data`."""
    create = ImageCreate(name=name, description=description, format=format,
                         visibility=visibility, sha256=sha256)
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
    content_range = f"bytes 0-{size - 1}/{size}" if size is not None else None
    status, data = await _send_part(up, ctx, ticket, request, format, content_range)
    if status == 202:
        held = ImageUploadStatus.model_validate(data)
        raise Conflict(
            f"the body ended after {held.offset} of the {size} bytes declared; image "
            f"{image_uuid} stays uploading: send the rest with PUT "
            f"/api/v1/images/{image_uuid}/data and Content-Range: bytes "
            f"{held.offset}-{(size or 1) - 1}/{size}",
            errors=[{"image": image_uuid, "offset": held.offset, "total": size}])
    final = await up.call(ctx, "GET", "/images/{image_uuid}", path={"image_uuid": image_uuid})
    return answer(Reply(201, final.data, reply.replayed), Image)


@router.post("/images/from-vm", response_model=Accepted, status_code=202)
async def image_from_vm(body: ImageFromVm, ctx: Ctx, up: Up, wait: Wait = 0,
                        idempotency_key: IdempotencyKey = None) -> Response:
    """Make a new image of a VM's disk (its root disk unless `disk` names another), kept
    by a storage server: a consistent live copy of a running VM (the guest goes on
    writing), or a copy of a stopped one; flattened qcow2, checksummed like uploads. The
    VM must be running or stopped (409 otherwise). Answers the image (`uploading`) and
    the task; the image is `active` when the task has succeeded."""
    reply = await up.call(ctx, "POST", "/images/from-vm", body=body,
                          idempotency_key=idempotency_key)
    return await accepted(up, ctx, reply, wait)


@router.get("/images/{ref}/upload", response_model=ImageUploadStatus)
async def upload_status(ref: RefPath, ctx: Ctx, up: Up) -> Response:
    """How far the upload of an image has come: `offset` is the number of bytes the
    storage server holds, where an interrupted upload resumes (`complete` once stored)."""
    ticket = _ticket(await up.call(ctx, "POST", "/images/{ref}/upload", path={"ref": ref}))
    storage = up.membership.client_for_url(ticket.storage_url)
    path = fill_path("/images/{image_uuid}/upload", {"image_uuid": ticket.image.uuid})
    try:
        resp = await storage.http.get(f"/internal/v1{path}",
                                      headers=storage.headers(ctx.request_id or None))
    except httpx.HTTPError as exc:
        raise PeerError(f"storage server unreachable: {exc}") from exc
    if not resp.is_success:
        raise error_for(resp, ticket.storage_url)
    try:
        held = ImageUploadStatus.model_validate(resp.json())
    except (ValueError, ValidationError) as exc:
        raise PeerError("the storage server answered a malformed upload status") from exc
    return JSONResponse(held.model_dump(mode="json"))


@router.put("/images/{ref}/data", response_model=Image, status_code=201,
            openapi_extra=UPLOAD_BODY, responses={
                200: {"model": Image, "description": "the image was already complete"},
                202: {"model": ImageUploadStatus,
                      "description": "the part is stored; the upload is not complete"}})
async def resume_upload(
    request: Request, ref: RefPath, ctx: Ctx, up: Up,
    content_range: Annotated[str, Header(
        alias="Content-Range", max_length=80, pattern=r"^bytes +(\d+-\d+|\*)/\d+$",
        description="`bytes START-END/SIZE`: START must be the `offset` of "
                    "`GET /images/{ref}/upload` (else 409 naming it); "
                    "`bytes */SIZE` with no body completes an upload whose bytes "
                    "have all arrived")],
    format: Annotated[ImageFormat | None, Query(
        description="declared format, if the first request did not reach the storage "
                    "server")] = None,
) -> Response:
    """Send more bytes of an interrupted upload. The part bringing the last byte
    completes the image (201); a part before it answers 202 and the new offset."""
    ticket = _ticket(await up.call(ctx, "POST", "/images/{ref}/upload", path={"ref": ref}))
    if ticket.existing:
        return JSONResponse(ticket.image.model_dump(mode="json"), status_code=200)
    status, data = await _send_part(up, ctx, ticket, request, format, content_range)
    if status == 202:
        held = ImageUploadStatus.model_validate(data)
        return JSONResponse(held.model_dump(mode="json"), status_code=202)
    final = await up.call(ctx, "GET", "/images/{image_uuid}",
                          path={"image_uuid": ticket.image.uuid})
    return answer(Reply(201 if status == 201 else 200, final.data, False), Image)


@router.patch("/images/{ref}", response_model=Image)
async def update_image(ref: RefPath, body: ImageUpdate, ctx: Ctx, up: Up,
                       idempotency_key: IdempotencyKey = None) -> Response:
    """Change an image's description or protection (`{"protected": true}`: it cannot be
    deleted, not even with cascade, until unprotected)."""
    return answer(await up.call(ctx, "PATCH", "/images/{ref}", path={"ref": ref}, body=body,
                                idempotency_key=idempotency_key), Image)


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
    """Delete an image; refused (409) while it is protected, while volumes or VMs use
    it (made from it, or with it in their CD drive) unless `cascade=true`, which answers
    a task deleting those VMs first."""
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


async def _send_part(up: Upstream, ctx: RequestContext, ticket: ImageUploadTicket,
                     request: Request, declared: ImageFormat | None,
                     content_range: str | None) -> tuple[int, object]:
    """Stream the request body to the storage server; return its status and answer.

    A refusal removes the image record (the storage server has dropped the bytes); a
    transfer that breaks off keeps both, for a resume.
    """
    image_uuid = ticket.image.uuid
    try:
        return await _stream_to_storage(up, ctx, ticket, request, declared, content_range)
    except (UploadRefused, BodyMismatch) as exc:
        try:
            await up.call(ctx, "DELETE", "/images/{image_uuid}", path={"image_uuid": image_uuid})
        except YunError as err:
            log.warning("could not remove the record of a refused upload: %s", err,
                        extra={"image": image_uuid, "request_id": ctx.request_id})
        if isinstance(exc, UploadRefused):
            raise exc.error from None
        raise Unauthorized(f"the body does not match {signing.CONTENT_HEADER}") from exc
    except BaseException:
        log.info("upload interrupted; kept for resuming",
                 extra={"image": image_uuid, "request_id": ctx.request_id})
        raise


async def _stream_to_storage(up: Upstream, ctx: RequestContext, ticket: ImageUploadTicket,
                             request: Request, declared: ImageFormat | None,
                             content_range: str | None) -> tuple[int, object]:
    """Send the request body to the storage server as it arrives.

    When the request was signed with the body's sha256, the bytes are hashed on the way
    and a mismatch aborts the transfer before its end (:class:`BodyMismatch`).
    """
    expected: str | None = getattr(request.state, "body_sha256", None)
    path = fill_path("/images/{image_uuid}/data", {"image_uuid": ticket.image.uuid})
    storage = up.membership.client_for_url(ticket.storage_url)

    async def body() -> AsyncIterator[bytes]:
        digest = hashlib.sha256() if expected is not None else None
        async for chunk in request.stream():
            if digest is not None:
                digest.update(chunk)
            yield chunk
        if digest is not None and expected is not None \
                and not hmac.compare_digest(digest.hexdigest(), expected):
            raise BodyMismatch

    params = {"name": ticket.image.name}
    if declared is not None:
        params["format"] = declared.value
    if ticket.image.expected_sha256:
        params["sha256"] = ticket.image.expected_sha256
    headers = {**storage.headers(ctx.request_id or None),
               "Content-Type": "application/octet-stream"}
    if content_range is not None:
        headers["Content-Range"] = content_range
    try:
        resp = await storage.http.put(
            f"/internal/v1{path}", content=body(), params=params, headers=headers,
            timeout=httpx.Timeout(60.0, read=3600.0),
        )
    except httpx.HTTPError as exc:
        if isinstance(exc.__cause__ or exc.__context__, BodyMismatch):
            raise BodyMismatch from exc
        raise PeerError(f"storage server unreachable: {exc}") from exc
    if not resp.is_success:
        error = error_for(resp, ticket.storage_url)
        if resp.status_code in REFUSED:
            raise UploadRefused(error)
        raise error
    try:
        return resp.status_code, resp.json()
    except ValueError:
        return resp.status_code, None
