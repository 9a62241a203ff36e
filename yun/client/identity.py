"""Namespaces of identity and tenancy: projects, departments, users, roles, API keys,
quotas, the audit log and the caller's tokens."""

from __future__ import annotations

import builtins

from yun.client._base import (
    Collection,
    Listable,
    TaggedCollection,
    Wait,
    maybe_accepted,
    maybe_accepted_call,
)
from yun.client._core import (
    Call,
    Namespace,
    Op,
    R,
    endpoint,
    idempotency,
    list_params,
    model,
    nothing,
    path,
)
from yun.proto.identity import (
    ApiKey,
    ApiKeyCreate,
    ApiKeyUpdate,
    AuditRecord,
    Department,
    DepartmentCreate,
    DepartmentUpdate,
    IssuedApiKey,
    IssuedToken,
    Project,
    ProjectCreate,
    ProjectUpdate,
    Quota,
    QuotaUpdate,
    RoleAssignment,
    RoleAssignmentCreate,
    RoleInfo,
    TokenCreate,
    TokenInfo,
    User,
    UserCreate,
    UserUpdate,
    WhoAmI,
)
from yun.proto.resources import Accepted, Page, SshKey, SshKeyCreate, Task


def _cascade(cascade: bool) -> dict[str, str | None]:
    return {"cascade": "true" if cascade else None}


class Projects(TaggedCollection[R, Project]):
    """``client.projects``: projects and their quotas (department admins)."""

    _path = "/projects"
    _model = Project
    _page = Page[Project]

    @endpoint
    def create(self, spec: ProjectCreate, *,
               idempotency_key: str | None = None) -> Call[Project]:
        """Create a project in a department (default: the caller's)."""
        return Call("POST", self._path, model(Project), body=spec,
                    headers=idempotency(idempotency_key))

    @endpoint
    def update(self, ref: str, spec: ProjectUpdate, *,
               idempotency_key: str | None = None) -> Call[Project]:
        """Change a project's description."""
        return Call("PATCH", self._item(ref), model(Project), body=spec,
                    headers=idempotency(idempotency_key))

    @endpoint
    def delete(self, ref: str, *, cascade: bool = False, wait: Wait = False,
               idempotency_key: str | None = None) -> Op[Accepted | Task | None]:
        """Delete a project: refused (409) while it holds VMs or images, unless
        ``cascade``, which starts a task deleting them (None: deleted at once)."""
        call = maybe_accepted_call("DELETE", self._item(ref), _cascade(cascade),
                                   idempotency_key)
        return maybe_accepted(call, wait)

    @endpoint
    def get_quota(self, ref: str) -> Call[Quota]:
        """A project's limits and usage."""
        return Call("GET", self._item(ref, "/quota"), model(Quota))

    @endpoint
    def set_quota(self, ref: str, spec: QuotaUpdate, *,
                  idempotency_key: str | None = None) -> Call[Quota]:
        """Change some of a project's limits (-1: unlimited)."""
        return Call("PUT", self._item(ref, "/quota"), model(Quota), body=spec,
                    headers=idempotency(idempotency_key))


class Departments(TaggedCollection[R, Department]):
    """``client.departments``: departments (super admins)."""

    _path = "/departments"
    _model = Department
    _page = Page[Department]

    @endpoint
    def create(self, spec: DepartmentCreate, *,
               idempotency_key: str | None = None) -> Call[Department]:
        """Create a department."""
        return Call("POST", self._path, model(Department), body=spec,
                    headers=idempotency(idempotency_key))

    @endpoint
    def update(self, ref: str, spec: DepartmentUpdate, *,
               idempotency_key: str | None = None) -> Call[Department]:
        """Change a department's description."""
        return Call("PATCH", self._item(ref), model(Department), body=spec,
                    headers=idempotency(idempotency_key))

    @endpoint
    def delete(self, ref: str, *, idempotency_key: str | None = None) -> Call[None]:
        """Delete a department; refused (409) while it holds projects or users."""
        return Call("DELETE", self._item(ref), nothing, headers=idempotency(idempotency_key))


class Users(TaggedCollection[R, User]):
    """``client.users``: users (department admins; anyone may change their password)."""

    _path = "/users"
    _model = User
    _page = Page[User]

    @endpoint
    def create(self, spec: UserCreate, *, idempotency_key: str | None = None) -> Call[User]:
        """Create a user in a department (default: the caller's)."""
        return Call("POST", self._path, model(User), body=spec,
                    headers=idempotency(idempotency_key))

    @endpoint
    def update(self, ref: str, spec: UserUpdate, *,
               idempotency_key: str | None = None) -> Call[User]:
        """Change a user: description, email, enabled, password."""
        return Call("PATCH", self._item(ref), model(User), body=spec,
                    headers=idempotency(idempotency_key))

    @endpoint
    def delete(self, ref: str, *, cascade: bool = False,
               idempotency_key: str | None = None) -> Call[None]:
        """Delete a user; refused (409) while they have API keys, unless ``cascade``."""
        return Call("DELETE", self._item(ref), nothing, params=_cascade(cascade),
                    headers=idempotency(idempotency_key))


