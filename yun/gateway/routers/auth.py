"""Logins, tokens and ``whoami``."""

from __future__ import annotations

from fastapi import Request, Response

from yun.gateway.auth import anonymous_context
from yun.gateway.routers.common import (
    Auth,
    Ctx,
    IdempotencyKey,
    Listing,
    Up,
    UuidPath,
    answer,
    make_router,
)
from yun.proto.identity import IssuedToken, TokenCreate, TokenInfo, WhoAmI
from yun.proto.resources import Page

router = make_router("auth")


@router.post("/auth/tokens", response_model=IssuedToken, status_code=201)
async def log_in(body: TokenCreate, request: Request, up: Up) -> Response:
    """Log in with a user name and password. The token is scoped to one project (the
    user's first one unless `project` names another), expires after `ttl` seconds and
    goes in `Authorization: Bearer <token>`. Logins are rate-limited per address."""
    return answer(await up.call(anonymous_context(request), "POST", "/auth/tokens",
                                body=body), IssuedToken)


@router.get("/auth/tokens", response_model=Page[TokenInfo])
async def list_tokens(ctx: Ctx, up: Up, listing: Listing) -> Response:
    """The caller's own tokens (never their secrets)."""
    return answer(await up.call(ctx, "GET", "/auth/tokens", params=listing), Page[TokenInfo])


@router.delete("/auth/tokens/{token_uuid}", status_code=204)
async def revoke_token(token_uuid: UuidPath, ctx: Ctx, up: Up, auth: Auth,
                       idempotency_key: IdempotencyKey = None) -> Response:
    """Revoke a token: the caller's own, or, for administrators, one of a user below them."""
    reply = await up.call(ctx, "DELETE", "/auth/tokens/{token_uuid}",
                          path={"token_uuid": token_uuid}, idempotency_key=idempotency_key)
    auth.forget_token(token_uuid)
    return answer(reply, None)


@router.get("/auth/whoami", response_model=WhoAmI)
async def whoami(ctx: Ctx, up: Up) -> Response:
    """Who the credential of this request belongs to: user, project, roles."""
    return answer(await up.call(ctx, "GET", "/auth/whoami"), WhoAmI)
