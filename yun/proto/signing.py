"""Signed API requests with a key pair (U-SEC), shared by the SDK and the gateway.

A request carries three headers::

    X-Yun-Date: 2026-11-23T15:24:00Z
    X-Yun-Content-SHA256: <hex sha256 of the body>
    Authorization: YUN1-HMAC-SHA256 Credential=<access key>, Signature=<hex>

The signature is HMAC-SHA256, keyed by the key's secret, over the canonical request:
method, path (as sent, percent-encoded), the query parameters sorted and
percent-encoded, the date and the body's hash, one per line. The gateway accepts a
date within :data:`REPLAY_WINDOW` seconds of its clock and each signature once.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Iterable
from datetime import UTC, datetime
from urllib.parse import quote

ALGORITHM = "YUN1-HMAC-SHA256"
DATE_HEADER = "X-Yun-Date"
CONTENT_HEADER = "X-Yun-Content-SHA256"
DATE_FORMAT = "%Y-%m-%dT%H:%M:%SZ"
REPLAY_WINDOW = 300.0
EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()
UNSIGNED_PAYLOAD = "UNSIGNED-PAYLOAD"

_AUTH_RE = re.compile(
    rf"^{ALGORITHM}\s+Credential=(?P<key>[A-Za-z0-9]{{8,64}}),\s*"
    r"Signature=(?P<sig>[0-9a-f]{64})$")


def _enc(text: str) -> str:
    return quote(text, safe="-_.~")


def canonical_query(pairs: Iterable[tuple[str, str]]) -> str:
    """Query parameters in one spelling: each part encoded, sorted by key then value."""
    return "&".join(f"{k}={v}" for k, v in sorted((_enc(k), _enc(v)) for k, v in pairs))


def canonical_request(method: str, path: str, query: Iterable[tuple[str, str]], date: str,
                      body_sha256: str) -> str:
    """What is signed: one line each for method, path, query, date and body hash."""
    return "\n".join([method.upper(), path, canonical_query(query), date, body_sha256])


def signature(secret: str, method: str, path: str, query: Iterable[tuple[str, str]],
              date: str, body_sha256: str) -> str:
    """The hex HMAC-SHA256 of the canonical request under ``secret``."""
    text = canonical_request(method, path, query, date, body_sha256)
    return hmac.new(secret.encode(), text.encode(), hashlib.sha256).hexdigest()


def authorization(access_key: str, sig: str) -> str:
    return f"{ALGORITHM} Credential={access_key}, Signature={sig}"


def parse_authorization(header: str) -> tuple[str, str] | None:
    """(access key, signature) of a key-pair Authorization header, None if it is not one."""
    match = _AUTH_RE.match(header.strip())
    return (match["key"], match["sig"]) if match else None


def format_date(when: datetime | None = None) -> str:
    return (when or datetime.now(UTC)).astimezone(UTC).strftime(DATE_FORMAT)


def parse_date(text: str) -> datetime | None:
    try:
        return datetime.strptime(text, DATE_FORMAT).replace(tzinfo=UTC)
    except ValueError:
        return None


def sign_headers(access_key: str, secret: str, method: str, path: str,
                 query: Iterable[tuple[str, str]], body: bytes | None,
                 when: datetime | None = None) -> dict[str, str]:
    """The headers that sign one request (``body`` None: an unsigned streamed payload)."""
    date = format_date(when)
    digest = hashlib.sha256(body).hexdigest() if body is not None else UNSIGNED_PAYLOAD
    sig = signature(secret, method, path, query, date, digest)
    return {DATE_HEADER: date, CONTENT_HEADER: digest,
            "Authorization": authorization(access_key, sig)}
