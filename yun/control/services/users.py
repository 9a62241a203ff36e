"""Users, their role grants, their API keys and their tokens (T-ID, U-SEC)."""

from __future__ import annotations

import logging
import uuid as uuidlib

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from yun.control.access.identity import (
    PLATFORM_SCOPE,
    department_scope,
    hash_password,
    new_access_key,
    project_scope,
)
from yun.control.access.policy import Permission, Scope, require_in_project
from yun.control.context import ControlContext
from yun.control.db.models import (
    ApiKeyRow,
    DepartmentRow,
    ProjectRow,
    RoleAssignmentRow,
    TokenRow,
    UserRow,
    utcnow,
)
from yun.control.db.tags import drop_tags, tags_of, update_tags
from yun.control.services.common import find
from yun.proto.context import RequestContext
from yun.proto.errors import Conflict, Forbidden, NotFound, Unprocessable
from yun.proto.identity import (
    PROJECT_ROLES,
    ApiKey,
    ApiKeyCreate,
    ApiKeyUpdate,
    IssuedApiKey,
    Role,
    RoleAssignment,
    RoleAssignmentCreate,
    RoleInfo,
    User,
    UserCreate,
    UserUpdate,
)
from yun.util.ids import canonical_uuid

log = logging.getLogger("yun.control.users")

ROLES = [
    RoleInfo(name=Role.SUPER_ADMIN, scope="platform",
             description="everything, on every department and project; nodes"),
    RoleInfo(name=Role.DEPARTMENT_ADMIN, scope="department",
             description="projects, users, quotas and role grants of one department, and every "
                         "resource of its projects"),
    RoleInfo(name=Role.PROJECT_ADMIN, scope="project",
             description="role grants and every resource of one project; its audit log"),
    RoleInfo(name=Role.MEMBER, scope="project",
             description="create, change and delete the resources of one project"),
    RoleInfo(name=Role.READER, scope="project", description="read the resources of one project"),
]


async def user_models(session: AsyncSession, rows: list[UserRow]) -> list[User]:
    names = dict((await session.execute(select(DepartmentRow.uuid, DepartmentRow.name).where(
        DepartmentRow.uuid.in_({r.department_uuid for r in rows})))).all())
    tags = await tags_of(session, [r.uuid for r in rows])
    out = []
    for row in rows:
        model = User.model_validate(row)
        model.tags, model.department_name = tags.get(row.uuid, {}), names.get(row.department_uuid)
        out.append(model)
    return out


async def assignment_models(session: AsyncSession, rows: list[RoleAssignmentRow]
                            ) -> list[RoleAssignment]:
    users = dict((await session.execute(select(UserRow.uuid, UserRow.name).where(
        UserRow.uuid.in_({r.user_uuid for r in rows})))).all())
    projects = dict((await session.execute(select(ProjectRow.uuid, ProjectRow.name).where(
        ProjectRow.uuid.in_({r.project_uuid for r in rows if r.project_uuid})))).all())
    departments = dict((await session.execute(select(DepartmentRow.uuid, DepartmentRow.name)
                                              .where(DepartmentRow.uuid.in_(
                                                  {r.department_uuid for r in rows
                                                   if r.department_uuid})))).all())
    return [RoleAssignment(
        uuid=r.uuid, user_uuid=r.user_uuid, user_name=users.get(r.user_uuid), role=Role(r.role),
        project_uuid=r.project_uuid, project_name=projects.get(r.project_uuid or ""),
        department_uuid=r.department_uuid,
        department_name=departments.get(r.department_uuid or ""), created_at=r.created_at)
        for r in rows]


def _admin_of(user: RequestContext, department_uuid: str) -> bool:
    return user.is_super_admin or department_uuid in user.admin_of_departments


