"""Departments and projects (T-ID): the tenancy tree every resource hangs from."""

from __future__ import annotations

import logging
import uuid as uuidlib

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from yun.control.access.policy import Permission, Scope, require, require_in_project
from yun.control.allocators import quotas
from yun.control.context import ControlContext
from yun.control.db.models import DepartmentRow, ImageRow, ProjectRow, UserRow, VmRow
from yun.control.db.tags import drop_tags, tags_of, update_tags
from yun.control.services.common import find
from yun.control.services.tasks import task_model
from yun.proto.context import RequestContext
from yun.proto.errors import Conflict, Forbidden, Unprocessable
from yun.proto.identity import (
    Department,
    DepartmentCreate,
    DepartmentUpdate,
    Project,
    ProjectCreate,
    ProjectUpdate,
    Quota,
    QuotaUpdate,
)
from yun.proto.resources import Accepted

log = logging.getLogger("yun.control.projects")


async def department_models(session: AsyncSession, rows: list[DepartmentRow]
                            ) -> list[Department]:
    uuids = [r.uuid for r in rows]
    projects = dict((await session.execute(
        select(ProjectRow.department_uuid, func.count()).where(
            ProjectRow.department_uuid.in_(uuids)).group_by(ProjectRow.department_uuid)
    )).all())
    users = dict((await session.execute(
        select(UserRow.department_uuid, func.count()).where(
            UserRow.department_uuid.in_(uuids)).group_by(UserRow.department_uuid)
    )).all())
    tags = await tags_of(session, uuids)
    out = []
    for row in rows:
        model = Department.model_validate(row)
        model.tags = tags.get(row.uuid, {})
        model.project_count, model.user_count = projects.get(row.uuid, 0), users.get(row.uuid, 0)
        out.append(model)
    return out


async def project_models(session: AsyncSession, rows: list[ProjectRow]) -> list[Project]:
    names = dict((await session.execute(select(DepartmentRow.uuid, DepartmentRow.name).where(
        DepartmentRow.uuid.in_({r.department_uuid for r in rows})))).all())
    tags = await tags_of(session, [r.uuid for r in rows])
    out = []
    for row in rows:
        model = Project.model_validate(row)
        model.tags = tags.get(row.uuid, {})
        model.department_name = names.get(row.department_uuid)
        out.append(model)
    return out


def _require_department_admin(user: RequestContext, department_uuid: str, what: str) -> None:
    if user.is_super_admin or department_uuid in user.admin_of_departments:
        return
    raise Forbidden(f"user {user.user_name} is not an administrator of that department "
                    f"and may not {what}")


