"""A peer client keeps every connection it opened for the next calls, however many ran at
once: one closed after each burst is a TLS handshake on both sides at the next (issue 10:
the gateway's 32 concurrent reads to the control server kept only 20, and the handshakes
were a fifth of the control server's CPU)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request

from yun.proto.client import MAX_CONNECTIONS, PeerClient
from yun.util.serve import AppServer

CONCURRENT = 48


@contextlib.asynccontextmanager
async def client_of(app: FastAPI) -> AsyncIterator[PeerClient]:
    """A peer client of ``app`` served on a free local port (plain HTTP)."""
    server = AppServer(app, "127.0.0.1", 0)
    await server.start()
    client = PeerClient(f"http://127.0.0.1:{server.port}")
    try:
        yield client
    finally:
        await client.aclose()
        await server.stop()


async def test_connections_of_a_burst_are_all_kept_for_the_next() -> None:
    app = FastAPI()
    connections: set[tuple[str, int]] = set()
    arrived = asyncio.Event()
    waiting = 0

    @app.get("/work")
    async def work(request: Request) -> str:
        nonlocal waiting
        assert request.client is not None
        connections.add((request.client.host, request.client.port))
        waiting += 1
        if waiting == CONCURRENT:  # every request of the burst in flight at once
            arrived.set()
        await asyncio.wait_for(arrived.wait(), 10)
        return "done"

    async with client_of(app) as client:
        for burst in range(3):
            arrived.clear()
            waiting = 0
            answers = await asyncio.gather(*(client.request("GET", "/work")
                                             for _ in range(CONCURRENT)))
            assert answers == ["done"] * CONCURRENT
            assert len(connections) == CONCURRENT, (burst, len(connections))


async def test_calls_one_at_a_time_use_one_connection_and_a_crowd_still_gets_through(
) -> None:
    app = FastAPI()
    connections: set[tuple[str, int]] = set()

    @app.get("/work")
    async def work(request: Request) -> str:
        assert request.client is not None
        connections.add((request.client.host, request.client.port))
        await asyncio.sleep(0.01)
        return "done"

    async with client_of(app) as client:
        for _ in range(5):
            assert await client.request("GET", "/work") == "done"
        assert len(connections) == 1
        # More calls at once than the pool has connections: the rest wait their turn.
        crowd = 2 * MAX_CONNECTIONS
        answers = await asyncio.gather(*(client.request("GET", "/work")
                                         for _ in range(crowd)))
        assert answers == ["done"] * crowd
        assert len(connections) == MAX_CONNECTIONS
