"""Who is asking: the request context the gateway builds and the control server trusts.

The gateway authenticates a user (token or signed API key) and forwards a
:class:`RequestContext` in the ``X-Yun-Context`` header. The header is not signed on its
own: the caller's request signature covers its sha256 (:mod:`yun.proto.auth`), so it
cannot be altered or moved to another request, and the control server accepts it only
from a gateway or control caller. The control server never takes the user, project or
roles from a request body.
"""

from __future__ import annotations

import base64

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from yun.proto.auth import CONTEXT_HEADER
from yun.proto.components import ComponentType
from yun.proto.errors import Forbidden, Unauthorized
from yun.proto.identity import Role

__all__ = [
    "CONTEXT_CALLERS",
    "CONTEXT_HEADER",
    "AnonymousContext",
    "RequestContext",
    "decode_context",
    "encode_context",
]

# Only these component types may forward a user's context.
CONTEXT_CALLERS = frozenset({ComponentType.GATEWAY, ComponentType.CONTROL})


class RequestContext(BaseModel):
    """The user behind a request, the project their credential is scoped to, their roles."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    user_uuid: str
    user_name: str
    department_uuid: str | None = None
    project_uuid: str | None = None
    project_name: str | None = None
    project_department_uuid: str | None = None
    roles: frozenset[Role] = Field(default_factory=frozenset)
    admin_of_departments: frozenset[str] = Field(
        default_factory=frozenset, description="departments this user administers")
    auth: str = "token"
    credential_id: str | None = Field(default=None, description="the token or key used")
    request_id: str = ""
    source_ip: str | None = None

    @property
    def is_super_admin(self) -> bool:
        return Role.SUPER_ADMIN in self.roles


class AnonymousContext(BaseModel):
    """A request no user is behind yet (a login): who sent it, for the audit log."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    request_id: str = ""
    source_ip: str | None = None


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class _Envelope(BaseModel):
    model_config = ConfigDict(extra="forbid")

    kind: str
    ctx: dict[str, object]


def encode_context(context: RequestContext | AnonymousContext) -> str:
    """The ``X-Yun-Context`` value carrying ``context`` (bound to its request by the
    caller's request signature)."""
    kind = "user" if isinstance(context, RequestContext) else "anonymous"
    payload = f'{{"kind":"{kind}","ctx":{context.model_dump_json()}}}'
    return _b64(payload.encode())


def decode_context(header: str, caller_type: str) -> RequestContext | AnonymousContext:
    """The context in an ``X-Yun-Context`` header of a verified request from a component of
    ``caller_type``; raise :class:`Forbidden` if that type may not forward one and
    :class:`Unauthorized` if it is malformed."""
    if caller_type not in CONTEXT_CALLERS:
        raise Forbidden(f"a {caller_type} component may not forward a user's {CONTEXT_HEADER}")
    try:
        envelope = _Envelope.model_validate_json(_unb64(header))
        if envelope.kind == "user":
            return RequestContext.model_validate(envelope.ctx)
        if envelope.kind == "anonymous":
            return AnonymousContext.model_validate(envelope.ctx)
    except (ValidationError, ValueError) as exc:
        raise Unauthorized(f"malformed {CONTEXT_HEADER} payload") from exc
    raise Unauthorized(f"unknown {CONTEXT_HEADER} kind {envelope.kind!r}")


# --- the gateway asks the control server who a credential belongs to -----------------


class TokenCheck(BaseModel):
    model_config = ConfigDict(extra="forbid")

    token: str = Field(min_length=1, max_length=512)


class AuthResult(BaseModel):
    """Whose token it is and when it expires (epoch seconds)."""

    model_config = ConfigDict(extra="forbid")

    context: RequestContext
    expires_at: float


class KeyLookup(BaseModel):
    model_config = ConfigDict(extra="forbid")

    access_key: str = Field(min_length=8, max_length=64, pattern=r"^[A-Za-z0-9]+$")


class KeyAuthResult(BaseModel):
    """An enabled API key: its secret, for the gateway to verify signatures, and whose it is."""

    model_config = ConfigDict(extra="forbid")

    secret: str
    context: RequestContext