class UserService:
    def __init__(self, ctx: ControlContext) -> None:
        self.ctx = ctx

    # -- users ---------------------------------------------------------------------------

    async def create_user(self, req: UserCreate, scope: Scope) -> User:
        me = scope.context
        async with self.ctx.db.session() as session:
            if req.department is not None:
                department = await find(session, DepartmentRow, req.department, "department",
                                        scope)
            else:
                found = await session.get(
                    DepartmentRow, me.project_department_uuid or me.department_uuid or "")
                if found is None:
                    raise Unprocessable("name the department of the new user")
                department = found
            if not _admin_of(me, department.uuid):
                raise Forbidden(f"user {me.user_name} is not an administrator of department "
                                f"{department.name} and may not create users in it")
            if (await session.scalars(select(UserRow.uuid).where(
                    UserRow.name == req.name))).first():
                raise Conflict(f"a user named '{req.name}' already exists")
            row = UserRow(uuid=str(uuidlib.uuid4()), name=req.name, description=req.description,
                          email=req.email, password_hash=await hash_password(req.password),
                          enabled=True, department_uuid=department.uuid)
            session.add(row)
            await update_tags(session, "user", row.uuid, req.tags)
            await session.flush()
            log.info("user created", extra={"user": row.uuid, "user_name": row.name,
                                            "department": department.uuid})
            return (await user_models(session, [row]))[0]

    async def get_user(self, ref: str, scope: Scope) -> User:
        async with self.ctx.db.reading() as session:
            row = await find(session, UserRow, ref, "user", scope)
            return (await user_models(session, [row]))[0]

    async def update_user(self, ref: str, req: UserUpdate, scope: Scope) -> User:
        me = scope.context
        async with self.ctx.db.session() as session:
            row = await find(session, UserRow, ref, "user", scope)
            is_self = row.uuid == me.user_uuid
            admin = _admin_of(me, row.department_uuid)
            if not admin and not is_self:
                raise Forbidden(f"user {me.user_name} may not change user {row.name}")
            if req.enabled is not None:
                if not admin or is_self:
                    raise Forbidden("a user cannot enable or disable themselves")
                row.enabled = req.enabled
            if req.password is not None:
                row.password_hash = await hash_password(req.password)
                # A new password ends every session made with the old one.
                for token in (await session.scalars(select(TokenRow).where(
                        TokenRow.user_uuid == row.uuid, TokenRow.revoked_at.is_(None)))):
                    token.revoked_at = utcnow()
            if req.description is not None:
                row.description = req.description
            if req.email is not None:
                row.email = req.email
            await session.flush()
            log.info("user changed", extra={"user": row.uuid, "user_name": row.name,
                                            "by": me.user_uuid})
            return (await user_models(session, [row]))[0]

    async def delete_user(self, ref: str, scope: Scope, cascade: bool) -> str:
        """Delete a user with their tokens and role grants; their API keys too when
        ``cascade``, else 409 while they have some."""
        me = scope.context
        async with self.ctx.db.session() as session:
            row = await find(session, UserRow, ref, "user", scope)
            if not _admin_of(me, row.department_uuid):
                raise Forbidden(f"user {me.user_name} may not delete user {row.name}")
            if row.uuid == me.user_uuid:
                raise Conflict("a user cannot delete themselves")
            keys = (await session.scalars(select(ApiKeyRow).where(
                ApiKeyRow.user_uuid == row.uuid))).all()
            if keys and not cascade:
                raise Conflict(f"user {row.name} still has API keys "
                               f"({', '.join(k.name for k in keys[:10])}); delete them first or "
                               "delete the user with cascade",
                               errors=[{"key": k.access_key, "name": k.name} for k in keys])
            for key in keys:
                await session.delete(key)
            await drop_tags(session, row.uuid)
            await session.delete(row)
            log.info("user deleted", extra={"user": row.uuid, "user_name": row.name,
                                            "keys_deleted": len(keys)})
            return row.uuid

    # -- role grants ---------------------------------------------------------------------

    async def grant(self, req: RoleAssignmentCreate, scope: Scope) -> RoleAssignment:
        me = scope.context
        async with self.ctx.db.session() as session:
            project = department = None
            if req.role in PROJECT_ROLES:
                if req.project is None or req.department is not None:
                    raise Unprocessable(f"role {req.role} is given on a project: name it, "
                                        "and no department")
                project = await find(session, ProjectRow, req.project, "project", scope)
                require_in_project(me, Permission.MANAGE_PROJECT, project.uuid,
                                   project.department_uuid,
                                   f"grant roles in project {project.name}")
                scope_key, dept_of_grant = project_scope(project.uuid), project.department_uuid
            elif req.role is Role.DEPARTMENT_ADMIN:
                if req.department is None or req.project is not None:
                    raise Unprocessable("role department_admin is given on a department: name "
                                        "it, and no project")
                department = await find(session, DepartmentRow, req.department, "department",
                                        scope)
                if not _admin_of(me, department.uuid):
                    raise Forbidden(f"user {me.user_name} may not make administrators of "
                                    f"department {department.name}")
                scope_key, dept_of_grant = department_scope(department.uuid), department.uuid
            else:
                if req.project is not None or req.department is not None:
                    raise Unprocessable("role super_admin is given on the platform: name no "
                                        "project or department")
                if not me.is_super_admin:
                    raise Forbidden("only a super admin may make super admins")
                scope_key, dept_of_grant = PLATFORM_SCOPE, None
            user = await self._grantee(session, req.user, me, dept_of_grant)
            row = (await session.scalars(select(RoleAssignmentRow).where(
                RoleAssignmentRow.user_uuid == user.uuid,
                RoleAssignmentRow.scope == scope_key))).first()
            if row is None:
                row = RoleAssignmentRow(uuid=str(uuidlib.uuid4()), user_uuid=user.uuid,
                                        scope=scope_key, role=req.role.value,
                                        project_uuid=project.uuid if project else None,
                                        department_uuid=department.uuid if department else None)
                session.add(row)
            else:
                row.role = req.role.value  # one role per scope: the new one replaces it
            try:
                await session.flush()
            except IntegrityError:
                raise Conflict(f"user {user.name} was given a role there at the same time; "
                               "retry") from None
            log.info("role granted", extra={"user": user.uuid, "role": req.role.value,
                                            "scope": scope_key, "by": me.user_uuid})
            return (await assignment_models(session, [row]))[0]

    @staticmethod
    async def _grantee(session: AsyncSession, ref: str, me: RequestContext,
                       department_uuid: str | None) -> UserRow:
        """The user a role is given to: any user for a super admin, else one of the
        department the grant is in (an administrator sees users before they are members)."""
        key = canonical_uuid(ref)
        query = select(UserRow).where((UserRow.uuid == key) if key else (UserRow.name == ref))
        if not me.is_super_admin and department_uuid is not None:
            query = query.where(UserRow.department_uuid == department_uuid)
        user = (await session.scalars(query)).first()
        if user is None:
            raise NotFound(f"no user '{ref}'")
        return user

    async def revoke(self, assignment_uuid: str, scope: Scope) -> str:
        me = scope.context
        async with self.ctx.db.session() as session:
            row = await find(session, RoleAssignmentRow, assignment_uuid, "role assignment",
                             scope)
            if row.project_uuid is not None:
                project = await session.get(ProjectRow, row.project_uuid)
                require_in_project(me, Permission.MANAGE_PROJECT, row.project_uuid,
                                   project.department_uuid if project else None)
            elif row.department_uuid is not None:
                if not _admin_of(me, row.department_uuid):
                    raise Forbidden(f"user {me.user_name} may not change that department's "
                                    "administrators")
            elif not me.is_super_admin:
                raise Forbidden("only a super admin may revoke a super admin")
            if row.user_uuid == me.user_uuid and row.scope == PLATFORM_SCOPE:
                raise Conflict("a super admin cannot revoke their own super admin role")
            await session.delete(row)
            log.info("role revoked", extra={"assignment": row.uuid, "user": row.user_uuid,
                                            "scope": row.scope, "by": me.user_uuid})
            return row.uuid

    # -- API keys ------------------------------------------------------------------------

    async def create_key(self, req: ApiKeyCreate, me: RequestContext) -> IssuedApiKey:
        if me.project_uuid is None:
            raise Unprocessable("an API key acts in one project: log in to that project first")
        async with self.ctx.db.session() as session:
            if (await session.scalars(select(ApiKeyRow.uuid).where(
                    ApiKeyRow.user_uuid == me.user_uuid, ApiKeyRow.name == req.name))).first():
                raise Conflict(f"you already have an API key named '{req.name}'")
            access, secret = new_access_key()
            row = ApiKeyRow(uuid=str(uuidlib.uuid4()), name=req.name,
                            description=req.description, access_key=access, secret=secret,
                            user_uuid=me.user_uuid, project_uuid=me.project_uuid, enabled=True)
            session.add(row)
            await session.flush()
            log.info("API key created", extra={"key": row.uuid, "access_key": access,
                                               "user": me.user_uuid, "project": me.project_uuid})
            return IssuedApiKey(**ApiKey.model_validate(row).model_dump(), secret=secret)

    async def get_key(self, ref: str, scope: Scope) -> ApiKey:
        async with self.ctx.db.reading() as session:
            return ApiKey.model_validate(await self._key(session, ref, scope))

    @staticmethod
    async def _key(session: AsyncSession, ref: str, scope: Scope) -> ApiKeyRow:
        rows = (await session.scalars(select(ApiKeyRow).where(
            ApiKeyRow.user_uuid == scope.context.user_uuid,
            (ApiKeyRow.uuid == ref) | (ApiKeyRow.name == ref) | (ApiKeyRow.access_key == ref)
        ))).all()
        if not rows:
            raise NotFound(f"no API key '{ref}'")
        return rows[0]

    async def update_key(self, ref: str, req: ApiKeyUpdate, scope: Scope) -> ApiKey:
        async with self.ctx.db.session() as session:
            row = await self._key(session, ref, scope)
            if req.enabled is not None:
                row.enabled = req.enabled
            if req.description is not None:
                row.description = req.description
            await session.flush()
            log.info("API key changed", extra={"key": row.uuid, "enabled": row.enabled})
            return ApiKey.model_validate(row)

    async def rotate_key(self, ref: str, scope: Scope) -> IssuedApiKey:
        async with self.ctx.db.session() as session:
            row = await self._key(session, ref, scope)
            _, row.secret = new_access_key()
            await session.flush()
            log.info("API key rotated", extra={"key": row.uuid, "access_key": row.access_key})
            return IssuedApiKey(**ApiKey.model_validate(row).model_dump(), secret=row.secret)

    async def delete_key(self, ref: str, scope: Scope) -> str:
        async with self.ctx.db.session() as session:
            row = await self._key(session, ref, scope)
            await session.delete(row)
            log.info("API key deleted", extra={"key": row.uuid, "access_key": row.access_key})
            return row.uuid

    # -- tokens --------------------------------------------------------------------------

    async def revoke_token(self, token_uuid: str, scope: Scope) -> None:
        async with self.ctx.db.session() as session:
            row = await find_token(session, token_uuid, scope)
            if row.revoked_at is None:
                row.revoked_at = utcnow()
            log.info("token revoked", extra={"token": row.uuid, "user": row.user_uuid})


async def find_token(session: AsyncSession, token_uuid: str, scope: Scope) -> TokenRow:
    key = canonical_uuid(token_uuid)
    row = await session.get(TokenRow, key) if key else None
    if row is None or row.user_uuid != scope.context.user_uuid:
        raise NotFound(f"no token {token_uuid}")
    return row
