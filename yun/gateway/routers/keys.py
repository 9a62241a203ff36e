"""API key pairs: made, listed, enabled or disabled, rotated, deleted."""

from __future__ import annotations

from fastapi import Response

from yun.gateway.routers.common import (
    Auth,
    Ctx,
    IdempotencyKey,
    Listing,
    RefPath,
    Up,
    answer,
    make_router,
)
from yun.proto.identity import ApiKey, ApiKeyCreate, ApiKeyUpdate, IssuedApiKey
from yun.proto.resources import Page

router = make_router("keys")


@router.get("/keys", response_model=Page[ApiKey])
async def list_keys(ctx: Ctx, up: Up, listing: Listing) -> Response:
    """API keys the caller may see (never their secrets)."""
    return answer(await up.call(ctx, "GET", "/keys", params=listing), Page[ApiKey])


@router.post("/keys", response_model=IssuedApiKey, status_code=201)
async def create_key(body: ApiKeyCreate, ctx: Ctx, up: Up,
                     idempotency_key: IdempotencyKey = None) -> Response:
    """Make an API key pair for the caller in the credential's project. The secret is
    shown in this answer only."""
    return answer(await up.call(ctx, "POST", "/keys", body=body,
                                idempotency_key=idempotency_key), IssuedApiKey)


@router.get("/keys/{ref}", response_model=ApiKey)
async def show_key(ref: RefPath, ctx: Ctx, up: Up) -> Response:
    """One API key, by uuid or name."""
    return answer(await up.call(ctx, "GET", "/keys/{ref}", path={"ref": ref}), ApiKey)


@router.patch("/keys/{ref}", response_model=ApiKey)
async def update_key(ref: RefPath, body: ApiKeyUpdate, ctx: Ctx, up: Up, auth: Auth,
                     idempotency_key: IdempotencyKey = None) -> Response:
    """Enable or disable an API key, or change its description."""
    reply = await up.call(ctx, "PATCH", "/keys/{ref}", path={"ref": ref}, body=body,
                          idempotency_key=idempotency_key)
    auth.forget_keys()  # a disabled key must stop working here at once
    return answer(reply, ApiKey)


@router.delete("/keys/{ref}", status_code=204)
async def delete_key(ref: RefPath, ctx: Ctx, up: Up, auth: Auth,
                     idempotency_key: IdempotencyKey = None) -> Response:
    """Delete an API key."""
    reply = await up.call(ctx, "DELETE", "/keys/{ref}", path={"ref": ref},
                          idempotency_key=idempotency_key)
    auth.forget_keys()
    return answer(reply, None)


@router.post("/keys/{ref}/rotate", response_model=IssuedApiKey)
async def rotate_key(ref: RefPath, ctx: Ctx, up: Up, auth: Auth,
                     idempotency_key: IdempotencyKey = None) -> Response:
    """Give an API key a new secret, shown in this answer only; the old one stops working."""
    reply = await up.call(ctx, "POST", "/keys/{ref}/rotate", path={"ref": ref},
                          idempotency_key=idempotency_key)
    auth.forget_keys()
    return answer(reply, IssuedApiKey)
