"""Image routes of the control server's user API (the bytes go to a storage server)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse

from yun.control.access.policy import Scope
from yun.control.api.bundle import ApiBundle
from yun.control.api.deps import Listing
from yun.control.api.routing import IDEMPOTENCY_HEADER, audit_resource
from yun.control.services.images import image_models
from yun.control.services.listing import listed
from yun.proto.context import RequestContext
from yun.proto.resources import (
    Accepted,
    Image,
    ImageCreate,
    ImageFromVm,
    ImageUpdate,
    ImageUploadTicket,
    Page,
)


def image_router(api: ApiBundle) -> APIRouter:
    r = api.router("images")
    user, scope = api.user, api.scope

    @r.post("/images", response_model=ImageUploadTicket, status_code=201, name="image.create")
    async def create_image(req: ImageCreate, request: Request,
                           ctx: RequestContext = user) -> ImageUploadTicket:
        ticket = await api.images.create(req, ctx, request.headers.get(IDEMPOTENCY_HEADER))
        audit_resource(request, "image", ticket.image.uuid, ticket.image.project_uuid)
        return ticket

    @r.post("/images/from-vm", response_model=Accepted, status_code=202,
            name="image.from_vm")
    async def image_from_vm(req: ImageFromVm, request: Request, ctx: RequestContext = user,
                            sc: Scope = scope) -> Accepted:
        """Make a new image of a VM's disk (its root disk unless ``disk`` names another),
        running or stopped: answers the image (``uploading``) and the capture task."""
        accepted = await api.images.from_vm(req, ctx, sc)
        audit_resource(request, "image", accepted.resource.get("uuid"),
                       accepted.resource.get("project_uuid"))
        return accepted

    @r.get("/images", response_model=Page[Image], name="image.list")
    async def list_images(params: Listing, sc: Scope = scope) -> Page[Image]:
        return await listed(api.ctx.db, "image", sc, params, image_models)

    @r.get("/images/{ref}", response_model=Image, name="image.show")
    async def show_image(ref: str, sc: Scope = scope) -> Image:
        return await api.images.get(ref, sc)

    @r.patch("/images/{ref}", response_model=Image, name="image.update")
    async def update_image(ref: str, req: ImageUpdate, request: Request,
                           sc: Scope = scope) -> Image:
        changed = await api.images.update(ref, req, sc)
        audit_resource(request, "image", changed.uuid, changed.project_uuid)
        return changed

    @r.post("/images/{ref}/upload", response_model=ImageUploadTicket, name="image.resume")
    async def resume_upload(ref: str, request: Request, sc: Scope = scope
                            ) -> ImageUploadTicket:
        """Where the rest of an interrupted upload goes (the gateway sends it there)."""
        ticket = await api.images.resume(ref, sc)
        audit_resource(request, "image", ticket.image.uuid, ticket.image.project_uuid)
        return ticket

    @r.delete("/images/{ref}", status_code=204, response_model=None, name="image.delete",
              responses={202: {"model": Accepted}})
    async def delete_image(ref: str, request: Request, sc: Scope = scope,
                           cascade: bool = False) -> Any:
        if cascade:
            accepted = await api.images.delete_cascade(ref, sc)
            audit_resource(request, "image", accepted.resource.get("uuid"),
                           accepted.resource.get("project_uuid"))
            return JSONResponse(accepted.model_dump(mode="json"), status_code=202)
        await api.images.delete(ref, sc)
        return Response(status_code=204)

    return r
