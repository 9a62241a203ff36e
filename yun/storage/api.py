"""The Storage Server's internal HTTP API: upload, download (with ranges), list, delete.

Uploads and downloads stream: neither side ever holds an image in memory. Every
route except ``/healthz`` requires a signed request of a domain member, and admits only
the component types that need it:

===========================================  ====================================
``PUT /internal/v1/images/{id}/data``         gateway (a user's upload streams through),
                                              node (a VM's disk made an image, F-IMAGE)
``GET /internal/v1/images/{id}/upload``       gateway (where an upload resumes)
``GET /internal/v1/images/{id}/data``         node (caches an image for a VM)
``GET /internal/v1/images``, ``.../{id}``     control (checks what is stored)
``DELETE /internal/v1/images/{id}``           control (image deletion)
===========================================  ====================================

So a node can read images and store the copy of a volume it was asked to export, but
never delete one.

Resumable uploads: ``PUT .../data`` without ``Content-Range`` sends a whole image; with
``Content-Range: bytes START-END/TOTAL`` it sends part of an upload of TOTAL bytes, START
being the offset ``GET .../upload`` answers (else 409 naming that offset). A part that
does not complete the upload answers 202 with the new offset; the last part completes
it (201, or 200 when it was already stored). ``bytes */TOTAL`` with no body completes an
upload whose bytes have all arrived. A transfer that breaks off keeps its bytes.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Awaitable, Callable
from typing import Literal

from fastapi import APIRouter, Depends, FastAPI, Query, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.requests import ClientDisconnect

from yun.proto.auth import Verifier
from yun.proto.components import ComponentType as CT
from yun.proto.errors import PayloadTooLarge
from yun.proto.messages import StorageImageReport, StorageServerInfo
from yun.proto.resources import ImageUploadStatus
from yun.proto.server import install_problem_handlers, peer_identity, problem_response
from yun.storage.store import (
    ImageRecord,
    ImageStore,
    RangeNotSatisfiable,
    check_image_id,
    parse_content_range,
)
from yun.util.metrics import install_metrics

log = logging.getLogger("yun.storage.api")

OnStored = Callable[[StorageImageReport], Awaitable[None]]

_RANGE_RE = re.compile(r"^bytes=(\d*)-(\d*)$")


def parse_range(header: str, size: int) -> tuple[int, int]:
    """The inclusive (first, last) byte of a single ``Range: bytes=...`` header.

    Supports ``bytes=N-``, ``bytes=N-M`` and the suffix form ``bytes=-N``. Raises
    :class:`RangeNotSatisfiable` for anything else or a range outside the image;
    several ranges in one request are not supported (nobody here needs them).
    """
    match = _RANGE_RE.match(header.strip().replace(" ", ""))
    if not match or match.group(1) == match.group(2) == "":
        raise RangeNotSatisfiable(
            f"unsupported Range {header[:80]!r}; use bytes=N-, bytes=N-M or bytes=-N", size=size
        )
    first_text, last_text = match.groups()
    if first_text == "":
        suffix = int(last_text)
        if suffix == 0 or size == 0:
            raise RangeNotSatisfiable(f"empty suffix range {header!r}", size=size)
        return max(0, size - suffix), size - 1
    first = int(first_text)
    last = size - 1 if last_text == "" else min(int(last_text), size - 1)
    if first >= size or int(last_text or first) < first:
        raise RangeNotSatisfiable(
            f"range {header!r} is outside the image of {size} bytes", size=size
        )
    return first, last


def create_storage_app(
    store: ImageStore,
    verifier: Verifier,
    on_stored: OnStored | None = None,
    max_upload_bytes: int = 64 * 1024**3,
    *,
    mode: Literal["local", "shared"] = "local",
) -> FastAPI:
    """The Storage Server's FastAPI application.

    ``on_stored`` is awaited after each successful upload, also for an idempotent
    repeat. If it raises, the error is answered (e.g. 503) although the bytes stay
    stored: the uploader retries, the repeat answers 200 and announces the image
    again, so an image is never stored but unknown to the control plane.
    An upload whose stream breaks off keeps its bytes and stays ``uploading`` on the
    control server, to be resumed; the control server removes it (through ``DELETE``)
    when it gives up on it.
    """
    app = FastAPI(title="Yun storage server", version="1")
    install_problem_handlers(app)
    router = APIRouter(prefix="/internal/v1")
    uploader = [Depends(peer_identity(verifier, {CT.GATEWAY}))]
    # A node stores the copy of a volume it was asked to export (F-IMAGE).
    writer = [Depends(peer_identity(verifier, {CT.GATEWAY, CT.NODE}))]
    reader = [Depends(peer_identity(verifier, {CT.NODE}))]
    manager = [Depends(peer_identity(verifier, {CT.CONTROL}))]

    @app.get("/healthz", include_in_schema=False)
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @router.put(
        "/images/{image_id}/data",
        response_model=StorageImageReport,
        status_code=201,
        dependencies=writer,
        responses={200: {"model": StorageImageReport, "description": "already stored"},
                   202: {"model": ImageUploadStatus, "description": "part stored"}},
    )
    async def upload(
        image_id: str,
        request: Request,
        fmt: str = Query("", alias="format", description="declared format; required for raw"),
        name: str = Query("", max_length=255),
        sha256: str = Query("", max_length=64, description="sha256 of the whole upload"),
    ) -> JSONResponse:
        """Store the request body as (part of) image ``image_id``."""
        check_image_id(image_id)
        header = request.headers.get("content-range")
        content_range = parse_content_range(header) if header else None
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > max_upload_bytes:
            # Refuse before reading a byte rather than after max_upload_bytes of them.
            raise PayloadTooLarge(
                f"upload of {length} bytes exceeds the limit of {max_upload_bytes} bytes"
            )
        try:
            result = await store.put(
                image_id,
                request.stream(),
                name=name,
                declared_format=fmt or None,
                max_bytes=max_upload_bytes,
                content_range=content_range,
                expected_sha256=sha256 or None,
            )
        except ClientDisconnect:
            log.warning("upload broke off; bytes received kept for resuming",
                        extra={"image": image_id,
                               "offset": store.upload_status(image_id).offset})
            raise
        if result.record is None:
            status = ImageUploadStatus(image_id=image_id, offset=result.offset,
                                       total=result.total)
            return JSONResponse(status.model_dump(mode="json"), status_code=202)
        report = result.record.report()
        if on_stored is not None:
            try:
                await on_stored(report)
            except Exception:
                log.warning("stored image not announced; the uploader must retry",
                            extra={"image": image_id, "sha256": report.sha256}, exc_info=True)
                raise
        return JSONResponse(report.model_dump(mode="json"),
                            status_code=201 if result.created else 200)

    @router.get("/images/{image_id}/upload", response_model=ImageUploadStatus,
                dependencies=uploader)
    async def upload_status(image_id: str) -> ImageUploadStatus:
        """How many bytes of the upload of ``image_id`` are stored (where to resume)."""
        check_image_id(image_id)
        return store.upload_status(image_id)

    @router.get("/images/{image_id}/data", response_class=StreamingResponse,
                dependencies=reader)
    async def download(image_id: str, request: Request) -> Response:
        """Stream image ``image_id``, whole or one ``Range``."""
        record = store.get(image_id)
        headers = {
            "ETag": f'"{record.sha256}"',
            "Accept-Ranges": "bytes",
            "X-Image-Format": record.format,
        }
        range_header = request.headers.get("range")
        try:
            if range_header:
                first, last = parse_range(range_header, record.size)
                status = 206
                headers["Content-Range"] = f"bytes {first}-{last}/{record.size}"
            else:
                first, last, status = 0, record.size - 1, 200
            body = store.open_range(image_id, first, last)
        except RangeNotSatisfiable as exc:
            resp = problem_response(exc.problem(instance=request.url.path))
            resp.headers["Content-Range"] = f"bytes */{exc.size}"
            return resp
        headers["Content-Length"] = str(last - first + 1)
        return StreamingResponse(
            body, status_code=status, headers=headers, media_type="application/octet-stream"
        )

    @router.get("/info", response_model=StorageServerInfo, dependencies=manager)
    async def info() -> StorageServerInfo:
        """The storage mode this server serves (the control server matches pools to it)."""
        return StorageServerInfo(mode=mode)

    @router.get("/images", response_model=list[ImageRecord], dependencies=manager)
    async def list_images() -> list[ImageRecord]:
        """Every stored image."""
        return store.list()

    @router.get("/images/{image_id}", response_model=ImageRecord, dependencies=manager)
    async def get_image(image_id: str) -> ImageRecord:
        """The metadata of one image."""
        return store.get(image_id)

    @router.delete("/images/{image_id}", status_code=204, dependencies=manager)
    async def delete_image(image_id: str) -> Response:
        """Remove an image; deleting an absent image succeeds too."""
        await store.delete(image_id)
        return Response(status_code=204)

    app.include_router(router)
    install_metrics(app, "storage")
    return app
