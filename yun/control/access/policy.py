"""Scopes and permissions, computed from the signed request context."""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum
from typing import Any

from sqlalchemy import ColumnElement, false, select

from yun.control.db.models import ProjectRow
from yun.control.db.session import Database
from yun.proto.context import RequestContext
from yun.proto.errors import Forbidden, Unprocessable
from yun.proto.identity import Role


class Permission(IntEnum):
    """What an operation needs, each level including the ones below it."""

    READ = 1              # see a project's resources
    WRITE = 2             # create, change and delete a project's resources
    MANAGE_PROJECT = 3    # grant project roles, read the project's audit log
    MANAGE_DEPARTMENT = 4  # projects, users, quotas and role grants of a department
    MANAGE_PLATFORM = 5   # departments, nodes, super admins


# The highest permission each role gives within its scope.
ROLE_PERMISSION: dict[Role, Permission] = {
    Role.READER: Permission.READ,
    Role.MEMBER: Permission.WRITE,
    Role.PROJECT_ADMIN: Permission.MANAGE_PROJECT,
    Role.DEPARTMENT_ADMIN: Permission.MANAGE_DEPARTMENT,
    Role.SUPER_ADMIN: Permission.MANAGE_PLATFORM,
}

# The least role that gives each permission, to say what a refused caller lacks.
NEEDED_ROLE = {
    Permission.READ: Role.READER,
    Permission.WRITE: Role.MEMBER,
    Permission.MANAGE_PROJECT: Role.PROJECT_ADMIN,
    Permission.MANAGE_DEPARTMENT: Role.DEPARTMENT_ADMIN,
    Permission.MANAGE_PLATFORM: Role.SUPER_ADMIN,
}
_VERBS = {
    Permission.READ: "read this project's resources",
    Permission.WRITE: "change this project's resources",
    Permission.MANAGE_PROJECT: "manage this project",
    Permission.MANAGE_DEPARTMENT: "manage this department",
    Permission.MANAGE_PLATFORM: "administer the platform",
}


@dataclass(frozen=True)
class Scope:
    """The projects a request may see: ``projects`` None means every project."""

    context: RequestContext
    projects: frozenset[str] | None

    @property
    def everything(self) -> bool:
        return self.projects is None

    def clause(self, project_column: Any) -> ColumnElement[bool] | None:
        """The WHERE clause limiting ``project_column`` to this scope (None: no limit)."""
        if self.projects is None:
            return None
        if not self.projects:
            return false()
        return project_column.in_(sorted(self.projects))  # type: ignore[no-any-return]

    def admits(self, project_uuid: str | None) -> bool:
        return self.projects is None or (project_uuid is not None
                                         and project_uuid in self.projects)


async def scope_for(db: Database, ctx: RequestContext) -> Scope:
    """The projects ``ctx`` sees: all for a super admin; the departments' projects for a
    department admin; otherwise the one project the token is scoped to. Only a
    department admin's scope reads the database (every request builds a scope)."""
    if ctx.is_super_admin:
        return Scope(ctx, None)
    projects: set[str] = set()
    if ctx.project_uuid is not None and ctx.roles:
        projects.add(ctx.project_uuid)
    if ctx.admin_of_departments:
        async with db.reading() as session:
            rows = await session.scalars(select(ProjectRow.uuid).where(
                ProjectRow.department_uuid.in_(sorted(ctx.admin_of_departments))))
            projects.update(rows.all())
    return Scope(ctx, frozenset(projects))


def level(ctx: RequestContext) -> Permission | None:
    """The highest permission ``ctx`` has on its token's project."""
    levels = [ROLE_PERMISSION[r] for r in ctx.roles]
    return max(levels) if levels else None


def require(ctx: RequestContext, need: Permission, what: str = "") -> None:
    """Refuse (403) unless the caller's roles on its own project give ``need``."""
    have = level(ctx)
    if have is not None and have >= need:
        return
    roles = ", ".join(sorted(ctx.roles)) or "no role"
    where = f"project {ctx.project_name}" if ctx.project_name else "no project"
    raise Forbidden(f"user {ctx.user_name} ({roles} in {where}) may not "
                    f"{what or _VERBS[need]}: that needs the role {NEEDED_ROLE[need]}")


def require_project_write(ctx: RequestContext, what: str) -> str:
    """Refuse unless the caller may write in its project and its token names one (a
    resource made in "no project" would belong to nobody); the project's uuid.

    ``what`` says what is being done, e.g. ``"create VMs"``."""
    require(ctx, Permission.WRITE, what)
    if ctx.project_uuid is None:
        raise Unprocessable(f"this token is not scoped to a project; log in to a project "
                            f"to {what} in it")
    return ctx.project_uuid


def require_in_project(ctx: RequestContext, need: Permission, project_uuid: str | None,
                       project_department: str | None = None, what: str = "") -> None:
    """Refuse (403) unless the caller has ``need`` on the resource's project: super admins
    everywhere, department admins in their departments, others through their token's role."""
    if ctx.is_super_admin:
        return
    if project_department is not None and project_department in ctx.admin_of_departments \
            and need <= Permission.MANAGE_DEPARTMENT:
        return
    if project_uuid is not None and project_uuid != ctx.project_uuid:
        if project_department is None and ctx.admin_of_departments \
                and need <= Permission.MANAGE_DEPARTMENT:
            # Visible only through a department the caller administers (the scope says so).
            return
        raise Forbidden(f"user {ctx.user_name} may not {what or _VERBS[need]} in "
                        "that project")
    require(ctx, need, what)
