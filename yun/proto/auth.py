"""Credentials issued by the domain, signed internal requests, and their verification.

A credential is ``<payload>.<signature>``: the payload is base64url JSON naming the
component (``id``, ``type``), its Ed25519 public key (``pub``), when it was issued
(``iat``) and when it expires (``exp``); the signature is the domain CA key's Ed25519
signature over the payload. Only the domain server holds that key, so a node cannot
mint a control credential, and every component verifies a peer's credential with the
CA's public key alone.

A credential is not a bearer token: each internal request is also signed by the
caller's own private key. The ``X-Yun-Signature`` header carries ``ts``, ``nonce`` and
an Ed25519 signature over the method, the path with its query as sent, ``ts``,
``nonce``, the audience (the ``host:port`` the client addressed) and the sha256 of the
``X-Yun-Context`` header (or ``-``). The verifier checks the CA signature (cached per
credential), the expiry, the revocation list, the request signature with the key the
credential names, a timestamp within :data:`CLOCK_SKEW` seconds, a nonce not seen in
that window, and an audience equal to its own advertised authority. So a stolen or
replayed credential is useless, and a request a node received cannot be replayed to
another node.

The join (before a component has any of this) is proven with the domain secret:
:func:`server_proof` and :func:`client_proof` (see :mod:`yun.proto.membership`).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from yun.proto.errors import Unauthorized
from yun.proto.pki import b64, public_raw, unb64

SCHEME = "Yun"
SIGNATURE_HEADER = "X-Yun-Signature"
CONTEXT_HEADER = "X-Yun-Context"
CLOCK_SKEW = 60.0
NONCE_CACHE_SIZE = 200_000
CREDENTIAL_CACHE_SIZE = 4096


# --- join proofs ------------------------------------------------------------------------------


def join_key(domain_secret: str) -> bytes:
    """The key both sides of a join derive from the domain secret (never sent)."""
    return hmac.new(domain_secret.encode(), b"yun-join-v1", hashlib.sha256).digest()


def _proof(key: bytes, *parts: str | bytes) -> str:
    mac = hmac.new(key, digestmod=hashlib.sha256)
    for part in parts:
        data = part.encode() if isinstance(part, str) else part
        # Length-prefixed: no two different part lists give the same input.
        mac.update(len(data).to_bytes(4, "big") + data)
    return mac.hexdigest()


def server_proof(key: bytes, client_nonce: str, server_nonce: str, ca_fingerprint: bytes) -> str:
    """The domain server's proof that it knows the secret, bound to its CA certificate."""
    return _proof(key, "server", client_nonce, server_nonce, ca_fingerprint)


def client_proof(key: bytes, server_nonce: str, client_nonce: str, component_type: str,
                 name: str, url: str, public_key: str) -> str:
    """A joining component's proof that it knows the secret, bound to what it asks for."""
    return _proof(key, "client", server_nonce, client_nonce, component_type, name, url,
                  public_key)


def proofs_equal(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode(), b.encode())


# --- credentials --------------------------------------------------------------------------


@dataclass(frozen=True)
class Identity:
    """Who sent a request: the component the credential was issued to."""

    component_id: str
    component_type: str
    expires_at: float
    issued_at: float = 0.0
    public_key: bytes = b""


def issue_credential(ca_key: Ed25519PrivateKey, component_id: str, component_type: str,
                     public_key: Ed25519PublicKey | bytes, ttl: float,
                     now: float | None = None) -> str:
    """The credential the domain server hands a component that joined (or renews)."""
    now = time.time() if now is None else now
    pub = public_key if isinstance(public_key, bytes) else public_raw(public_key)
    payload = json.dumps({"id": component_id, "type": component_type, "pub": b64(pub),
                          "iat": round(now, 6), "exp": round(now + ttl, 3)},
                         separators=(",", ":")).encode()
    return f"{b64(payload)}.{b64(ca_key.sign(payload))}"


