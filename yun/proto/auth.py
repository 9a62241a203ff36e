"""Credentials issued at domain join, and their verification.

A credential is ``<payload>.<mac>``: the payload is base64url JSON naming the
component (id, type, expiry), the mac an HMAC-SHA256 over it with a key derived
from the domain secret. Every component of the domain knows the secret (it joined
with it), so each can verify a peer's credential without asking the domain server,
and a credential cannot be forged or altered by anyone outside the domain.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from dataclasses import dataclass

from yun.proto.errors import Unauthorized

SCHEME = "Yun"


def _key(domain_secret: str) -> bytes:
    return hmac.new(domain_secret.encode(), b"yun-credential-v1", hashlib.sha256).digest()


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


@dataclass(frozen=True)
class Identity:
    """Who sent a request: the component the credential was issued to."""

    component_id: str
    component_type: str
    expires_at: float


def issue_credential(
    domain_secret: str, component_id: str, component_type: str, ttl: float = 7 * 86400
) -> str:
    """Make the credential the domain server hands to a component that joined."""
    payload = json.dumps(
        {"id": component_id, "type": component_type, "exp": round(time.time() + ttl)},
        separators=(",", ":"),
    ).encode()
    mac = hmac.new(_key(domain_secret), payload, hashlib.sha256).digest()
    return f"{_b64(payload)}.{_b64(mac)}"


def verify_credential(domain_secret: str, credential: str) -> Identity:
    """Check a credential and return whom it names; raise :class:`Unauthorized` if it is bad."""
    try:
        payload_text, mac_text = credential.split(".", 1)
        payload = _unb64(payload_text)
        mac = _unb64(mac_text)
    except (ValueError, TypeError) as exc:
        raise Unauthorized("malformed credential") from exc
    expected = hmac.new(_key(domain_secret), payload, hashlib.sha256).digest()
    if not hmac.compare_digest(mac, expected):
        raise Unauthorized("credential signature does not match this domain")
    try:
        data = json.loads(payload)
        identity = Identity(str(data["id"]), str(data["type"]), float(data["exp"]))
    except (ValueError, KeyError, TypeError) as exc:
        raise Unauthorized("malformed credential payload") from exc
    if identity.expires_at < time.time():
        raise Unauthorized(f"credential of {identity.component_id} has expired; join again")
    return identity


def authorization_header(credential: str) -> str:
    """The value of the Authorization header carrying ``credential``."""
    return f"{SCHEME} {credential}"
