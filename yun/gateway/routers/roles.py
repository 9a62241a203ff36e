"""Roles and who holds them."""

from __future__ import annotations

from fastapi import Response

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
from yun.proto.identity import RoleAssignment, RoleAssignmentCreate, RoleInfo
from yun.proto.resources import Page

router = make_router("roles")


@router.get("/roles", response_model=list[RoleInfo])
async def list_roles(ctx: Ctx, up: Up) -> Response:
    """The roles of the platform, their scope and what they allow."""
    return answer(await up.call(ctx, "GET", "/roles"), list[RoleInfo])


@router.get("/role-assignments", response_model=Page[RoleAssignment])
async def list_role_assignments(ctx: Ctx, up: Up, listing: Listing) -> Response:
    """Role assignments the caller may see."""
    return answer(await up.call(ctx, "GET", "/role-assignments", params=listing),
                  Page[RoleAssignment])


@router.post("/role-assignments", response_model=RoleAssignment, status_code=201)
async def assign_role(body: RoleAssignmentCreate, ctx: Ctx, up: Up, auth: Auth,
                      idempotency_key: IdempotencyKey = None) -> Response:
    """Give a user a role: a project role on a project (project administrator and above),
    `department_admin` on a department, `super_admin` (super administrator)."""
    reply = await up.call(ctx, "POST", "/role-assignments", body=body,
                          idempotency_key=idempotency_key)
    auth.forget_all()  # cached credentials carry the roles; let them change now
    return answer(reply, RoleAssignment)


@router.delete("/role-assignments/{assignment_uuid}", status_code=204)
async def unassign_role(assignment_uuid: UuidPath, ctx: Ctx, up: Up, auth: Auth,
                        idempotency_key: IdempotencyKey = None) -> Response:
    """Take a role assignment back."""
    reply = await up.call(ctx, "DELETE", "/role-assignments/{assignment_uuid}",
                          path={"assignment_uuid": assignment_uuid},
                          idempotency_key=idempotency_key)
    auth.forget_all()
    return answer(reply, None)
