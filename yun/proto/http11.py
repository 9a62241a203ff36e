"""A small HTTP/1.1 client for the internal protocol's calls: keep-alive connections to
one peer, whole request and answer bodies (no streaming).

Why not httpx, which the rest of the protocol keeps for streamed transfers: for each
request its general client builds request and response models, runs its auth and
redirect flows, and httpcore's pool polls every idle connection's socket for expiry
through anyio's TLS stream. Profiled, that was half of the gateway's CPU per forwarded
read. Here a request is one write of bytes the caller built, and the answer is parsed as
it arrives by httptools (the parser uvicorn serves with) on an asyncio protocol, which
learns at once when the peer closes a connection: a closed connection is never reused,
without polling.

Answers must carry ``Content-Length`` or chunked framing (every Yun server is uvicorn's);
an answer that ends only when the connection closes counts as broken off.
"""

from __future__ import annotations

import asyncio
import json as json_module
import ssl
import time
from typing import Any, cast

import httptools

# How long an idle connection is kept for the next call (see yun.proto.client).
DEFAULT_KEEPALIVE_EXPIRY = 30.0
DEFAULT_MAX_CONNECTIONS = 128


class NotSent(ConnectionError):
    """No byte of the request reached the peer (it could not be connected to in time):
    the call may go to another peer, even a POST."""


class NoAnswer(ConnectionError):
    """The request was sent (or may have been) but no whole answer came back: the
    connection broke off, the answer was malformed, or it did not come in time."""


class Answer:
    """A peer's answer, read whole: the attributes a caller of httpx would use."""

    __slots__ = ("content", "headers", "status_code")

    def __init__(self, status_code: int, headers: dict[str, str], content: bytes) -> None:
        self.status_code = status_code
        #: Lower-case names; a repeated header's values joined with ", ".
        self.headers = headers
        self.content = content

    @property
    def is_success(self) -> bool:
        return 200 <= self.status_code < 300

    @property
    def text(self) -> str:
        return self.content.decode("utf-8", errors="replace")

    def json(self) -> Any:
        return json_module.loads(self.content)

    def __repr__(self) -> str:
        return f"Answer(status_code={self.status_code}, {len(self.content)} bytes)"


