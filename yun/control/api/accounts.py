"""Users, role grants and API keys."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response

from yun.control.access.policy import Scope
from yun.control.api.bundle import ApiBundle
from yun.control.api.deps import Listing
from yun.control.api.routing import audit_resource
from yun.control.services.listing import each, listed
from yun.control.services.users import ROLES, assignment_models, user_models
from yun.proto.context import RequestContext
from yun.proto.identity import (
    ApiKey,
    ApiKeyCreate,
    ApiKeyUpdate,
    IssuedApiKey,
    RoleAssignment,
    RoleAssignmentCreate,
    RoleInfo,
    User,
    UserCreate,
    UserUpdate,
)
from yun.proto.resources import Page


def account_router(api: ApiBundle) -> APIRouter:
    r = api.router("users")
    user, scope = api.user, api.scope
    svc = api.accounts

    @r.post("/users", response_model=User, status_code=201, name="user.create")
    async def create_user(req: UserCreate, request: Request, sc: Scope = scope) -> User:
        made = await svc.create_user(req, sc)
        audit_resource(request, "user", made.uuid)
        return made

    @r.get("/users", response_model=Page[User], name="user.list")
    async def list_users(params: Listing, sc: Scope = scope) -> Page[User]:
        return await listed(api.ctx.db, "user", sc, params, user_models)

    @r.get("/users/{ref}", response_model=User, name="user.show")
    async def show_user(ref: str, sc: Scope = scope) -> User:
        return await svc.get_user(ref, sc)

    @r.patch("/users/{ref}", response_model=User, name="user.update")
    async def update_user(ref: str, req: UserUpdate, request: Request,
                          sc: Scope = scope) -> User:
        changed = await svc.update_user(ref, req, sc)
        audit_resource(request, "user", changed.uuid)
        return changed

    @r.delete("/users/{ref}", status_code=204, response_model=None, name="user.delete")
    async def delete_user(ref: str, request: Request, sc: Scope = scope,
                          cascade: bool = False) -> Response:
        audit_resource(request, "user", await svc.delete_user(ref, sc, cascade))
        return Response(status_code=204)

    @r.get("/roles", response_model=list[RoleInfo], name="role.list")
    async def roles(ctx: RequestContext = user) -> list[RoleInfo]:
        return ROLES

    @r.post("/role-assignments", response_model=RoleAssignment, status_code=201,
            name="role.grant")
    async def grant(req: RoleAssignmentCreate, request: Request,
                    sc: Scope = scope) -> RoleAssignment:
        made = await svc.grant(req, sc)
        audit_resource(request, "role_assignment", made.uuid, made.project_uuid)
        return made

    @r.get("/role-assignments", response_model=Page[RoleAssignment], name="role.assignments")
    async def assignments(params: Listing, sc: Scope = scope) -> Page[RoleAssignment]:
        return await listed(api.ctx.db, "role_assignment", sc, params, assignment_models)

    @r.delete("/role-assignments/{assignment_uuid}", status_code=204, response_model=None,
              name="role.revoke")
    async def revoke(assignment_uuid: str, sc: Scope = scope) -> Response:
        await svc.revoke(assignment_uuid, sc)
        return Response(status_code=204)

    @r.post("/keys", response_model=IssuedApiKey, status_code=201, name="key.create")
    async def create_key(req: ApiKeyCreate, request: Request,
                         ctx: RequestContext = user) -> IssuedApiKey:
        made = await svc.create_key(req, ctx)
        audit_resource(request, "key", made.uuid, made.project_uuid)
        return made

    @r.get("/keys", response_model=Page[ApiKey], name="key.list")
    async def list_keys(params: Listing, sc: Scope = scope) -> Page[ApiKey]:
        return await listed(api.ctx.db, "key", sc, params,
                            each(ApiKey.model_validate))

    @r.get("/keys/{ref}", response_model=ApiKey, name="key.show")
    async def show_key(ref: str, sc: Scope = scope) -> ApiKey:
        return await svc.get_key(ref, sc)

    @r.patch("/keys/{ref}", response_model=ApiKey, name="key.update")
    async def update_key(ref: str, req: ApiKeyUpdate, sc: Scope = scope) -> ApiKey:
        return await svc.update_key(ref, req, sc)

    @r.post("/keys/{ref}/rotate", response_model=IssuedApiKey, name="key.rotate")
    async def rotate_key(ref: str, sc: Scope = scope) -> IssuedApiKey:
        return await svc.rotate_key(ref, sc)

    @r.delete("/keys/{ref}", status_code=204, response_model=None, name="key.delete")
    async def delete_key(ref: str, request: Request, sc: Scope = scope) -> Response:
        audit_resource(request, "key", await svc.delete_key(ref, sc))
        return Response(status_code=204)

    return r