def decode_credential(ca_public: Ed25519PublicKey, credential: str) -> Identity:
    """Check the CA signature of ``credential`` and return whom it names (expiry and
    revocation are the caller's to check: see :class:`Verifier`)."""
    try:
        payload_text, sig_text = credential.split(".", 1)
        payload, sig = unb64(payload_text), unb64(sig_text)
    except (ValueError, TypeError) as exc:
        raise Unauthorized("malformed credential") from exc
    try:
        ca_public.verify(sig, payload)
    except InvalidSignature as exc:
        raise Unauthorized("credential not signed by this domain's CA") from exc
    try:
        data = json.loads(payload)
        pub = unb64(str(data["pub"]))
        if len(pub) != 32:
            raise ValueError("bad public key")
        return Identity(str(data["id"]), str(data["type"]), float(data["exp"]),
                        float(data["iat"]), pub)
    except (ValueError, KeyError, TypeError) as exc:
        raise Unauthorized("malformed credential payload") from exc


def verify_credential(ca_public: Ed25519PublicKey, credential: str,
                      now: float | None = None) -> Identity:
    """:func:`decode_credential` plus the expiry check."""
    identity = decode_credential(ca_public, credential)
    if identity.expires_at < (time.time() if now is None else now):
        raise Unauthorized(f"credential of {identity.component_id} has expired; join again")
    return identity


def authorization_header(credential: str) -> str:
    """The value of the Authorization header carrying ``credential``."""
    return f"{SCHEME} {credential}"


# --- request signatures -----------------------------------------------------------------


def _context_digest(context_header: str | None) -> str:
    return hashlib.sha256(context_header.encode()).hexdigest() if context_header else "-"


def string_to_sign(method: str, target: str, ts: str, nonce: str, audience: str,
                   context_header: str | None) -> bytes:
    """What a request signature covers, one field per line."""
    return "\n".join(["yun-request-v1", method.upper(), target, ts, nonce, audience.lower(),
                      _context_digest(context_header)]).encode()


class Signer:
    """Signs this component's internal requests with its private key and credential.

    The credential is replaced in place when it is renewed, so every client holding this
    signer uses the new one at once.
    """

    def __init__(self, key: Ed25519PrivateKey, credential: str) -> None:
        self.key = key
        self.credential = credential

    def headers(self, method: str, target: str, audience: str,
                context_header: str | None = None, now: float | None = None) -> dict[str, str]:
        """Authorization and signature headers for one request.

        ``target`` is the path with its query exactly as sent; ``audience`` the
        ``host:port`` the request is addressed to.
        """
        ts = f"{time.time() if now is None else now:.3f}"
        nonce = secrets.token_urlsafe(16)
        sig = self.key.sign(string_to_sign(method, target, ts, nonce, audience, context_header))
        return {"Authorization": authorization_header(self.credential),
                SIGNATURE_HEADER: f"ts={ts},nonce={nonce},sig={b64(sig)}"}


def _parse_signature(header: str) -> tuple[str, str, bytes]:
    try:
        fields = dict(part.split("=", 1) for part in header.split(","))
        ts, nonce, sig = fields["ts"], fields["nonce"], unb64(fields["sig"])
    except (ValueError, KeyError) as exc:
        raise Unauthorized(f"malformed {SIGNATURE_HEADER} header") from exc
    if not 8 <= len(nonce) <= 64 or len(sig) != 64:
        raise Unauthorized(f"malformed {SIGNATURE_HEADER} header")
    return ts, nonce, sig


