"""Users of the platform."""

from __future__ import annotations

from fastapi import Response

from yun.gateway.routers.common import (
    Auth,
    Cascade,
    Ctx,
    IdempotencyKey,
    Listing,
    RefPath,
    Up,
    answer,
    make_router,
)
from yun.proto.identity import User, UserCreate, UserUpdate
from yun.proto.resources import Page

router = make_router("users")


@router.get("/users", response_model=Page[User])
async def list_users(ctx: Ctx, up: Up, listing: Listing) -> Response:
    """Users: of the caller's department for its administrator, the project's members for
    a project administrator."""
    return answer(await up.call(ctx, "GET", "/users", params=listing), Page[User])


@router.post("/users", response_model=User, status_code=201)
async def create_user(body: UserCreate, ctx: Ctx, up: Up,
                      idempotency_key: IdempotencyKey = None) -> Response:
    """Create a user in a department (department administrator)."""
    return answer(await up.call(ctx, "POST", "/users", body=body,
                                idempotency_key=idempotency_key), User)


@router.get("/users/{ref}", response_model=User)
async def show_user(ref: RefPath, ctx: Ctx, up: Up) -> Response:
    """One user, by uuid or name."""
    return answer(await up.call(ctx, "GET", "/users/{ref}", path={"ref": ref}), User)


@router.patch("/users/{ref}", response_model=User)
async def update_user(ref: RefPath, body: UserUpdate, ctx: Ctx, up: Up, auth: Auth,
                      idempotency_key: IdempotencyKey = None) -> Response:
    """Change a user (department administrator); users may change their own password."""
    reply = await up.call(ctx, "PATCH", "/users/{ref}", path={"ref": ref}, body=body,
                          idempotency_key=idempotency_key)
    if body.enabled is False or body.password is not None:
        auth.forget_all()  # a disabled user's cached credentials must stop working now
    return answer(reply, User)


@router.delete("/users/{ref}", status_code=204)
async def delete_user(ref: RefPath, ctx: Ctx, up: Up, auth: Auth, cascade: Cascade = False,
                      idempotency_key: IdempotencyKey = None) -> Response:
    """Delete a user; refused (409) while they have API keys unless `cascade=true`."""
    reply = await up.call(ctx, "DELETE", "/users/{ref}", path={"ref": ref},
                          params={"cascade": cascade}, idempotency_key=idempotency_key)
    auth.forget_all()
    return answer(reply, None)
