"""Projects, their quotas and their cascading deletion."""

from __future__ import annotations

from fastapi import Response

from yun.gateway.routers.common import (
    Cascade,
    Ctx,
    IdempotencyKey,
    Listing,
    RefPath,
    Up,
    Wait,
    accepted,
    answer,
    make_router,
)
from yun.proto.identity import Project, ProjectCreate, ProjectUpdate, Quota, QuotaUpdate
from yun.proto.resources import Accepted, Page

router = make_router("projects")


@router.get("/projects", response_model=Page[Project])
async def list_projects(ctx: Ctx, up: Up, listing: Listing) -> Response:
    """The projects the caller may see."""
    return answer(await up.call(ctx, "GET", "/projects", params=listing), Page[Project])


@router.post("/projects", response_model=Project, status_code=201)
async def create_project(body: ProjectCreate, ctx: Ctx, up: Up,
                         idempotency_key: IdempotencyKey = None) -> Response:
    """Create a project in a department (department administrator)."""
    return answer(await up.call(ctx, "POST", "/projects", body=body,
                                idempotency_key=idempotency_key), Project)


@router.get("/projects/{ref}", response_model=Project)
async def show_project(ref: RefPath, ctx: Ctx, up: Up) -> Response:
    """One project, by uuid or name."""
    return answer(await up.call(ctx, "GET", "/projects/{ref}", path={"ref": ref}), Project)


@router.patch("/projects/{ref}", response_model=Project)
async def update_project(ref: RefPath, body: ProjectUpdate, ctx: Ctx, up: Up,
                         idempotency_key: IdempotencyKey = None) -> Response:
    """Change a project's description."""
    return answer(await up.call(ctx, "PATCH", "/projects/{ref}", path={"ref": ref},
                                body=body, idempotency_key=idempotency_key), Project)


@router.delete("/projects/{ref}", status_code=204, responses={
    202: {"model": Accepted, "description": "with `cascade=true`: a task deletes the "
                                            "project's VMs and images, then the project"}})
async def delete_project(ref: RefPath, ctx: Ctx, up: Up, cascade: Cascade = False,
                         wait: Wait = 0, idempotency_key: IdempotencyKey = None) -> Response:
    """Delete a project. Without `cascade` it must be empty (else 409 lists what it
    holds); with `cascade=true` a task deletes its VMs and images through their flows."""
    reply = await up.call(ctx, "DELETE", "/projects/{ref}", path={"ref": ref},
                          params={"cascade": cascade}, idempotency_key=idempotency_key)
    return await accepted(up, ctx, reply, wait)


@router.get("/projects/{ref}/quota", response_model=Quota)
async def show_project_quota(ref: RefPath, ctx: Ctx, up: Up) -> Response:
    """A project's limits and what it uses (members of the project and its administrators)."""
    return answer(await up.call(ctx, "GET", "/projects/{ref}/quota", path={"ref": ref}),
                  Quota)


@router.put("/projects/{ref}/quota", response_model=Quota)
async def set_project_quota(ref: RefPath, body: QuotaUpdate, ctx: Ctx, up: Up,
                            idempotency_key: IdempotencyKey = None) -> Response:
    """Set a project's limits (department administrator); -1 is unlimited."""
    return answer(await up.call(ctx, "PUT", "/projects/{ref}/quota", path={"ref": ref},
                                body=body, idempotency_key=idempotency_key), Quota)
