"""Zones, compute pools, the nodes in them, and node labels."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response

from yun.control.access.policy import Scope
from yun.control.api.bundle import ApiBundle
from yun.control.api.deps import Listing
from yun.control.api.routing import audit_resource
from yun.control.services.listing import listed
from yun.control.services.pools import pool_models, zone_models
from yun.proto.resources import (
    Node,
    NodeAdminState,
    NodeLabelsUpdate,
    Page,
    Pool,
    PoolCreate,
    PoolNodeAdd,
    PoolUpdate,
    Zone,
    ZoneCreate,
    ZoneUpdate,
)


def pool_router(api: ApiBundle) -> APIRouter:
    r = api.router("pools")
    scope = api.scope
    svc = api.pools

    @r.post("/zones", response_model=Zone, status_code=201, name="zone.create")
    async def create_zone(req: ZoneCreate, request: Request, sc: Scope = scope) -> Zone:
        made = await svc.create_zone(req, sc)
        audit_resource(request, "zone", made.uuid)
        return made

    @r.get("/zones", response_model=Page[Zone], name="zone.list")
    async def list_zones(params: Listing, sc: Scope = scope) -> Page[Zone]:
        return await listed(api.ctx.db, "zone", sc, params, zone_models)

    @r.get("/zones/{ref}", response_model=Zone, name="zone.show")
    async def show_zone(ref: str, sc: Scope = scope) -> Zone:
        return await svc.get_zone(ref, sc)

    @r.patch("/zones/{ref}", response_model=Zone, name="zone.update")
    async def update_zone(ref: str, req: ZoneUpdate, request: Request,
                          sc: Scope = scope) -> Zone:
        changed = await svc.update_zone(ref, req, sc)
        audit_resource(request, "zone", changed.uuid)
        return changed

    @r.delete("/zones/{ref}", status_code=204, response_model=None, name="zone.delete")
    async def delete_zone(ref: str, request: Request, sc: Scope = scope) -> Response:
        audit_resource(request, "zone", await svc.delete_zone(ref, sc))
        return Response(status_code=204)

    @r.post("/pools", response_model=Pool, status_code=201, name="pool.create")
    async def create_pool(req: PoolCreate, request: Request, sc: Scope = scope) -> Pool:
        made = await svc.create_pool(req, sc)
        audit_resource(request, "pool", made.uuid)
        return made

    @r.get("/pools", response_model=Page[Pool], name="pool.list")
    async def list_pools(params: Listing, sc: Scope = scope) -> Page[Pool]:
        return await listed(api.ctx.db, "pool", sc, params, pool_models)

    @r.get("/pools/{ref}", response_model=Pool, name="pool.show")
    async def show_pool(ref: str, sc: Scope = scope) -> Pool:
        return await svc.get_pool(ref, sc)

    @r.patch("/pools/{ref}", response_model=Pool, name="pool.update")
    async def update_pool(ref: str, req: PoolUpdate, request: Request,
                          sc: Scope = scope) -> Pool:
        changed = await svc.update_pool(ref, req, sc)
        audit_resource(request, "pool", changed.uuid)
        return changed

    @r.delete("/pools/{ref}", status_code=204, response_model=None, name="pool.delete")
    async def delete_pool(ref: str, request: Request, sc: Scope = scope) -> Response:
        audit_resource(request, "pool", await svc.delete_pool(ref, sc))
        return Response(status_code=204)

    @r.post("/pools/{ref}/nodes", response_model=Node, name="pool.add_node")
    async def add_node(ref: str, req: PoolNodeAdd, request: Request,
                       sc: Scope = scope) -> Node:
        node = await svc.add_node(ref, req.node, sc)
        audit_resource(request, "node", node.uuid)
        return node

    @r.post("/pools/{ref}/nodes/{node}/drain", response_model=Node, name="pool.drain_node")
    async def drain_node(ref: str, node: str, request: Request, sc: Scope = scope) -> Node:
        changed = await svc.set_node_state(ref, node, NodeAdminState.DRAINED, sc)
        audit_resource(request, "node", changed.uuid)
        return changed

    @r.post("/pools/{ref}/nodes/{node}/enable", response_model=Node, name="pool.enable_node")
    async def enable_node(ref: str, node: str, request: Request, sc: Scope = scope) -> Node:
        changed = await svc.set_node_state(ref, node, NodeAdminState.ACTIVE, sc)
        audit_resource(request, "node", changed.uuid)
        return changed

    @r.delete("/pools/{ref}/nodes/{node}", response_model=Node, name="pool.remove_node")
    async def remove_node(ref: str, node: str, request: Request, sc: Scope = scope) -> Node:
        changed = await svc.remove_node(ref, node, sc)
        audit_resource(request, "node", changed.uuid)
        return changed

    @r.put("/nodes/{ref}/labels", response_model=Node, name="node.set_labels")
    async def set_labels(ref: str, req: NodeLabelsUpdate, request: Request,
                         sc: Scope = scope) -> Node:
        changed = await svc.set_labels(ref, req, sc)
        audit_resource(request, "node", changed.uuid)
        return changed

    return r