class Verifier:
    """Checks credentials and request signatures on one component.

    ``audiences`` gives the ``host:port`` names this component is addressed by (its
    advertised URL's authority). The CA key is set at join; ``revoked`` maps a component
    id to the time it was revoked: its credentials issued up to then are refused (one it
    gets by joining again afterwards is accepted).
    """

    def __init__(self, audiences: Callable[[], Iterable[str]],
                 ca_public: Ed25519PublicKey | None = None) -> None:
        self._audiences = audiences
        self.ca_public = ca_public
        self.revoked: Mapping[str, float] = {}
        self.revocation_generation = -1
        self._credentials: OrderedDict[str, tuple[Identity, Ed25519PublicKey]] = OrderedDict()
        self._nonces: OrderedDict[str, float] = OrderedDict()
        # A timestamp at or below this can no longer be checked for replay (its nonce may
        # have been evicted from the bounded cache), so it is refused.
        self._nonce_floor = 0.0

    def set_ca(self, ca_public: Ed25519PublicKey) -> None:
        if self.ca_public is None or public_raw(self.ca_public) != public_raw(ca_public):
            self.ca_public = ca_public
            self._credentials.clear()

    def set_revoked(self, revoked: Mapping[str, float], generation: int) -> None:
        self.revoked = dict(revoked)
        self.revocation_generation = generation

    def credential(self, credential: str, now: float | None = None
                   ) -> tuple[Identity, Ed25519PublicKey]:
        """The identity a credential names and its public key, checked (CA signature
        cached; expiry and revocation checked on every call)."""
        if self.ca_public is None:
            raise Unauthorized("this component has not joined a domain yet")
        now = time.time() if now is None else now
        cached = self._credentials.get(credential)
        if cached is None:
            identity = decode_credential(self.ca_public, credential)
            cached = (identity, Ed25519PublicKey.from_public_bytes(identity.public_key))
            self._credentials[credential] = cached
            if len(self._credentials) > CREDENTIAL_CACHE_SIZE:
                self._credentials.popitem(last=False)
        identity = cached[0]
        if identity.expires_at < now:
            raise Unauthorized(f"credential of {identity.component_id} has expired; join again")
        revoked_at = self.revoked.get(identity.component_id)
        if revoked_at is not None and identity.issued_at <= revoked_at:
            raise Unauthorized(f"component {identity.component_id} was removed from the domain")
        return cached

    def verify(self, method: str, target: str, headers: Mapping[str, str],
               now: float | None = None) -> Identity:
        """The caller of a request, or :class:`Unauthorized` naming what is wrong.

        ``target`` is the path and query as received; ``headers`` are looked up by
        lower-case name.
        """
        now = time.time() if now is None else now
        scheme, _, credential = headers.get("authorization", "").partition(" ")
        if scheme != SCHEME or not credential:
            raise Unauthorized(f"missing '{SCHEME}' credential in the Authorization header")
        sig_header = headers.get(SIGNATURE_HEADER.lower())
        if not sig_header:
            raise Unauthorized(f"missing {SIGNATURE_HEADER} header: internal requests are "
                               "signed by the caller's key")
        identity, public = self.credential(credential.strip(), now)
        ts, nonce, sig = _parse_signature(sig_header)
        try:
            when = float(ts)
        except ValueError as exc:
            raise Unauthorized(f"malformed {SIGNATURE_HEADER} timestamp") from exc
        if abs(now - when) > CLOCK_SKEW:
            raise Unauthorized(f"request signed at {ts}, more than {CLOCK_SKEW:.0f} s from "
                               "this component's clock")
        context = headers.get(CONTEXT_HEADER.lower())
        for audience in self._audiences():
            try:
                public.verify(sig, string_to_sign(method, target, ts, nonce, audience, context))
                break
            except InvalidSignature:
                continue
        else:
            raise Unauthorized("request signature does not match (wrong key, altered request, "
                               "or addressed to another component)")
        self._remember_nonce(f"{identity.component_id}:{nonce}", when, now)
        return identity

    def _remember_nonce(self, key: str, when: float, now: float) -> None:
        if when <= self._nonce_floor:
            raise Unauthorized("request too old to be checked for replay; sign it again")
        if key in self._nonces:
            raise Unauthorized("request replayed: its nonce was already used")
        self._nonces[key] = when
        # Forget nonces whose timestamp is outside the window: such a request is refused
        # by its timestamp anyway. Arrival order is close to timestamp order.
        while self._nonces:
            oldest = next(iter(self._nonces.values()))
            if oldest >= now - CLOCK_SKEW and len(self._nonces) <= NONCE_CACHE_SIZE:
                break
            self._nonces.popitem(last=False)
            if oldest >= now - CLOCK_SKEW:
                self._nonce_floor = max(self._nonce_floor, oldest)
