"""Task routes of the control server's user API."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from yun.control.access.policy import Scope
from yun.control.api.bundle import ApiBundle
from yun.control.api.deps import Listing
from yun.control.services.listing import each, listed
from yun.control.services.tasks import get_task, task_model
from yun.proto.resources import Page, Task, TaskState

ENDED = frozenset({TaskState.SUCCEEDED, TaskState.FAILED})


def task_router(api: ApiBundle) -> APIRouter:
    r = api.router("tasks")
    scope = api.scope

    @r.get("/tasks", response_model=Page[Task], name="task.list")
    async def list_tasks(params: Listing, sc: Scope = scope) -> Page[Task]:
        return await listed(api.ctx.db, "task", sc, params, each(task_model))

    @r.get("/tasks/{task_uuid}", response_model=Task, name="task.show")
    async def show_task(task_uuid: str, sc: Scope = scope,
                        wait: Annotated[float, Query(ge=0, le=600)] = 0) -> Task:
        async with api.ctx.db.reading() as session:
            task = task_model(await get_task(session, task_uuid, sc))
        if not wait or task.state in ENDED:  # nothing to wait for: no second read
            return task
        await api.ctx.engine.wait(task.uuid, wait)
        async with api.ctx.db.reading() as session:
            return task_model(await get_task(session, task.uuid, sc))

    return r
