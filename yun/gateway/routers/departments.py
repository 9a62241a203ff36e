"""Departments: the super administrator's division of users and projects."""

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
from yun.proto.identity import Department, DepartmentCreate, DepartmentUpdate
from yun.proto.resources import Page

router = make_router("departments")


@router.get("/departments", response_model=Page[Department])
async def list_departments(ctx: Ctx, up: Up, listing: Listing) -> Response:
    """Departments: all of them for the super administrator, a department administrator's
    own otherwise."""
    return answer(await up.call(ctx, "GET", "/departments", params=listing), Page[Department])


@router.post("/departments", response_model=Department, status_code=201)
async def create_department(body: DepartmentCreate, ctx: Ctx, up: Up,
                            idempotency_key: IdempotencyKey = None) -> Response:
    """Create a department (super administrator)."""
    return answer(await up.call(ctx, "POST", "/departments", body=body,
                                idempotency_key=idempotency_key), Department)


@router.get("/departments/{ref}", response_model=Department)
async def show_department(ref: RefPath, ctx: Ctx, up: Up) -> Response:
    """One department, by uuid or name."""
    return answer(await up.call(ctx, "GET", "/departments/{ref}", path={"ref": ref}),
                  Department)


@router.patch("/departments/{ref}", response_model=Department)
async def update_department(ref: RefPath, body: DepartmentUpdate, ctx: Ctx, up: Up,
                            idempotency_key: IdempotencyKey = None) -> Response:
    """Change a department's description."""
    return answer(await up.call(ctx, "PATCH", "/departments/{ref}", path={"ref": ref},
                                body=body, idempotency_key=idempotency_key), Department)


@router.delete("/departments/{ref}", status_code=204)
async def delete_department(ref: RefPath, ctx: Ctx, up: Up,
                            idempotency_key: IdempotencyKey = None) -> Response:
    """Delete an empty department; refused (409) while it holds projects or users."""
    return answer(await up.call(ctx, "DELETE", "/departments/{ref}", path={"ref": ref},
                                idempotency_key=idempotency_key), None)
