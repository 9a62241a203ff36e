"""Credentials as ``httpx.Auth``: a bearer token, or an API key pair signing each request."""

from __future__ import annotations

import threading
import time
from collections.abc import AsyncGenerator, Generator
from datetime import UTC, datetime

import anyio
import httpx

from yun.proto.signing import sign_headers


class TokenAuth(httpx.Auth):
    """``Authorization: Bearer <token>``, a token from ``POST /auth/tokens``."""

    def __init__(self, token: str) -> None:
        self.token = token

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        request.headers["Authorization"] = f"Bearer {self.token}"
        yield request


class KeyPairAuth(httpx.Auth):
    """Signs each request with an API key pair (``yun.proto.signing``).

    The signature covers the path and query exactly as httpx puts them on the wire and
    the sha256 of the body; a streamed body (an image upload) is sent as
    ``UNSIGNED-PAYLOAD``. The gateway accepts each signature once and dates have a
    one-second resolution, so two identical requests within the same second would
    collide: the second one waits for the next second instead of being refused."""

    def __init__(self, access_key: str, secret: str) -> None:
        self.access_key = access_key
        self.secret = secret
        self._lock = threading.Lock()
        self._second = 0
        self._used: set[str] = set()

    def _sign(self, request: httpx.Request) -> float:
        """Sign ``request``; 0, or how long to wait before trying again."""
        raw_path = request.url.raw_path.split(b"?", 1)[0].decode("ascii")
        query = request.url.params.multi_items()
        try:
            body: bytes | None = request.content
        except httpx.RequestNotRead:
            body = None  # a streamed upload: reading it here would hold it all in memory
        with self._lock:
            now = time.time()
            second = int(now)
            if second != self._second:
                self._second, self._used = second, set()
            headers = sign_headers(self.access_key, self.secret, request.method, raw_path,
                                   query, body, datetime.fromtimestamp(now, UTC))
            if headers["Authorization"] in self._used:
                return second + 1 - now
            self._used.add(headers["Authorization"])
        request.headers.update(headers)
        return 0.0

    def sync_auth_flow(
        self, request: httpx.Request,
    ) -> Generator[httpx.Request, httpx.Response, None]:
        # At most two tries: after the wait, the date is a new second.
        for _ in range(2):
            if (delay := self._sign(request)) <= 0:
                break
            time.sleep(delay)
        yield request

    async def async_auth_flow(
        self, request: httpx.Request,
    ) -> AsyncGenerator[httpx.Request, httpx.Response]:
        for _ in range(2):
            if (delay := self._sign(request)) <= 0:
                break
            await anyio.sleep(delay)
        yield request
