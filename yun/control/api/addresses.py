"""Address pools (platform administrators) and elastic IPs (projects) (F-ADDR)."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response

from yun.control.access.policy import Scope
from yun.control.api.bundle import ApiBundle
from yun.control.api.deps import Listing
from yun.control.api.routing import audit_resource
from yun.control.services.addresses import address_pool_models, eip_clause, eip_models
from yun.control.services.listing import listed
from yun.proto.resources import (
    AddressPool,
    AddressPoolCreate,
    AddressPoolUpdate,
    AddressRangeCreate,
    ElasticIp,
    ElasticIpAllocate,
    ElasticIpBind,
    Page,
)


def address_router(api: ApiBundle) -> APIRouter:
    r = api.router("addresses")
    scope = api.scope
    svc = api.addresses

    @r.post("/address-pools", response_model=AddressPool, status_code=201,
            name="address_pool.create")
    async def create_pool(req: AddressPoolCreate, request: Request,
                          sc: Scope = scope) -> AddressPool:
        made = await svc.create_pool(req, sc)
        audit_resource(request, "address_pool", made.uuid)
        return made

    @r.get("/address-pools", response_model=Page[AddressPool], name="address_pool.list")
    async def list_pools(params: Listing, sc: Scope = scope) -> Page[AddressPool]:
        return await listed(api.ctx.db, "address_pool", sc, params, address_pool_models)

    @r.get("/address-pools/{ref}", response_model=AddressPool, name="address_pool.show")
    async def show_pool(ref: str, sc: Scope = scope) -> AddressPool:
        return await svc.get_pool(ref, sc)

    @r.patch("/address-pools/{ref}", response_model=AddressPool, name="address_pool.update")
    async def update_pool(ref: str, req: AddressPoolUpdate, request: Request,
                          sc: Scope = scope) -> AddressPool:
        changed = await svc.update_pool(ref, req, sc)
        audit_resource(request, "address_pool", changed.uuid)
        return changed

    @r.delete("/address-pools/{ref}", status_code=204, response_model=None,
              name="address_pool.delete")
    async def delete_pool(ref: str, request: Request, sc: Scope = scope) -> Response:
        audit_resource(request, "address_pool", await svc.delete_pool(ref, sc))
        return Response(status_code=204)

    @r.post("/address-pools/{ref}/ranges", response_model=AddressPool,
            name="address_pool.add_range")
    async def add_range(ref: str, req: AddressRangeCreate, request: Request,
                        sc: Scope = scope) -> AddressPool:
        changed = await svc.add_range(ref, req, sc)
        audit_resource(request, "address_pool", changed.uuid)
        return changed

    @r.delete("/address-pools/{ref}/ranges/{range_ref}", response_model=AddressPool,
              name="address_pool.remove_range")
    async def remove_range(ref: str, range_ref: str, request: Request,
                           sc: Scope = scope) -> AddressPool:
        changed = await svc.remove_range(ref, range_ref, sc)
        audit_resource(request, "address_pool", changed.uuid)
        return changed

    @r.post("/eips", response_model=ElasticIp, status_code=201, name="eip.allocate")
    async def allocate_eip(req: ElasticIpAllocate, request: Request,
                           sc: Scope = scope) -> ElasticIp:
        made = await svc.allocate_eip(req, sc)
        audit_resource(request, "eip", made.uuid, made.project_uuid)
        return made

    @r.get("/eips", response_model=Page[ElasticIp], name="eip.list")
    async def list_eips(params: Listing, sc: Scope = scope) -> Page[ElasticIp]:
        return await listed(api.ctx.db, "eip", sc, params, eip_models, eip_clause())

    @r.get("/eips/{ref}", response_model=ElasticIp, name="eip.show")
    async def show_eip(ref: str, sc: Scope = scope) -> ElasticIp:
        return await svc.get_eip(ref, sc)

    @r.post("/eips/{ref}/bind", response_model=ElasticIp, name="eip.bind")
    async def bind_eip(ref: str, req: ElasticIpBind, request: Request,
                       sc: Scope = scope) -> ElasticIp:
        changed = await svc.bind_eip(ref, req.vm, sc)
        audit_resource(request, "eip", changed.uuid, changed.project_uuid)
        return changed

    @r.post("/eips/{ref}/unbind", response_model=ElasticIp, name="eip.unbind")
    async def unbind_eip(ref: str, request: Request, sc: Scope = scope) -> ElasticIp:
        changed = await svc.unbind_eip(ref, sc)
        audit_resource(request, "eip", changed.uuid, changed.project_uuid)
        return changed

    @r.delete("/eips/{ref}", response_model=ElasticIp, name="eip.release")
    async def release_eip(ref: str, request: Request, sc: Scope = scope) -> ElasticIp:
        gone = await svc.release_eip(ref, sc)
        audit_resource(request, "eip", gone.uuid, gone.project_uuid)
        return gone

    return r
