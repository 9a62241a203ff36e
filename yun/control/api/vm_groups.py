"""VM groups (affinity and anti-affinity)."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response

from yun.control.access.policy import Scope
from yun.control.api.bundle import ApiBundle
from yun.control.api.deps import Listing
from yun.control.api.routing import audit_resource
from yun.control.services.listing import listed
from yun.control.services.vm_groups import vm_group_models
from yun.proto.resources import Page, VmGroup, VmGroupCreate


def vm_group_router(api: ApiBundle) -> APIRouter:
    r = api.router("vm-groups")
    scope = api.scope
    svc = api.vm_groups

    @r.post("/vm-groups", response_model=VmGroup, status_code=201, name="vm_group.create")
    async def create_group(req: VmGroupCreate, request: Request,
                           sc: Scope = scope) -> VmGroup:
        made = await svc.create(req, sc)
        audit_resource(request, "vm_group", made.uuid, made.project_uuid)
        return made

    @r.get("/vm-groups", response_model=Page[VmGroup], name="vm_group.list")
    async def list_groups(params: Listing, sc: Scope = scope) -> Page[VmGroup]:
        return await listed(api.ctx.db, "vm_group", sc, params, vm_group_models)

    @r.get("/vm-groups/{ref}", response_model=VmGroup, name="vm_group.show")
    async def show_group(ref: str, sc: Scope = scope) -> VmGroup:
        return await svc.get(ref, sc)

    @r.delete("/vm-groups/{ref}", status_code=204, response_model=None,
              name="vm_group.delete")
    async def delete_group(ref: str, request: Request, sc: Scope = scope) -> Response:
        gone = await svc.delete(ref, sc)
        audit_resource(request, "vm_group", gone.uuid, gone.project_uuid)
        return Response(status_code=204)

    return r
