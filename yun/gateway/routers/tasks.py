"""Tasks: the long operations and their steps."""

from __future__ import annotations

from fastapi import Response

from yun.gateway.routers.common import (
    WAIT_MARGIN,
    Ctx,
    Listing,
    Up,
    UuidPath,
    Wait,
    answer,
    make_router,
)
from yun.proto.resources import Page, Task

router = make_router("tasks")


@router.get("/tasks", response_model=Page[Task])
async def list_tasks(ctx: Ctx, up: Up, listing: Listing) -> Response:
    """The project's tasks, newest first unless sorted otherwise."""
    return answer(await up.call(ctx, "GET", "/tasks", params=listing), Page[Task])


@router.get("/tasks/{task_uuid}", response_model=Task)
async def show_task(task_uuid: UuidPath, ctx: Ctx, up: Up, wait: Wait = 0) -> Response:
    """One task; with `wait`, answered when it ends or after `wait` seconds."""
    return answer(await up.call(ctx, "GET", "/tasks/{task_uuid}",
                                path={"task_uuid": task_uuid}, params={"wait": wait},
                                timeout=wait + WAIT_MARGIN), Task)