class ProjectService:
    def __init__(self, ctx: ControlContext) -> None:
        self.ctx = ctx

    # -- departments ---------------------------------------------------------------------

    async def create_department(self, req: DepartmentCreate, user: RequestContext
                                ) -> Department:
        require(user, Permission.MANAGE_PLATFORM, f"create department {req.name}")
        async with self.ctx.db.session() as session:
            await _unique_name(session, DepartmentRow, req.name, "department")
            row = DepartmentRow(uuid=str(uuidlib.uuid4()), name=req.name,
                                description=req.description)
            session.add(row)
            await update_tags(session, "department", row.uuid, req.tags)
            await session.flush()
            log.info("department created", extra={"department": row.uuid,
                                                  "department_name": row.name})
            return (await department_models(session, [row]))[0]

    async def get_department(self, ref: str, scope: Scope) -> Department:
        async with self.ctx.db.reading() as session:
            row = await find(session, DepartmentRow, ref, "department", scope)
            return (await department_models(session, [row]))[0]

    async def update_department(self, ref: str, req: DepartmentUpdate, scope: Scope
                                ) -> Department:
        require(scope.context, Permission.MANAGE_PLATFORM, "change departments")
        async with self.ctx.db.session() as session:
            row = await find(session, DepartmentRow, ref, "department", scope)
            if req.description is not None:
                row.description = req.description
            await session.flush()
            return (await department_models(session, [row]))[0]

    async def delete_department(self, ref: str, scope: Scope) -> str:
        """Delete an empty department (its projects and users go first: 409 lists them)."""
        require(scope.context, Permission.MANAGE_PLATFORM, "delete departments")
        async with self.ctx.db.session() as session:
            row = await find(session, DepartmentRow, ref, "department", scope)
            projects = (await session.scalars(select(ProjectRow.name).where(
                ProjectRow.department_uuid == row.uuid).limit(20))).all()
            users = (await session.scalars(select(UserRow.name).where(
                UserRow.department_uuid == row.uuid).limit(20))).all()
            if projects or users:
                raise Conflict(
                    f"department {row.name} still holds projects ({', '.join(projects) or '-'}) "
                    f"and users ({', '.join(users) or '-'}); delete them first",
                    errors=[{"project": p} for p in projects] + [{"user": u} for u in users])
            await drop_tags(session, row.uuid)
            await session.delete(row)
            log.info("department deleted", extra={"department": row.uuid})
            return row.uuid

    # -- projects ------------------------------------------------------------------------

    async def create_project(self, req: ProjectCreate, scope: Scope) -> Project:
        user = scope.context
        async with self.ctx.db.session() as session:
            if req.department is not None:
                department = await find(session, DepartmentRow, req.department, "department",
                                        scope)
            else:
                own = user.project_department_uuid or user.department_uuid
                found = await session.get(DepartmentRow, own) if own else None
                if found is None:
                    raise Unprocessable("name the department of the new project")
                department = found
            _require_department_admin(user, department.uuid, f"create project {req.name}")
            await _unique_name(session, ProjectRow, req.name, "project")
            row = ProjectRow(uuid=str(uuidlib.uuid4()), name=req.name,
                             description=req.description, department_uuid=department.uuid)
            session.add(row)
            await session.flush()
            await quotas.create_quota(session, row.uuid, self.ctx.settings.default_quota())
            await update_tags(session, "project", row.uuid, req.tags)
            log.info("project created", extra={"project": row.uuid, "project_name": row.name,
                                               "department": department.uuid})
            return (await project_models(session, [row]))[0]

    async def get_project(self, ref: str, scope: Scope) -> Project:
        async with self.ctx.db.reading() as session:
            row = await find(session, ProjectRow, ref, "project", scope)
            return (await project_models(session, [row]))[0]

    async def update_project(self, ref: str, req: ProjectUpdate, scope: Scope) -> Project:
        async with self.ctx.db.session() as session:
            row = await find(session, ProjectRow, ref, "project", scope)
            require_in_project(scope.context, Permission.MANAGE_PROJECT, row.uuid,
                               row.department_uuid, f"change project {row.name}")
            if req.description is not None:
                row.description = req.description
            await session.flush()
            return (await project_models(session, [row]))[0]

    async def quota(self, ref: str | None, scope: Scope) -> Quota:
        async with self.ctx.db.reading() as session:
            if ref is None:
                if scope.context.project_uuid is None:
                    raise Unprocessable("this token is not scoped to a project; name one")
                ref = scope.context.project_uuid
            row = await find(session, ProjectRow, ref, "project", scope)
            return await quotas.quota_of(session, row)

    async def set_quota(self, ref: str, req: QuotaUpdate, scope: Scope) -> Quota:
        async with self.ctx.db.session() as session:
            row = await find(session, ProjectRow, ref, "project", scope)
            _require_department_admin(scope.context, row.department_uuid,
                                      f"set the quota of project {row.name}")
            return await quotas.set_limits(session, row, req.limits)

    async def delete_project(self, ref: str, scope: Scope, cascade: bool
                             ) -> tuple[str, Accepted | None]:
        """Delete a project. Without ``cascade`` it must hold no VM or image (409 lists
        them); with it, a task deletes them through their own flows, then the project."""
        async with self.ctx.db.session() as session:
            row = await find(session, ProjectRow, ref, "project", scope)
            _require_department_admin(scope.context, row.department_uuid,
                                      f"delete project {row.name}")
            vms = (await session.scalars(select(VmRow.name).where(
                VmRow.project_uuid == row.uuid).limit(50))).all()
            images = (await session.scalars(select(ImageRow.name).where(
                ImageRow.project_uuid == row.uuid).limit(50))).all()
            if not cascade:
                if vms or images:
                    raise Conflict(
                        f"project {row.name} still holds VMs ({', '.join(vms[:10]) or '-'}) and "
                        f"images ({', '.join(images[:10]) or '-'}); delete them first or "
                        "delete the project with cascade",
                        errors=[{"vm": v} for v in vms] + [{"image": i} for i in images])
                await _delete_project_row(session, row)
                return row.uuid, None
            flow = self.ctx.engine.new_flow(session, "project.delete", row.uuid, {},
                                            project_uuid=None)
            await session.flush()
            accepted = Accepted(task=task_model(flow), resource=(await project_models(
                session, [row]))[0].model_dump(mode="json"))
        self.ctx.engine.launch(flow.uuid, row.uuid)
        return row.uuid, accepted


async def _delete_project_row(session: AsyncSession, row: ProjectRow) -> None:
    await drop_tags(session, row.uuid)
    await session.delete(row)
    log.info("project deleted", extra={"project": row.uuid, "project_name": row.name})


async def _unique_name(session: AsyncSession, model: type, name: str, what: str) -> None:
    taken = (await session.scalars(select(model.uuid).where(  # type: ignore[attr-defined]
        model.name == name))).first()  # type: ignore[attr-defined]
    if taken is not None:
        raise Conflict(f"a {what} named '{name}' already exists")
