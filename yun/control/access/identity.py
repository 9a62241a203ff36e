"""Identity (T-ID): password logins, tokens, API key pairs, and who a credential is.

Passwords are hashed with Argon2id; a token's secret is kept only as its sha256 (it is
random and long, so a slow hash adds nothing); an API key's secret is kept as is,
because every signed request is verified by recomputing its HMAC.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import secrets
import uuid as uuidlib
from datetime import UTC, datetime, timedelta
from pathlib import Path

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from yun.control.db.models import (
    ApiKeyRow,
    ProjectRow,
    RoleAssignmentRow,
    TokenRow,
    UserRow,
    utcnow,
)
from yun.control.db.session import Database
from yun.proto.context import AuthResult, KeyAuthResult, RequestContext
from yun.proto.errors import Unauthorized
from yun.proto.identity import IssuedToken, Role, TokenCreate

log = logging.getLogger("yun.control.identity")

TOKEN_PREFIX = "yun"
PLATFORM_SCOPE = "platform"
_hasher = PasswordHasher()
# A hash to verify against when the user does not exist, so that a login for an unknown
# name takes as long as one with a wrong password.
_DUMMY_HASH = _hasher.hash(secrets.token_urlsafe(16))


def project_scope(project_uuid: str) -> str:
    return f"project:{project_uuid}"


def department_scope(department_uuid: str) -> str:
    return f"department:{department_uuid}"


async def hash_password(password: str) -> str:
    """Argon2id, off the event loop: a hash costs tens of milliseconds of CPU."""
    return await asyncio.to_thread(_hasher.hash, password)


async def password_matches(password_hash: str, password: str) -> bool:
    def verify() -> bool:
        try:
            return _hasher.verify(password_hash, password)
        except (VerificationError, InvalidHashError):
            return False
    return await asyncio.to_thread(verify)


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def new_access_key() -> tuple[str, str]:
    """A fresh (access key, secret) pair."""
    return "YK" + secrets.token_hex(10).upper(), secrets.token_urlsafe(32)


async def context_for(session: AsyncSession, user: UserRow, project: ProjectRow | None,
                      auth: str, credential_id: str) -> RequestContext:
    """What ``user`` may do when scoped to ``project``: their roles there, the
    departments they administer, and super admin if granted on the platform."""
    rows = (await session.scalars(select(RoleAssignmentRow).where(
        RoleAssignmentRow.user_uuid == user.uuid))).all()
    roles: set[Role] = set()
    admin_of = frozenset(r.department_uuid for r in rows
                         if r.role == Role.DEPARTMENT_ADMIN and r.department_uuid)
    for row in rows:
        if row.scope == PLATFORM_SCOPE:
            roles.add(Role(row.role))
        elif project is not None and row.project_uuid == project.uuid:
            roles.add(Role(row.role))
    if project is not None and project.department_uuid in admin_of:
        roles.add(Role.DEPARTMENT_ADMIN)
    return RequestContext(
        user_uuid=user.uuid, user_name=user.name, department_uuid=user.department_uuid,
        project_uuid=project.uuid if project else None,
        project_name=project.name if project else None,
        project_department_uuid=project.department_uuid if project else None,
        roles=frozenset(roles), admin_of_departments=admin_of, auth=auth,
        credential_id=credential_id)


class IdentityService:
    def __init__(self, db: Database) -> None:
        self.db = db

    async def login(self, req: TokenCreate, source_ip: str | None) -> IssuedToken:
        """Check a password and issue a token scoped to one project."""
        async with self.db.session() as session:
            user = (await session.scalars(
                select(UserRow).where(UserRow.name == req.username))).first()
            ok = await password_matches(user.password_hash if user else _DUMMY_HASH,
                                        req.password)
            if user is None or not ok:
                log.warning("login refused", extra={"user_name": req.username[:63],
                                                    "source_ip": source_ip})
                raise Unauthorized("wrong user name or password")
            if not user.enabled:
                raise Unauthorized(f"user {user.name} is disabled")
            project = await self._login_project(session, user, req.project)
            ctx = await context_for(session, user, project, "token", "")
            if project is not None and not ctx.roles:
                raise Unauthorized(f"user {user.name} has no role in project {project.name}")
            if project is None and not (ctx.is_super_admin or ctx.admin_of_departments):
                raise Unauthorized(f"user {user.name} belongs to no project yet; ask an "
                                   "administrator for a role in one")
            secret = secrets.token_urlsafe(32)
            row = TokenRow(uuid=str(uuidlib.uuid4()), user_uuid=user.uuid,
                           project_uuid=project.uuid if project else None,
                           secret_sha256=_sha256(secret), created_at=utcnow(),
                           expires_at=utcnow() + timedelta(seconds=req.ttl))
            session.add(row)
            await session.flush()
            log.info("token issued", extra={"user": user.uuid, "user_name": user.name,
                                            "project": row.project_uuid, "token": row.uuid,
                                            "source_ip": source_ip})
            return IssuedToken(
                uuid=row.uuid, user_uuid=user.uuid, project_uuid=row.project_uuid,
                created_at=row.created_at, expires_at=row.expires_at,
                token=f"{TOKEN_PREFIX}_{uuidlib.UUID(row.uuid).hex}_{secret}",
                user_name=user.name, project_name=project.name if project else None)

    @staticmethod
    async def _login_project(session: AsyncSession, user: UserRow, ref: str | None
                             ) -> ProjectRow | None:
        if ref is not None:
            project = (await session.scalars(select(ProjectRow).where(
                (ProjectRow.uuid == ref) | (ProjectRow.name == ref)))).first()
            if project is None:
                raise Unauthorized(f"no project '{ref}' for user {user.name}")
            return project
        # The first project the user has a role in, else none (admins may work unscoped).
        return (await session.scalars(
            select(ProjectRow).join(RoleAssignmentRow,
                                    RoleAssignmentRow.project_uuid == ProjectRow.uuid)
            .where(RoleAssignmentRow.user_uuid == user.uuid)
            .order_by(RoleAssignmentRow.created_at).limit(1))).first()

    async def verify_token(self, token: str) -> AuthResult:
        """The context of a valid token; 401 for anything else."""
        parts = token.split("_", 2)
        if len(parts) != 3 or parts[0] != TOKEN_PREFIX:
            raise Unauthorized("the token is not valid")
        try:
            token_uuid = str(uuidlib.UUID(hex=parts[1]))
        except ValueError:
            raise Unauthorized("the token is not valid") from None
        async with self.db.session() as session:
            row = await session.get(TokenRow, token_uuid)
            if row is None or not hmac.compare_digest(row.secret_sha256, _sha256(parts[2])):
                raise Unauthorized("the token is not valid")
            if row.revoked_at is not None:
                raise Unauthorized("the token was revoked; log in again")
            if row.expires_at <= datetime.now(UTC):
                raise Unauthorized("the token has expired; log in again")
            user = await session.get(UserRow, row.user_uuid)
            if user is None or not user.enabled:
                raise Unauthorized("the token's user is disabled or gone")
            project = await session.get(ProjectRow, row.project_uuid) if row.project_uuid \
                else None
            ctx = await context_for(session, user, project, "token", row.uuid)
            return AuthResult(context=ctx, expires_at=row.expires_at.timestamp())

    async def key_auth(self, access_key: str) -> KeyAuthResult:
        """The secret and context of an enabled API key, for the gateway to verify a
        signature with; 401 if the key is unknown or disabled."""
        async with self.db.session() as session:
            row = (await session.scalars(
                select(ApiKeyRow).where(ApiKeyRow.access_key == access_key))).first()
            if row is None:
                raise Unauthorized(f"no API key {access_key}")
            if not row.enabled:
                raise Unauthorized(f"API key {access_key} is disabled")
            user = await session.get(UserRow, row.user_uuid)
            project = await session.get(ProjectRow, row.project_uuid)
            if user is None or not user.enabled:
                raise Unauthorized(f"the user of API key {access_key} is disabled or gone")
            ctx = await context_for(session, user, project, "key", row.uuid)
            row.last_used_at = utcnow()
            return KeyAuthResult(secret=row.secret, context=ctx)


def _read_secret_file(path: Path) -> str | None:
    if not path.exists():
        log.warning("no user exists and the admin password file is missing",
                    extra={"path": str(path)})
        return None
    if path.stat().st_mode & 0o077:
        log.warning("the admin password file is readable by others; make it 0600",
                    extra={"path": str(path)})
    return path.read_text().strip()


async def bootstrap_admin(db: Database, password_file: str | None) -> str | None:
    """Make the first super admin, ``admin``, when no user exists yet: in department and
    project ``default`` (made by the migrations), with the password kept in
    ``password_file``. Returns the user's name when one was made."""
    from sqlalchemy import func

    from yun.control.db.models import DepartmentRow

    async with db.session() as session:
        if (await session.scalar(select(func.count()).select_from(UserRow))) or 0:
            return None
        if password_file is None:
            log.warning("no user exists and no admin_password_file is set: nobody can log "
                        "in until one is configured")
            return None
        password = await asyncio.to_thread(_read_secret_file, Path(password_file))
        if password is None:
            return None
        if len(password) < 8:
            raise ValueError(f"{password_file}: the admin password must have at least 8 characters")
        department = (await session.scalars(select(DepartmentRow).where(
            DepartmentRow.name == "default"))).first()
        project = (await session.scalars(select(ProjectRow).where(
            ProjectRow.name == "default"))).first()
        if department is None or project is None:
            raise RuntimeError("the default department and project are missing")
        user = UserRow(uuid=str(uuidlib.uuid4()), name="admin", description="first super admin",
                       password_hash=await hash_password(password), enabled=True,
                       department_uuid=department.uuid)
        session.add(user)
        await session.flush()
        session.add(RoleAssignmentRow(uuid=str(uuidlib.uuid4()), user_uuid=user.uuid,
                                      role=Role.SUPER_ADMIN.value, scope=PLATFORM_SCOPE))
        session.add(RoleAssignmentRow(uuid=str(uuidlib.uuid4()), user_uuid=user.uuid,
                                      role=Role.PROJECT_ADMIN.value,
                                      scope=project_scope(project.uuid),
                                      project_uuid=project.uuid))
    log.info("first super admin created", extra={"user_name": "admin",
                                                 "password_file": str(password_file)})
    return "admin"
