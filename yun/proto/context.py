"""Who is asking: the request context the gateway builds and the control server trusts.

The gateway authenticates a user (token or signed API key) and forwards a
:class:`RequestContext` in the ``X-Yun-Context`` header. The header is signed with a
key derived from the domain secret and bound to the forwarding component's id, so only
a member of the domain can make one, it cannot be moved to another caller's request,
and it expires within a minute. The control server never takes the user, project or
roles from a request body.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from yun.proto.errors import Unauthorized
from yun.proto.identity import Role

CONTEXT_HEADER = "X-Yun-Context"
CONTEXT_TTL = 60.0


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


def _key(domain_secret: str) -> bytes:
    return hmac.new(domain_secret.encode(), b"yun-request-context-v1", hashlib.sha256).digest()


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _mac(domain_secret: str, payload: bytes, caller_id: str) -> bytes:
    return hmac.new(_key(domain_secret), payload + b"\0" + caller_id.encode(),
                    hashlib.sha256).digest()


def sign_context(domain_secret: str, context: RequestContext | AnonymousContext,
                 caller_id: str) -> str:
    """The ``X-Yun-Context`` value carrying ``context`` from the component ``caller_id``."""
    kind = "user" if isinstance(context, RequestContext) else "anonymous"
    body = context.model_dump_json()
    payload = f'{{"kind":"{kind}","exp":{round(time.time() + CONTEXT_TTL)},"ctx":{body}}}'
    data = payload.encode()
    return f"{_b64(data)}.{_b64(_mac(domain_secret, data, caller_id))}"


class _Envelope(BaseModel):
    kind: str
    exp: float
    ctx: dict[str, object]


def verify_context(domain_secret: str, header: str, caller_id: str
                   ) -> RequestContext | AnonymousContext:
    """The context in an ``X-Yun-Context`` header sent by ``caller_id``; raise
    :class:`Unauthorized` if it is malformed, forged, expired or another caller's."""
    try:
        payload_text, mac_text = header.split(".", 1)
        payload, mac = _unb64(payload_text), _unb64(mac_text)
    except (ValueError, TypeError) as exc:
        raise Unauthorized(f"malformed {CONTEXT_HEADER} header") from exc
    if not hmac.compare_digest(mac, _mac(domain_secret, payload, caller_id)):
        raise Unauthorized(f"{CONTEXT_HEADER} signature does not match the caller")
    try:
        envelope = _Envelope.model_validate_json(payload)
        if envelope.exp < time.time():
            raise Unauthorized(f"{CONTEXT_HEADER} has expired")
        if envelope.kind == "user":
            return RequestContext.model_validate(envelope.ctx)
        if envelope.kind == "anonymous":
            return AnonymousContext.model_validate(envelope.ctx)
    except ValidationError as exc:
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
