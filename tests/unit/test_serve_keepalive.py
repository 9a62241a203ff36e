"""An idle keep-alive connection outlives the clients' pools: the server never closes one
a client may be about to reuse."""

from __future__ import annotations

import asyncio

from fastapi import FastAPI

from yun.util.serve import AppServer

# How long httpx (every Yun client, the gateway's relay included) keeps an idle pooled
# connection before it drops it itself.
HTTPX_KEEPALIVE_EXPIRY = 5.0


async def _get(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bytes:
    writer.write(b"GET /ping HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    await writer.drain()
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                  if line.lower().startswith(b"content-length:"))
    return head.split(b" ", 2)[1] + b" " + await reader.readexactly(length)


async def test_idle_connection_stays_open_past_the_client_pool_expiry() -> None:
    app = FastAPI()

    @app.get("/ping")
    async def ping() -> str:
        return "pong"

    server = AppServer(app, "127.0.0.1", 0)
    await server.start()
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    try:
        assert await _get(reader, writer) == b'200 "pong"'
        # Idle a little longer than a client's pool keeps the connection: the server must
        # not have closed it (before: it did at 5 s, and a request crossing that close got
        # no answer).
        await asyncio.sleep(HTTPX_KEEPALIVE_EXPIRY + 0.5)
        assert not reader.at_eof()
        assert await _get(reader, writer) == b'200 "pong"'
    finally:
        writer.close()
        await server.stop()