class Roles(Namespace[R]):
    """``client.roles``: the roles and who holds them where."""

    @endpoint
    def list(self) -> Call[builtins.list[RoleInfo]]:
        """Every role, its scope and what it may do."""
        return Call("GET", "/roles", model(builtins.list[RoleInfo]))

    @endpoint
    def assignments(self, q: str | None = None, sort: str | None = None, limit: int = 100,
                    cursor: str | None = None, offset: int | None = None,
                    count: bool = False) -> Call[Page[RoleAssignment]]:
        """One page of role assignments the caller may see (``q``: ``user_uuid=…``)."""
        return Call("GET", "/role-assignments", model(Page[RoleAssignment]),
                    params=list_params(q, sort, limit, cursor, offset, count))

    @endpoint
    def grant(self, spec: RoleAssignmentCreate, *,
              idempotency_key: str | None = None) -> Call[RoleAssignment]:
        """Give a user a role on a project, a department, or the platform."""
        return Call("POST", "/role-assignments", model(RoleAssignment), body=spec,
                    headers=idempotency(idempotency_key))

    @endpoint
    def revoke(self, assignment_uuid: str, *,
               idempotency_key: str | None = None) -> Call[None]:
        """Take a role assignment back."""
        return Call("DELETE", path("/role-assignments/{}", assignment_uuid), nothing,
                    headers=idempotency(idempotency_key))


class Keys(Collection[R, ApiKey]):
    """``client.keys``: the caller's API key pairs (secrets are shown once)."""

    _path = "/keys"
    _model = ApiKey
    _page = Page[ApiKey]

    @endpoint
    def create(self, spec: ApiKeyCreate, *,
               idempotency_key: str | None = None) -> Call[IssuedApiKey]:
        """Make a key pair for the token's project; keep its ``secret``."""
        return Call("POST", self._path, model(IssuedApiKey), body=spec,
                    headers=idempotency(idempotency_key))

    @endpoint
    def update(self, ref: str, spec: ApiKeyUpdate, *,
               idempotency_key: str | None = None) -> Call[ApiKey]:
        """Enable, disable or describe a key."""
        return Call("PATCH", self._item(ref), model(ApiKey), body=spec,
                    headers=idempotency(idempotency_key))

    @endpoint
    def rotate(self, ref: str, *, idempotency_key: str | None = None) -> Call[IssuedApiKey]:
        """Give a key a new secret; the old one stops working."""
        return Call("POST", self._item(ref, "/rotate"), model(IssuedApiKey),
                    headers=idempotency(idempotency_key))

    @endpoint
    def delete(self, ref: str, *, idempotency_key: str | None = None) -> Call[None]:
        """Delete a key."""
        return Call("DELETE", self._item(ref), nothing, headers=idempotency(idempotency_key))


class SshKeys(Collection[R, SshKey]):
    """``client.ssh_keys``: the caller's SSH public keys, for the guests they create."""

    _path = "/ssh-keys"
    _model = SshKey
    _page = Page[SshKey]

    @endpoint
    def create(self, name: str, public_key: str, *,
               idempotency_key: str | None = None) -> Call[SshKey]:
        """Store a public key (one line of a ``.pub`` file) under ``name``."""
        body = SshKeyCreate.model_validate({"name": name, "public_key": public_key})
        return Call("POST", self._path, model(SshKey), body=body,
                    headers=idempotency(idempotency_key))

    @endpoint
    def delete(self, ref: str, *, idempotency_key: str | None = None) -> Call[None]:
        """Delete a key (guests already given it keep it)."""
        return Call("DELETE", self._item(ref), nothing, headers=idempotency(idempotency_key))


class CurrentQuota(Namespace[R]):
    """``client.quota``: the token's project's quota."""

    @endpoint
    def get(self) -> Call[Quota]:
        """Limits and usage of the project the credential is scoped to."""
        return Call("GET", "/quota", model(Quota))


class Audit(Listable[R, AuditRecord]):
    """``client.audit``: the audit log (project admins and above)."""

    _path = "/audit"
    _page = Page[AuditRecord]


class Auth(Namespace[R]):
    """``client.auth``: logging in, the caller's tokens, and who the caller is."""

    @endpoint
    def login(self, username: str, password: str, project: str | None = None,
              ttl: float | None = None) -> Call[IssuedToken]:
        """Exchange a password for a token scoped to ``project`` (default: the user's
        first project). Needs no credentials."""
        fields = {"username": username, "password": password, "project": project}
        spec = TokenCreate.model_validate(fields if ttl is None else {**fields, "ttl": ttl})
        return Call("POST", "/auth/tokens", model(IssuedToken), body=spec)

    @endpoint
    def tokens(self, q: str | None = None, sort: str | None = None, limit: int = 100,
               cursor: str | None = None, offset: int | None = None,
               count: bool = False) -> Call[Page[TokenInfo]]:
        """One page of the caller's own tokens."""
        return Call("GET", "/auth/tokens", model(Page[TokenInfo]),
                    params=list_params(q, sort, limit, cursor, offset, count))

    @endpoint
    def revoke(self, token_uuid: str, *, idempotency_key: str | None = None) -> Call[None]:
        """Revoke a token (a logout)."""
        return Call("DELETE", path("/auth/tokens/{}", token_uuid), nothing,
                    headers=idempotency(idempotency_key))

    @endpoint
    def whoami(self) -> Call[WhoAmI]:
        """The user, project and roles behind the credential."""
        return Call("GET", "/auth/whoami", model(WhoAmI))
