"""Logins, tokens and the gateway's credential checks."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request, Response

from yun.control.access.policy import Scope
from yun.control.api.bundle import ApiBundle
from yun.control.api.deps import Listing
from yun.control.api.routing import audit_resource
from yun.control.db.models import TokenRow
from yun.control.services.listing import each, listed
from yun.proto.context import (
    AnonymousContext,
    AuthResult,
    KeyAuthResult,
    KeyLookup,
    RequestContext,
    TokenCheck,
)
from yun.proto.identity import IssuedToken, TokenCreate, TokenInfo, WhoAmI
from yun.proto.resources import Page


def _token_info(row: TokenRow) -> TokenInfo:
    return TokenInfo(uuid=row.uuid, user_uuid=row.user_uuid, project_uuid=row.project_uuid,
                     created_at=row.created_at, expires_at=row.expires_at,
                     revoked=row.revoked_at is not None)


def auth_router(api: ApiBundle) -> APIRouter:
    r = api.router("auth")
    user, scope = api.user, api.scope
    gateway = Depends(api.deps.gateway)
    anonymous = Depends(api.users.anonymous)

    @r.post("/auth/verify-token", response_model=AuthResult, dependencies=[gateway],
            include_in_schema=False, name="auth.verify_token")
    async def verify_token(check: TokenCheck) -> AuthResult:
        return await api.ctx.identity.verify_token(check.token)

    @r.post("/auth/key", response_model=KeyAuthResult, dependencies=[gateway],
            include_in_schema=False, name="auth.key")
    async def key(lookup: KeyLookup) -> KeyAuthResult:
        return await api.ctx.identity.key_auth(lookup.access_key)

    @r.post("/auth/tokens", response_model=IssuedToken, status_code=201, name="auth.login")
    async def login(req: TokenCreate, request: Request,
                    who: AnonymousContext | RequestContext = anonymous) -> IssuedToken:
        issued = await api.ctx.identity.login(req, who.source_ip)
        audit_resource(request, "token", issued.uuid, issued.project_uuid)
        request.state.audit_user = (issued.user_uuid, issued.user_name)
        return issued

    @r.get("/auth/tokens", response_model=Page[TokenInfo], name="auth.tokens")
    async def tokens(params: Listing, sc: Scope = scope) -> Page[TokenInfo]:
        return await listed(api.ctx.db, "token", sc, params, each(_token_info))

    @r.delete("/auth/tokens/{token_uuid}", status_code=204, response_model=None, name="auth.revoke")
    async def revoke(token_uuid: str, sc: Scope = scope) -> Response:
        await api.accounts.revoke_token(token_uuid, sc)
        return Response(status_code=204)

    @r.get("/auth/whoami", response_model=WhoAmI, name="auth.whoami")
    async def whoami(ctx: RequestContext = user) -> WhoAmI:
        return WhoAmI(user_uuid=ctx.user_uuid, user_name=ctx.user_name,
                      department_uuid=ctx.department_uuid, project_uuid=ctx.project_uuid,
                      project_name=ctx.project_name, roles=sorted(ctx.roles), auth=ctx.auth)

    return r
