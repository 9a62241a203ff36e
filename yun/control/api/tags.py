"""Tags of every kind of resource (Z-TAG): read, replace and change them."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, Request
from sqlalchemy.ext.asyncio import AsyncSession

from yun.control.access.policy import Permission, Scope, require, require_in_project
from yun.control.api.bundle import ApiBundle
from yun.control.api.routing import audit_resource
from yun.control.db.models import DepartmentRow, ImageRow, NodeRow, ProjectRow, UserRow, VmRow
from yun.control.db.tags import replace_user_tags, tags_of, update_tags
from yun.control.services.common import find
from yun.proto.errors import Forbidden
from yun.proto.resources import TagsReplace, TagsUpdate


def _project_write(scope: Scope, row: Any) -> None:
    require_in_project(scope.context, Permission.WRITE, row.project_uuid,
                       what=f"tag {row.name}")


def _platform(scope: Scope, row: Any) -> None:
    require(scope.context, Permission.MANAGE_PLATFORM, f"tag {row.name}")


def _department_admin(department_of: Callable[[Any], str]) -> Callable[[Scope, Any], None]:
    def check(scope: Scope, row: Any) -> None:
        ctx = scope.context
        if not (ctx.is_super_admin or department_of(row) in ctx.admin_of_departments):
            raise Forbidden(f"user {ctx.user_name} may not tag {row.name}")
    return check


@dataclass(frozen=True)
class Taggable:
    model: Any
    what: str
    resource_type: str
    may_change: Callable[[Scope, Any], None]


TAGGABLE: dict[str, Taggable] = {
    "vms": Taggable(VmRow, "VM", "vm", _project_write),
    "images": Taggable(ImageRow, "image", "image", _project_write),
    "nodes": Taggable(NodeRow, "node", "node", _platform),
    "projects": Taggable(ProjectRow, "project", "project",
                         _department_admin(lambda r: r.department_uuid)),
    "users": Taggable(UserRow, "user", "user", _department_admin(lambda r: r.department_uuid)),
    "departments": Taggable(DepartmentRow, "department", "department", _platform),
}


def tag_router(api: ApiBundle) -> APIRouter:
    r = api.router("tags")
    scope = api.scope

    async def _with(kind: Taggable, ref: str, sc: Scope, request: Request | None,
                    change: Callable[[AsyncSession, Any], Awaitable[dict[str, str]]] | None
                    ) -> dict[str, Any]:
        async with api.ctx.db.session() as session:
            if kind.model is NodeRow:
                require(sc.context, Permission.MANAGE_PLATFORM, "see nodes")
            row = await find(session, kind.model, ref, kind.what, sc)
            if change is None:
                return {"tags": (await tags_of(session, [row.uuid]))[row.uuid]}
            kind.may_change(sc, row)
            if request is not None:
                audit_resource(request, kind.resource_type, row.uuid,
                               getattr(row, "project_uuid", None))
            return {"tags": await change(session, row)}

    for path, kind in TAGGABLE.items():
        def routes(path: str = path, kind: Taggable = kind) -> None:
            @r.get(f"/{path}/{{ref}}/tags", name=f"{kind.resource_type}.tags")
            async def get_tags(ref: str, sc: Scope = scope) -> dict[str, Any]:
                return await _with(kind, ref, sc, None, None)

            @r.put(f"/{path}/{{ref}}/tags", name=f"{kind.resource_type}.replace_tags")
            async def put_tags(ref: str, body: TagsReplace, request: Request,
                               sc: Scope = scope) -> dict[str, Any]:
                async def change(session: AsyncSession, row: Any) -> dict[str, str]:
                    return await replace_user_tags(session, kind.resource_type, row.uuid,
                                                   body.tags)
                return await _with(kind, ref, sc, request, change)

            @r.patch(f"/{path}/{{ref}}/tags", name=f"{kind.resource_type}.update_tags")
            async def patch_tags(ref: str, body: TagsUpdate, request: Request,
                                 sc: Scope = scope) -> dict[str, Any]:
                async def change(session: AsyncSession, row: Any) -> dict[str, str]:
                    return await update_tags(session, kind.resource_type, row.uuid, body.set,
                                             body.remove)
                return await _with(kind, ref, sc, request, change)
        routes()

    return r
