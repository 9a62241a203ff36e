"""What the gateway refuses before any route runs: oversized or malformed input, floods.

These are pure ASGI middlewares, not ``BaseHTTPMiddleware``: the latter would pass
the body of an image upload through a queue instead of letting it stream.
"""

from __future__ import annotations

import math
import re
import time
from collections import OrderedDict
from collections.abc import Callable
from urllib.parse import unquote_to_bytes

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from yun.proto.errors import Problem
from yun.proto.server import problem_response

API_PREFIX = "/api/v1"
# Routes whose body is streamed through, unbuffered and without the JSON size limit.
STREAMED_ROUTES = frozenset({("POST", f"{API_PREFIX}/images")})
# ... and the parts of resumed uploads (PUT /images/{ref}/data).
_STREAMED_PARTS = re.compile(rf"^{re.escape(API_PREFIX)}/images/[^/]+/data$")
LOGIN_ROUTE = ("POST", f"{API_PREFIX}/auth/tokens")
# Password guessing gets a bucket of its own per address, far tighter than the API's.
LOGIN_RATE = 5.0
LOGIN_BURST = 20
MAX_BUCKETS = 100_000


def is_streamed(method: str, path: str) -> bool:
    """Whether the route ``method path`` streams its request body (image uploads)."""
    return (method.upper(), path) in STREAMED_ROUTES or (
        method.upper() == "PUT" and _STREAMED_PARTS.match(path) is not None)


async def _refuse(scope: Scope, receive: Receive, send: Send, status: int, title: str,
                  detail: str, headers: dict[str, str] | None = None) -> None:
    slug = title.lower().replace(" ", "-")
    response = problem_response(Problem(
        type=f"https://yun.dev/problems/{slug}", title=title, status=status, detail=detail,
        instance=scope.get("path")))
    response.headers.update(headers or {})
    await response(scope, receive, send)


def _not_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return True
    return False


def invalid_utf8_part(scope: Scope) -> str | None:
    """Which part of the request line is not valid UTF-8 once percent-decoded, or None."""
    raw_path = scope.get("raw_path")
    if isinstance(raw_path, bytes | bytearray):
        # The server already decoded ``path`` leniently (bad bytes became U+FFFD), so the
        # check needs the bytes as sent.
        if _not_utf8(unquote_to_bytes(bytes(raw_path).split(b"?", 1)[0])):
            return "path"
    query = scope.get("query_string", b"")
    if query and _not_utf8(unquote_to_bytes(query.replace(b"+", b" "))):
        return "query string"
    return None


class InputGuardMiddleware:
    """400 for request lines or bodies that are not UTF-8; 413 for JSON bodies over the limit.

    The body of every route but the streamed ones is read here, at most
    ``max_json_body`` bytes of it, and handed on whole: an announced or counted excess
    is refused without reading further.
    """

    def __init__(self, app: ASGIApp, max_json_body: int) -> None:
        self.app = app
        self.max_json_body = max_json_body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        part = invalid_utf8_part(scope)
        if part is not None:
            await _refuse(scope, receive, send, 400, "Bad request",
                          f"the {part} is not valid UTF-8 (after percent-decoding)")
            return
        if is_streamed(scope["method"], scope["path"]):
            await self.app(scope, receive, send)
            return
        too_large = f"request body larger than {self.max_json_body} bytes"
        length = Headers(scope=scope).get("content-length")
        if length is not None:
            if not length.isdigit():
                await _refuse(scope, receive, send, 400, "Bad request",
                              "the Content-Length header is not a number")
                return
            if int(length) > self.max_json_body:
                await _refuse(scope, receive, send, 413, "Content too large", too_large)
                return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return  # the client is gone; nobody to answer
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_json_body:
                await _refuse(scope, receive, send, 413, "Content too large", too_large)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        if _not_utf8(body):
            await _refuse(scope, receive, send, 400, "Bad request",
                          "the request body is not valid UTF-8")
            return
        await self.app(scope, _replay(body, receive), send)


def _replay(body: bytes, receive: Receive) -> Receive:
    """A ``receive`` giving ``body`` in one message, then what the client sends next."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


class TokenBuckets:
    """One token bucket per key: ``rate`` tokens a second, at most ``burst`` saved up."""

    def __init__(self, rate: float, burst: float, maxsize: int = MAX_BUCKETS,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = rate
        self.burst = burst
        self.maxsize = maxsize
        self._clock = clock
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def take(self, key: str) -> float:
        """Spend one token of ``key``'s bucket: 0.0 if allowed, else seconds until one is."""
        now = self._clock()
        tokens, stamp = self._buckets.pop(key, (self.burst, now))
        tokens = min(self.burst, tokens + (now - stamp) * self.rate)
        wait = 0.0
        if tokens >= 1.0:
            tokens -= 1.0
        else:
            wait = (1.0 - tokens) / self.rate
        self._buckets[key] = (tokens, now)
        # A forgotten bucket comes back full: being generous to the least recent key
        # is the price of bounded memory.
        while len(self._buckets) > self.maxsize:
            self._buckets.popitem(last=False)
        return wait


class RateLimitMiddleware:
    """429 with ``Retry-After`` for a user (or an address) sending faster than allowed.

    ``identify`` names the user behind the request's credential when the gateway
    already knows it (its authentication cache); other requests, logins among them,
    are counted per client address.
    """

    def __init__(self, app: ASGIApp, rate: float, burst: int,
                 identify: Callable[[Headers], str | None]) -> None:
        self.app = app
        self.identify = identify
        self.buckets = TokenBuckets(rate, burst) if rate > 0 else None
        self.logins = TokenBuckets(min(rate, LOGIN_RATE), min(burst, LOGIN_BURST)) \
            if rate > 0 else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self.buckets is None or self.logins is None:
            await self.app(scope, receive, send)
            return
        client = scope.get("client")
        address = f"ip:{client[0]}" if client else "ip:unknown"
        if (scope["method"], scope["path"]) == LOGIN_ROUTE:
            buckets, key, what = self.logins, address, "login attempts"
        else:
            user = self.identify(Headers(scope=scope))
            buckets, key = self.buckets, f"user:{user}" if user else address
            what = "requests"
        wait = buckets.take(key)
        if wait > 0:
            retry = max(1, math.ceil(wait))
            await _refuse(
                scope, receive, send, 429, "Too many requests",
                f"more than {buckets.rate:g} {what} per second (bursts of "
                f"{buckets.burst:g}); retry after {retry} s",
                headers={"Retry-After": str(retry)})
            return
        await self.app(scope, receive, send)
