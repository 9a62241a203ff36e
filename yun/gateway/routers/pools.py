"""Compute pools (F-POOL, F-1PN): templates for their VMs, and the nodes they hold."""

from __future__ import annotations

from fastapi import Response

from yun.gateway.routers.common import (
    Ctx,
    IdempotencyKey,
    Listing,
    RefPath,
    Up,
    answer,
    make_router,
)
from yun.proto.resources import Node, Page, Pool, PoolCreate, PoolNodeAdd, PoolUpdate

router = make_router("pools")


@router.get("/pools", response_model=Page[Pool])
async def list_pools(ctx: Ctx, up: Up, listing: Listing) -> Response:
    """The compute pools: template, zone, node and VM counts, capacity and warnings."""
    return answer(await up.call(ctx, "GET", "/pools", params=listing), Page[Pool])


@router.post("/pools", response_model=Pool, status_code=201)
async def create_pool(body: PoolCreate, ctx: Ctx, up: Up,
                      idempotency_key: IdempotencyKey = None) -> Response:
    """Create a compute pool in a zone (default: `default`); fields left out take the
    platform's defaults (platform administrator)."""
    return answer(await up.call(ctx, "POST", "/pools", body=body,
                                idempotency_key=idempotency_key), Pool)


@router.get("/pools/{ref}", response_model=Pool)
async def show_pool(ref: RefPath, ctx: Ctx, up: Up) -> Response:
    """One compute pool, by uuid or name, with its capacity and warnings."""
    return answer(await up.call(ctx, "GET", "/pools/{ref}", path={"ref": ref}), Pool)


@router.patch("/pools/{ref}", response_model=Pool)
async def update_pool(ref: RefPath, body: PoolUpdate, ctx: Ctx, up: Up,
                      idempotency_key: IdempotencyKey = None) -> Response:
    """Change some template fields of a pool; the others are kept. New ratios apply to
    the next placements (platform administrator)."""
    return answer(await up.call(ctx, "PATCH", "/pools/{ref}", path={"ref": ref}, body=body,
                                idempotency_key=idempotency_key), Pool)


@router.delete("/pools/{ref}", status_code=204)
async def delete_pool(ref: RefPath, ctx: Ctx, up: Up,
                      idempotency_key: IdempotencyKey = None) -> Response:
    """Delete a pool; refused (409) while it holds nodes (platform administrator)."""
    return answer(await up.call(ctx, "DELETE", "/pools/{ref}", path={"ref": ref},
                                idempotency_key=idempotency_key), None)


@router.post("/pools/{ref}/nodes", response_model=Node)
async def add_pool_node(ref: RefPath, body: PoolNodeAdd, ctx: Ctx, up: Up,
                        idempotency_key: IdempotencyKey = None) -> Response:
    """Add an unassigned node to the pool; it gets new VMs at once (platform
    administrator). A node of another pool must first leave it (409)."""
    return answer(await up.call(ctx, "POST", "/pools/{ref}/nodes", path={"ref": ref},
                                body=body, idempotency_key=idempotency_key), Node)


@router.post("/pools/{ref}/nodes/{node}/drain", response_model=Node)
async def drain_pool_node(ref: RefPath, node: RefPath, ctx: Ctx, up: Up,
                          idempotency_key: IdempotencyKey = None) -> Response:
    """Drain a node of the pool: it gets no new VM and keeps the ones it runs
    (platform administrator)."""
    return answer(await up.call(ctx, "POST", "/pools/{ref}/nodes/{node}/drain",
                                path={"ref": ref, "node": node},
                                idempotency_key=idempotency_key), Node)


@router.post("/pools/{ref}/nodes/{node}/enable", response_model=Node)
async def enable_pool_node(ref: RefPath, node: RefPath, ctx: Ctx, up: Up,
                           idempotency_key: IdempotencyKey = None) -> Response:
    """Undrain a node of the pool: it gets new VMs again (platform administrator)."""
    return answer(await up.call(ctx, "POST", "/pools/{ref}/nodes/{node}/enable",
                                path={"ref": ref, "node": node},
                                idempotency_key=idempotency_key), Node)


@router.delete("/pools/{ref}/nodes/{node}", response_model=Node)
async def remove_pool_node(ref: RefPath, node: RefPath, ctx: Ctx, up: Up,
                           idempotency_key: IdempotencyKey = None) -> Response:
    """Take a node out of the pool, leaving it unassigned; refused (409) while a VM is
    on it (platform administrator)."""
    return answer(await up.call(ctx, "DELETE", "/pools/{ref}/nodes/{node}",
                                path={"ref": ref, "node": node},
                                idempotency_key=idempotency_key), Node)