class _Connection(asyncio.Protocol):
    """One connection to the peer; one exchange at a time."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.closed = False
        self.keep_alive = False
        self.idle_since = 0.0
        self._answer: asyncio.Future[Answer] | None = None
        self._headers: dict[str, str] = {}
        self._body: list[bytes] = []

    # -- asyncio.Protocol ----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's TLS transport is not an asyncio.Transport subclass, but has its methods.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        if self._answer is None or self._answer.done():
            # Bytes nobody asked for: the connection's framing cannot be trusted any more.
            self.close()
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(NoAnswer(f"malformed answer: {exc}"))
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._fail(NoAnswer("the peer closed the connection before a whole answer"
                            + (f" ({exc})" if exc else "")))

    # -- httptools callbacks -------------------------------------------------------------

    def on_header(self, name: bytes, value: bytes) -> None:
        key = name.decode("latin-1").lower()
        text = value.decode("latin-1")
        previous = self._headers.get(key)
        self._headers[key] = text if previous is None else f"{previous}, {text}"

    def on_body(self, body: bytes) -> None:
        self._body.append(body)

    def on_message_complete(self) -> None:
        self.keep_alive = self.parser.should_keep_alive()
        answer = Answer(self.parser.get_status_code(), self._headers, b"".join(self._body))
        if self._answer is not None and not self._answer.done():
            self._answer.set_result(answer)

    # -- use -----------------------------------------------------------------------------

    def _fail(self, exc: Exception) -> None:
        if self._answer is not None and not self._answer.done():
            self._answer.set_exception(exc)

    async def exchange(self, request: bytes) -> Answer:
        """Write ``request`` and wait for its whole answer."""
        if self.closed or self.transport is None or self.transport.is_closing():
            raise NoAnswer("the connection closed before the request was sent")
        self._answer = asyncio.get_running_loop().create_future()
        self._headers, self._body, self.keep_alive = {}, [], False
        self.transport.write(request)
        try:
            return await self._answer
        finally:
            self._answer = None

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()


class ConnectionPool:
    """Keep-alive connections to one ``host``:``port`` (over ``tls`` when given).

    At most ``max_connections`` are in use at once; more concurrent calls wait for one.
    Idle ones are reused newest first and dropped after ``keepalive_expiry`` seconds
    (shorter than the servers' own keep-alive, so a server never closes a connection the
    pool is about to reuse), or as soon as the peer closes them.
    """

    def __init__(self, host: str, port: int, tls: ssl.SSLContext | None = None, *,
                 max_connections: int = DEFAULT_MAX_CONNECTIONS,
                 keepalive_expiry: float = DEFAULT_KEEPALIVE_EXPIRY) -> None:
        self.host, self.port, self.tls = host, port, tls
        self.keepalive_expiry = keepalive_expiry
        self._slots = asyncio.Semaphore(max_connections)
        self._idle: list[_Connection] = []
        self._closed = False
        #: Connections opened so far (for tests and metrics: a steady load opens none).
        self.opened = 0

    async def exchange(self, request: bytes, timeout: float) -> Answer:
        """Send ``request`` (a whole HTTP/1.1 message) and return its answer.

        Raises :class:`NotSent` when no connection could be had in ``timeout`` seconds
        (or the pool is closed) and :class:`NoAnswer` when the answer did not come whole
        within the rest of it.
        """
        if self._closed:
            raise NotSent("the connection pool is closed")
        deadline = time.monotonic() + timeout
        try:
            async with asyncio.timeout(timeout):
                await self._slots.acquire()
        except TimeoutError as exc:
            raise NotSent(f"no free connection to {self.host}:{self.port} within "
                          f"{timeout:g} s") from exc
        try:
            conn = await self._connection(deadline)
            reusable = False
            try:
                async with asyncio.timeout_at(_loop_time(deadline)):
                    answer = await conn.exchange(request)
                reusable = conn.keep_alive and not conn.closed
                return answer
            except TimeoutError as exc:
                raise NoAnswer(f"no answer from {self.host}:{self.port} within "
                               f"{timeout:g} s") from exc
            finally:
                if reusable and not self._closed:
                    conn.idle_since = time.monotonic()
                    self._idle.append(conn)
                else:
                    # Broken off, cancelled or not to be kept: its framing state is
                    # unknown, so nobody else may use it.
                    conn.close()
        finally:
            self._slots.release()

    async def _connection(self, deadline: float) -> _Connection:
        now = time.monotonic()
        while self._idle:
            conn = self._idle.pop()
            if not conn.closed and now - conn.idle_since < self.keepalive_expiry:
                return conn
            conn.close()
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout_at(_loop_time(deadline)):
                _, conn = await loop.create_connection(
                    _Connection, self.host, self.port, ssl=self.tls,
                    server_hostname=self.host if self.tls is not None else None)
        except TimeoutError as exc:
            raise NotSent(f"could not connect to {self.host}:{self.port} in time") from exc
        except (OSError, ssl.SSLError) as exc:
            raise NotSent(f"could not connect to {self.host}:{self.port}: {exc}") from exc
        self.opened += 1
        return conn

    async def aclose(self) -> None:
        """Close the idle connections; those in use close when their exchange ends."""
        self._closed = True
        while self._idle:
            self._idle.pop().close()


def _loop_time(deadline: float) -> float:
    """``deadline`` on time.monotonic's clock as a time of the running loop's clock."""
    loop = asyncio.get_running_loop()
    return loop.time() + (deadline - time.monotonic())


class PoolGroup:
    """Connection pools shared by many clients of one process (the sim nodes of a
    sim-nodes process): one pool per peer ``host``:``port``, so a slow peer (a busy
    control server answering reports) cannot take the connections the calls to another
    need (heartbeats to the domain server)."""

    def __init__(self, tls: ssl.SSLContext | None, max_connections: int, *,
                 keepalive_expiry: float = DEFAULT_KEEPALIVE_EXPIRY) -> None:
        self.tls = tls
        self.max_connections = max_connections
        self.keepalive_expiry = keepalive_expiry
        self.pools: dict[tuple[str, int], ConnectionPool] = {}

    def pool(self, host: str, port: int, tls: ssl.SSLContext | None) -> ConnectionPool:
        """The pool of ``host``:``port`` (over the group's TLS context when ``tls`` is
        given: the group's members all present the same certificate)."""
        pool = self.pools.get((host, port))
        if pool is None:
            pool = self.pools[(host, port)] = ConnectionPool(
                host, port, self.tls if tls is not None else None,
                max_connections=self.max_connections, keepalive_expiry=self.keepalive_expiry)
        return pool

    async def aclose(self) -> None:
        for pool in self.pools.values():
            await pool.aclose()
        self.pools.clear()
