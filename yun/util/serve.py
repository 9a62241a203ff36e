"""Run an ASGI app with uvicorn inside the caller's event loop, on a socket bound up front.

Binding first means the port is known (also when 0 was asked) before peers are told
where to reach the service. Internal ports serve TLS: the component binds, joins its
domain (which issues its certificate for the advertised URL), then serves with the
:class:`ssl.SSLContext` the join produced. Until then connections wait in the listen
backlog, so a peer calling early is answered a moment later instead of refused.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from collections.abc import Iterator

import uvicorn
from starlette.types import ASGIApp, Receive, Scope, Send

from yun.config import ComponentSettings


def service_url(settings: ComponentSettings, bound_port: int) -> str:
    """The URL peers use to reach a service bound to ``bound_port``."""
    return settings.model_copy(update={"listen_port": bound_port}).url()


#: Seconds an idle keep-alive connection stays open on the server side. Longer than the
#: pooled clients keep one (httpx's default 5 s; peer clients 30 s,
#: yun.proto.client.KEEPALIVE_EXPIRY), so that it is always the client that drops an
#: idle connection: with uvicorn's default (also 5 s) a request sent on a connection
#: idle for about 5 s could cross the server's close and fail with "Server disconnected
#: without sending a response" — a POST forwarded by the gateway then failed with 502
#: (benchmarks/keepalive_race.py; the occasional failed creates of create_throughput.py).
#: Long enough too that node reports, heartbeats and a control server's calls to a node,
#: a few seconds apart, reuse their TLS connection instead of a handshake on both sides.
KEEP_ALIVE_TIMEOUT = 40


class _Server(uvicorn.Server):
    """A uvicorn server that leaves signals alone: the component handles them, stopping
    its parts in order (several servers may share one process)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        for connection in list(self.server_state.connections):
            connection.shutdown()
            transport = getattr(connection, "transport", None)
            if transport is not None and transport.is_closing():
                # An idle connection uvicorn just closed: over TLS the close waits for the
                # peer's close_notify, which an idle pooled client never reads and sends,
                # so every stop took the whole graceful timeout (5 s). Nothing is in flight
                # on it: drop it now.
                transport.abort()
        await super().shutdown(sockets=sockets)


def yielding_first(app: ASGIApp) -> ASGIApp:
    """``app`` with each HTTP request yielding to the event loop once before it is served.

    Measured with forwarded reads through the gateway: 10-25 % more reads/s at 8
    connections, 0-10 % at 32 (docs/BENCHMARKS.md, issue 10's fourth session). The likely
    reason: a request is otherwise served in the loop turn that read it, one turn each;
    deferred, the requests that are ready are read first and served in one turn, so the
    loop's own cost per turn is shared."""
    async def app_yielding_first(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            await asyncio.sleep(0)
        await app(scope, receive, send)
    return app_yielding_first


class AppServer:
    """One uvicorn server serving ``app`` on ``host:port`` as a task of the running loop."""

    def __init__(self, app: ASGIApp, host: str, port: int) -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        # Naming IPPROTO_TCP is what makes asyncio set TCP_NODELAY on accepted connections;
        # without it Nagle's algorithm delays every keep-alive answer by ~40 ms.
        self.sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.sock.listen(1024)
        self.sock.setblocking(False)
        self.host = host
        self.port: int = self.sock.getsockname()[1]
        config = uvicorn.Config(
            yielding_first(app), log_config=None, access_log=False, lifespan="on",
            timeout_graceful_shutdown=5, limit_concurrency=None,
            timeout_keep_alive=KEEP_ALIVE_TIMEOUT,
        )
        self.server = _Server(config)
        self._task: asyncio.Task[None] | None = None

    async def start(self, tls: ssl.SSLContext | None = None) -> None:
        """Start serving (TLS with ``tls``) and return once the server accepts connections.

        The context is used as given, not copied, so loading a renewed certificate into it
        takes effect at the next handshake.
        """
        config = self.server.config
        if not config.loaded:
            config.load()
        # uvicorn builds its own context only from files; ours comes from the join.
        config.ssl = tls
        self._task = asyncio.create_task(self.server.serve(sockets=[self.sock]))
        for _ in range(500):
            if self.server.started or self._task.done():
                break
            await asyncio.sleep(0.01)
        if self._task.done():
            self._task.result()
            raise RuntimeError(f"server on {self.host}:{self.port} stopped at start")

    async def stop(self) -> None:
        self.server.should_exit = True
        if self._task is not None:
            await self._task
        self.sock.close()
