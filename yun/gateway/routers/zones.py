"""Zones: the failure and placement domains a pool belongs to (F-PUB)."""

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
from yun.proto.resources import Page, Zone, ZoneCreate, ZoneUpdate

router = make_router("zones")


@router.get("/zones", response_model=Page[Zone])
async def list_zones(ctx: Ctx, up: Up, listing: Listing) -> Response:
    """The zones, each with how many compute pools it holds."""
    return answer(await up.call(ctx, "GET", "/zones", params=listing), Page[Zone])


@router.post("/zones", response_model=Zone, status_code=201)
async def create_zone(body: ZoneCreate, ctx: Ctx, up: Up,
                      idempotency_key: IdempotencyKey = None) -> Response:
    """Create a zone (platform administrator)."""
    return answer(await up.call(ctx, "POST", "/zones", body=body,
                                idempotency_key=idempotency_key), Zone)


@router.get("/zones/{ref}", response_model=Zone)
async def show_zone(ref: RefPath, ctx: Ctx, up: Up) -> Response:
    """One zone, by uuid or name."""
    return answer(await up.call(ctx, "GET", "/zones/{ref}", path={"ref": ref}), Zone)


@router.patch("/zones/{ref}", response_model=Zone)
async def update_zone(ref: RefPath, body: ZoneUpdate, ctx: Ctx, up: Up,
                      idempotency_key: IdempotencyKey = None) -> Response:
    """Change a zone's description (platform administrator)."""
    return answer(await up.call(ctx, "PATCH", "/zones/{ref}", path={"ref": ref}, body=body,
                                idempotency_key=idempotency_key), Zone)


@router.delete("/zones/{ref}", status_code=204)
async def delete_zone(ref: RefPath, ctx: Ctx, up: Up,
                      idempotency_key: IdempotencyKey = None) -> Response:
    """Delete a zone; refused (409) while it holds pools (platform administrator)."""
    return answer(await up.call(ctx, "DELETE", "/zones/{ref}", path={"ref": ref},
                                idempotency_key=idempotency_key), None)
