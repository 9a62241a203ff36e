"""Which rows of each table a scope sees. One function, so no finder forgets a case."""

from __future__ import annotations

from typing import Any

from sqlalchemy import ColumnElement, false, or_, select, true

from yun.control.access.policy import Scope
from yun.control.db.models import (
    AddressPoolRow,
    ApiKeyRow,
    AuditRow,
    DepartmentRow,
    EventRow,
    FlowRow,
    ImageRow,
    NodeRow,
    PoolRow,
    ProjectRow,
    PublicIpRow,
    RoleAssignmentRow,
    SshKeyRow,
    TokenRow,
    UserRow,
    VmGroupRow,
    VmRow,
    VolumeRow,
    ZoneRow,
)
from yun.proto.identity import Role


def visible(model: Any, scope: Scope) -> ColumnElement[bool]:
    """The WHERE clause restricting ``model`` to what ``scope`` may see."""
    ctx = scope.context
    if scope.everything:
        return true()
    if model in (ZoneRow, PoolRow, AddressPoolRow):
        return true()  # every user chooses where VMs go; only administrators change them
    if model in (VmRow, FlowRow, VmGroupRow, PublicIpRow, VolumeRow):
        return scope.clause(model.project_uuid)  # type: ignore[return-value]
    if model is ImageRow:
        return or_(ImageRow.visibility == "public",
                   scope.clause(ImageRow.project_uuid))  # type: ignore[arg-type]
    if model is ProjectRow:
        return scope.clause(ProjectRow.uuid)  # type: ignore[return-value]
    if model in (NodeRow, EventRow):  # administrators only (scope.everything)
        return false()
    if model is DepartmentRow:
        own = {d for d in (ctx.department_uuid, ctx.project_department_uuid) if d}
        return DepartmentRow.uuid.in_(sorted(own | ctx.admin_of_departments))
    if model is UserRow:
        seen = [UserRow.uuid == ctx.user_uuid]
        if ctx.admin_of_departments:
            seen.append(UserRow.department_uuid.in_(sorted(ctx.admin_of_departments)))
        if ctx.project_uuid and Role.PROJECT_ADMIN in ctx.roles:
            seen.append(UserRow.uuid.in_(select(RoleAssignmentRow.user_uuid).where(
                RoleAssignmentRow.project_uuid == ctx.project_uuid)))
        return or_(*seen)
    if model is RoleAssignmentRow:
        seen = [RoleAssignmentRow.user_uuid == ctx.user_uuid]
        if ctx.admin_of_departments:
            seen.append(RoleAssignmentRow.department_uuid.in_(sorted(ctx.admin_of_departments)))
            seen.append(RoleAssignmentRow.project_uuid.in_(select(ProjectRow.uuid).where(
                ProjectRow.department_uuid.in_(sorted(ctx.admin_of_departments)))))
        if ctx.project_uuid and Role.PROJECT_ADMIN in ctx.roles:
            seen.append(RoleAssignmentRow.project_uuid == ctx.project_uuid)
        return or_(*seen)
    if model in (ApiKeyRow, TokenRow, SshKeyRow):
        return model.user_uuid == ctx.user_uuid  # type: ignore[no-any-return]
    if model is AuditRow:
        admin_projects = set()
        if ctx.project_uuid and Role.PROJECT_ADMIN in ctx.roles:
            admin_projects.add(ctx.project_uuid)
        if ctx.admin_of_departments:
            admin_projects |= set(scope.projects or ())
        return AuditRow.project_uuid.in_(sorted(admin_projects)) if admin_projects \
            else false()
    raise TypeError(f"no visibility rule for {model.__name__}")
