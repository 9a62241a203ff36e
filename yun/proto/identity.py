"""Public models of identity and tenancy (T-ID, U-SEC): departments, projects, users,
roles, tokens, API keys, quotas and the audit log."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

from yun.proto.resources import (
    Description,
    Input,
    Named,
    Ref,
    ResourceName,
    TaggedInput,
)

Password = Annotated[str, Field(min_length=8, max_length=256,
                                description="at least 8 characters")]


class Role(StrEnum):
    """What a user may do, from most to least powerful."""

    SUPER_ADMIN = "super_admin"          # everything, on every department and project
    DEPARTMENT_ADMIN = "department_admin"  # projects, users and quotas of one department
    PROJECT_ADMIN = "project_admin"      # members and every resource of one project
    MEMBER = "member"                    # create, change and delete resources of a project
    READER = "reader"                    # read the resources of a project


PROJECT_ROLES = frozenset({Role.PROJECT_ADMIN, Role.MEMBER, Role.READER})




# --- departments and projects -------------------------------------------------------


class Department(Named):
    project_count: int = 0
    user_count: int = 0


class DepartmentCreate(TaggedInput):
    name: ResourceName
    description: Description = ""


class DepartmentUpdate(Input):
    description: Description | None = None


class Project(Named):
    department_uuid: str
    department_name: str | None = None


class ProjectCreate(TaggedInput):
    name: ResourceName
    description: Description = ""
    department: Ref | None = Field(
        default=None, description="department uuid or name; default: the caller's department")


class ProjectUpdate(Input):
    description: Description | None = None


# --- users and roles ----------------------------------------------------------------


class User(Named):
    department_uuid: str
    department_name: str | None = None
    enabled: bool = True
    email: str | None = None


class UserCreate(TaggedInput):
    name: ResourceName
    password: Password
    description: Description = ""
    email: Annotated[str, Field(max_length=254)] | None = None
    department: Ref | None = Field(
        default=None, description="department uuid or name; default: the caller's department")


class UserUpdate(Input):
    description: Description | None = None
    email: Annotated[str, Field(max_length=254)] | None = None
    enabled: bool | None = None
    password: Password | None = None


class RoleAssignment(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    uuid: str
    user_uuid: str
    user_name: str | None = None
    role: Role
    project_uuid: str | None = None
    project_name: str | None = None
    department_uuid: str | None = None
    department_name: str | None = None
    created_at: datetime


class RoleAssignmentCreate(Input):
    """Give ``user`` a role: a project role on ``project``, ``department_admin`` on
    ``department``, ``super_admin`` on neither."""

    user: Ref
    role: Role
    project: Ref | None = None
    department: Ref | None = None


class RoleInfo(BaseModel):
    name: Role
    scope: str
    description: str


# --- tokens and API keys ------------------------------------------------------------


class TokenCreate(Input):
    """Log in with a password; the token is scoped to one project."""

    username: Annotated[str, Field(min_length=1, max_length=63)]
    password: Annotated[str, Field(min_length=1, max_length=256)]
    project: Ref | None = Field(
        default=None, description="project uuid or name; default: the user's first project")
    ttl: float = Field(default=86400, ge=60, le=30 * 86400,
                       description="seconds the token is valid (default 24 h)")


class TokenInfo(BaseModel):
    """A token as listed: never its secret."""

    model_config = ConfigDict(from_attributes=True)

    uuid: str
    user_uuid: str
    project_uuid: str | None = None
    created_at: datetime
    expires_at: datetime
    revoked: bool = False


class IssuedToken(TokenInfo):
    """The answer to a login: ``token`` is shown once and goes in
    ``Authorization: Bearer <token>``."""

    token: str
    user_name: str
    project_name: str | None = None


class ApiKey(BaseModel):
    """An API key pair as listed: the secret is shown only when made or rotated."""

    model_config = ConfigDict(from_attributes=True)

    uuid: str
    name: str
    access_key: str
    user_uuid: str
    project_uuid: str
    enabled: bool
    description: str = ""
    created_at: datetime
    updated_at: datetime
    last_used_at: datetime | None = None


class ApiKeyCreate(Input):
    name: ResourceName
    description: Description = ""


class ApiKeyUpdate(Input):
    enabled: bool | None = None
    description: Description | None = None


class IssuedApiKey(ApiKey):
    secret: str = Field(description="shown once: keep it; requests are signed with it")


# --- quotas -------------------------------------------------------------------------


class QuotaResource(StrEnum):
    VMS = "vms"
    VCPUS = "vcpus"
    MEMORY_MB = "memory_mb"
    DISK_GB = "disk_gb"
    IMAGES = "images"
    PUBLIC_IPS = "public_ips"


# What a new project may use unless its department admin says otherwise: enough for a
# small team, small enough that a runaway script is stopped early.
DEFAULT_QUOTA: dict[QuotaResource, int] = {
    QuotaResource.VMS: 20,
    QuotaResource.VCPUS: 40,
    QuotaResource.MEMORY_MB: 80 * 1024,
    QuotaResource.DISK_GB: 1000,
    QuotaResource.IMAGES: 20,
    QuotaResource.PUBLIC_IPS: 5,
}


class QuotaLine(BaseModel):
    resource: QuotaResource
    limit: int = Field(description="-1 means unlimited")
    used: int


class Quota(BaseModel):
    project_uuid: str
    project_name: str
    lines: list[QuotaLine]


class QuotaUpdate(Input):
    """New limits; -1 means unlimited, an omitted resource keeps its limit."""

    limits: dict[QuotaResource, Annotated[int, Field(ge=-1, le=10**12)]]


# --- audit --------------------------------------------------------------------------


class AuditRecord(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    at: datetime
    request_id: str
    user_uuid: str | None = None
    user_name: str | None = None
    project_uuid: str | None = None
    action: str
    resource_type: str | None = None
    resource_uuid: str | None = None
    source_ip: str | None = None
    status: int
    result: str
    detail: str | None = None


# --- who is asking ------------------------------------------------------------------


class WhoAmI(BaseModel):
    user_uuid: str
    user_name: str
    department_uuid: str | None
    project_uuid: str | None
    project_name: str | None
    roles: list[Role]
    auth: str


__all__ = [
    "DEFAULT_QUOTA",
    "PROJECT_ROLES",
    "ApiKey",
    "ApiKeyCreate",
    "ApiKeyUpdate",
    "AuditRecord",
    "Department",
    "DepartmentCreate",
    "DepartmentUpdate",
    "IssuedApiKey",
    "IssuedToken",
    "Project",
    "ProjectCreate",
    "ProjectUpdate",
    "Quota",
    "QuotaLine",
    "QuotaResource",
    "QuotaUpdate",
    "Role",
    "RoleAssignment",
    "RoleAssignmentCreate",
    "RoleInfo",
    "TokenCreate",
    "TokenInfo",
    "User",
    "UserCreate",
    "UserUpdate",
    "WhoAmI",
]
