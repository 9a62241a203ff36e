"""Who is calling: THE authentication of the public API, ``current_context``.

Two credentials are accepted (docs/API.md, "Authentication"):

* ``Authorization: Bearer <token>``: the control server says whose token it is
  (``POST /internal/v1/auth/verify-token``);
* a request signed with an API key pair (``yun.proto.signing``): the control server
  gives the key's secret and owner (``POST /internal/v1/auth/key``) and the gateway
  checks the date, the body hash, the signature and that the signature is new.

Answers of the control server are cached for ``auth_cache_ttl`` seconds (never past
a token's expiry), so a busy client costs the control server one check per interval.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import re
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from fastapi import Request
from pydantic import BaseModel, ValidationError
from starlette.datastructures import Headers

from yun.config import GatewaySettings
from yun.gateway.cache import ExpiringSet, TtlCache
from yun.gateway.limits import is_streamed
from yun.gateway.requestid import request_id_of
from yun.gateway.upstream import Upstream
from yun.proto import signing
from yun.proto.context import (
    AnonymousContext,
    AuthResult,
    KeyAuthResult,
    KeyLookup,
    RequestContext,
    TokenCheck,
)
from yun.proto.errors import BadRequest, NotFound, PeerError, Unauthorized, Unprocessable

CACHE_SIZE = 10_000
SEEN_SIGNATURES = 200_000
MAX_TOKEN_LENGTH = 512
NO_CREDENTIAL = "send 'Authorization: Bearer <token>' or a signed key-pair request"
_HEX_SHA256 = re.compile(r"[0-9a-f]{64}")

R = TypeVar("R", bound=BaseModel)


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _bearer_token(authorization: str) -> str | None:
    scheme, _, token = authorization.strip().partition(" ")
    return token.strip() or None if scheme.lower() == "bearer" else None


def anonymous_context(request: Request) -> AnonymousContext:
    """The context of a request no user is behind yet (a login)."""
    client = request.client
    return AnonymousContext(request_id=request_id_of(request.scope),
                            source_ip=client.host if client else None)


class Authenticator:
    """Turns a request's credential into the caller's :class:`RequestContext`."""

    def __init__(self, upstream: Upstream, settings: GatewaySettings,
                 clock: Callable[[], float] = time.time) -> None:
        self.upstream = upstream
        self.ttl = settings.auth_cache_ttl
        self.clock = clock
        self.tokens: TtlCache[AuthResult] = TtlCache(CACHE_SIZE)
        self.keys: TtlCache[KeyAuthResult] = TtlCache(CACHE_SIZE)
        self.seen = ExpiringSet(SEEN_SIGNATURES, clock=clock)
        self._inflight: dict[str, asyncio.Future[Any]] = {}

    async def authenticate(self, request: Request) -> RequestContext:
        """The caller of ``request``; raise :class:`Unauthorized` with the reason if none."""
        anonymous = anonymous_context(request)
        header = request.headers.get("Authorization", "")
        token = _bearer_token(header)
        if token is not None:
            context = await self._token(token, anonymous)
        else:
            parsed = signing.parse_authorization(header)
            if parsed is None:
                raise Unauthorized(NO_CREDENTIAL)
            context = await self._signed(request, *parsed, anonymous)
        return context.model_copy(update={"request_id": anonymous.request_id,
                                          "source_ip": anonymous.source_ip})

    def cached_user(self, headers: Headers) -> str | None:
        """The user behind these headers if a recent check is cached (for rate limits)."""
        header = headers.get("authorization", "")
        token = _bearer_token(header)
        if token is not None:
            hit = self.tokens.get(_digest(token))
            return hit.context.user_uuid if hit else None
        parsed = signing.parse_authorization(header)
        key_hit = self.keys.get(parsed[0]) if parsed else None
        return key_hit.context.user_uuid if key_hit else None

    def forget_token(self, token_uuid: str) -> None:
        """Stop trusting a revoked token at once (other gateways forget it within the TTL)."""
        self.tokens.discard_where(lambda result: result.context.credential_id == token_uuid)

    def forget_keys(self) -> None:
        """Ask the control server again about every key (one was disabled or rotated)."""
        self.keys.clear()

    def forget_all(self) -> None:
        """Ask again about every credential (a user was disabled or deleted)."""
        self.tokens.clear()
        self.keys.clear()

    # -- tokens -------------------------------------------------------------------------

    async def _token(self, token: str, anonymous: AnonymousContext) -> RequestContext:
        if len(token) > MAX_TOKEN_LENGTH:
            raise Unauthorized("the token is not valid")
        key = _digest(token)
        result = self.tokens.get(key)
        if result is None:
            async def fetch() -> AuthResult:
                checked = await self._ask(anonymous, "/auth/verify-token",
                                          TokenCheck(token=token), AuthResult)
                remaining = checked.expires_at - self.clock()
                self.tokens.put(key, checked, min(self.ttl, remaining))
                return checked

            result = await self._once(f"token:{key}", fetch)
        if result.expires_at <= self.clock():
            raise Unauthorized("the token has expired; log in again")
        return result.context

    # -- key pairs ----------------------------------------------------------------------

    async def _signed(self, request: Request, access_key: str, sig: str,
                      anonymous: AnonymousContext) -> RequestContext:
        date = request.headers.get(signing.DATE_HEADER)
        if not date:
            raise Unauthorized(f"a signed request needs the {signing.DATE_HEADER} header")
        when = signing.parse_date(date)
        if when is None:
            raise Unauthorized(f"{signing.DATE_HEADER} {date[:40]!r} is not a date like "
                               f"{signing.format_date()}")
        skew = self.clock() - when.timestamp()
        if abs(skew) > signing.REPLAY_WINDOW:
            direction = "behind" if skew > 0 else "ahead of"
            raise Unauthorized(
                f"{signing.DATE_HEADER} is {abs(skew):.0f} s {direction} the gateway's clock; "
                f"at most {signing.REPLAY_WINDOW:.0f} s are allowed")
        body_hash = await self._check_body(request)
        found = self.keys.get(access_key)
        if found is None:
            async def fetch() -> KeyAuthResult:
                looked_up = await self._ask(anonymous, "/auth/key",
                                            KeyLookup(access_key=access_key), KeyAuthResult)
                self.keys.put(access_key, looked_up, self.ttl)
                return looked_up

            found = await self._once(f"key:{access_key}", fetch)
        expected = signing.signature(found.secret, request.method, _raw_path(request),
                                     request.query_params.multi_items(), date, body_hash)
        if not hmac.compare_digest(expected, sig):
            raise Unauthorized(
                "the signature does not match the request (method, path, query, "
                f"{signing.DATE_HEADER}, {signing.CONTENT_HEADER}) under this key's secret")
        # Recorded only once the signature is proven, so nobody can block another's.
        if not self.seen.add(sig, until=when.timestamp() + signing.REPLAY_WINDOW):
            raise Unauthorized("replayed request: this signature was already used; sign "
                               "each request anew")
        return found.context

    async def _check_body(self, request: Request) -> str:
        """The body hash the request declares, after checking it against the body.

        A streamed upload is hashed while it is forwarded (``request.state.body_sha256``
        tells the route what to expect); it may also send ``UNSIGNED-PAYLOAD``.
        """
        declared = request.headers.get(signing.CONTENT_HEADER)
        if not declared:
            raise Unauthorized(f"a signed request needs the {signing.CONTENT_HEADER} header")
        streamed = is_streamed(request.method, request.url.path)
        if declared == signing.UNSIGNED_PAYLOAD:
            if not streamed:
                raise Unauthorized(f"{signing.UNSIGNED_PAYLOAD} is accepted only for image "
                                   f"uploads; send the body's sha256")
            return declared
        if not _HEX_SHA256.fullmatch(declared):
            raise Unauthorized(f"{signing.CONTENT_HEADER} must be the lower-case hex sha256 "
                               f"of the body or {signing.UNSIGNED_PAYLOAD}")
        if streamed:
            request.state.body_sha256 = declared
        elif not hmac.compare_digest(hashlib.sha256(await request.body()).hexdigest(),
                                     declared):
            raise Unauthorized(f"the body does not match {signing.CONTENT_HEADER}")
        return declared

    # -- asking the control server ----------------------------------------------------

    async def _ask(self, anonymous: AnonymousContext, template: str, body: BaseModel,
                   model: type[R]) -> R:
        try:
            reply = await self.upstream.call(anonymous, "POST", template, body=body)
        except (BadRequest, NotFound, Unprocessable) as exc:
            # The control server found nothing to vouch for: for the client, a bad credential.
            raise Unauthorized(exc.detail) from exc
        try:
            return model.model_validate(reply.data)
        except ValidationError as exc:
            raise PeerError(f"the control server answered a malformed {model.__name__}") \
                from exc

    async def _once(self, key: str, fetch: Callable[[], Awaitable[R]]) -> R:
        """``fetch()``, shared by concurrent requests with the same credential."""
        pending = self._inflight.get(key)
        if pending is None:
            future: asyncio.Future[Any] = asyncio.ensure_future(fetch())
            self._inflight[key] = pending = future

            def done(finished: asyncio.Future[Any]) -> None:
                self._inflight.pop(key, None)
                if not finished.cancelled():
                    finished.exception()  # retrieved: its waiters may all have gone

            future.add_done_callback(done)
        # Shielded: one impatient client must not cancel the check others wait for.
        result: R = await asyncio.shield(pending)
        return result


def _raw_path(request: Request) -> str:
    """The path exactly as the client sent it (percent-encoding kept), as it was signed."""
    raw = request.scope.get("raw_path")
    if isinstance(raw, bytes | bytearray):
        return bytes(raw).decode("latin-1").split("?", 1)[0]
    return request.url.path


async def get_authenticator(request: Request) -> Authenticator:
    """FastAPI dependency: the gateway's authenticator (for routes that change credentials)."""
    authenticator: Authenticator = request.app.state.authenticator
    return authenticator


async def current_context(request: Request) -> RequestContext:
    """FastAPI dependency: the authenticated caller of this request."""
    return await (await get_authenticator(request)).authenticate(request)
