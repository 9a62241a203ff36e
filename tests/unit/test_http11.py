"""The internal protocol's keep-alive client (yun.proto.http11, through PeerClient): what
it does when a peer closes, stalls, lies about framing, or the caller gives up. Each
peer here is a raw socket server, so the bytes on the wire are the test's own."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
import uvloop
from fastapi import FastAPI, Request

from yun.proto.client import PeerClient
from yun.proto.errors import NotFound, PeerError
from yun.proto.http11 import ConnectionPool, NoAnswer, NotSent
from yun.proto.pki import DomainCA, client_context, load_or_create_key, private_pem, server_context
from yun.util.serve import AppServer

Handler = Callable[[bytes, asyncio.StreamWriter], Awaitable[None]]


def ok(body: bytes = b'"ok"', extra: bytes = b"") -> bytes:
    return (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n" + extra
            + b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)


def recording() -> tuple[list[bytes], Handler]:
    """A handler answering "ok" to everything, and the requests it received."""
    seen: list[bytes] = []

    async def handler(request: bytes, writer: asyncio.StreamWriter) -> None:
        seen.append(request)
        writer.write(ok())
        await writer.drain()

    return seen, handler


@contextlib.asynccontextmanager
async def peer(handler: Handler) -> AsyncIterator[tuple[PeerClient, list[int]]]:
    """A client of a raw server calling ``handler`` with each request head; also the
    count of connections the server accepted, one entry per connection."""
    accepted: list[int] = []
    handlers: set[asyncio.Task[None]] = set()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(1)
        task = asyncio.current_task()
        assert task is not None
        handlers.add(task)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                               if line.lower().startswith(b"content-length:")), 0)
                body = await reader.readexactly(length)
                await handler(head + body, writer)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    client = PeerClient(f"http://127.0.0.1:{port}", timeout=5)
    try:
        yield client, accepted
    finally:
        await client.aclose()
        server.close()
        for task in handlers:
            task.cancel()
        await asyncio.gather(*handlers, return_exceptions=True)
        await server.wait_closed()


async def test_keep_alive_and_a_connection_the_peer_closed_is_not_reused() -> None:
    closing = False

    async def handler(request: bytes, writer: asyncio.StreamWriter) -> None:
        writer.write(ok())
        await writer.drain()
        if closing:
            writer.close()

    async with peer(handler) as (client, accepted):
        for _ in range(3):
            assert await client.request("GET", "/a") == "ok"
        assert len(accepted) == 1
        closing = True
        assert await client.request("GET", "/a") == "ok"
        await asyncio.sleep(0.1)  # the close reaches the client
        closing = False
        # The pool learnt of the close at once: the next call opens a new connection
        # instead of writing into the closed one and getting no answer.
        assert await client.request("GET", "/a") == "ok"
        assert len(accepted) == 2


async def test_a_late_answer_never_reaches_the_next_call() -> None:
    calls = 0

    async def handler(request: bytes, writer: asyncio.StreamWriter) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            await asyncio.sleep(0.5)  # past the caller's timeout
            writer.write(ok(b'"first"'))
        else:
            writer.write(ok(b'"second"'))
        await writer.drain()

    async with peer(handler) as (client, accepted):
        with pytest.raises(NoAnswer, match="no answer"):
            await client.send("GET", "/slow", timeout=0.2)
        assert await client.request("GET", "/next") == "second"
        assert len(accepted) == 2  # the timed-out connection was dropped


async def test_a_cancelled_call_drops_its_connection() -> None:
    release = asyncio.Event()

    async def handler(request: bytes, writer: asyncio.StreamWriter) -> None:
        if b"/stall" in request:
            await release.wait()
            writer.write(ok(b'"stalled"'))
        else:
            writer.write(ok(b'"fresh"'))
        await writer.drain()

    async with peer(handler) as (client, accepted):
        call = asyncio.create_task(client.request("GET", "/stall"))
        await asyncio.sleep(0.1)
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        release.set()
        assert await client.request("GET", "/other") == "fresh"
        assert len(accepted) == 2


async def test_chunked_answers_and_repeated_headers() -> None:
    async def handler(request: bytes, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                     b"X-Many: a\r\nX-Many: b\r\nTransfer-Encoding: chunked\r\n\r\n"
                     b"4\r\n{\"a\"\r\n3\r\n: 1\r\n1\r\n}\r\n0\r\n\r\n")
        await writer.drain()

    async with peer(handler) as (client, accepted):
        answer = await client.send("GET", "/chunks")
        assert answer.json() == {"a": 1}
        assert answer.headers["x-many"] == "a, b"
        assert await client.request("GET", "/chunks") == {"a": 1}
        assert len(accepted) == 1


async def test_a_malformed_answer_is_no_answer_and_the_connection_is_dropped() -> None:
    bad = True

    async def handler(request: bytes, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 abc nonsense\r\n\r\n" if bad else ok())
        await writer.drain()

    async with peer(handler) as (client, accepted):
        with pytest.raises(PeerError, match="malformed answer"):
            await client.request("GET", "/x")
        bad = False
        assert await client.request("GET", "/x") == "ok"
        assert len(accepted) == 2


async def test_an_error_answer_is_the_peers_error() -> None:
    async def handler(request: bytes, writer: asyncio.StreamWriter) -> None:
        body = b'{"type":"about:blank","title":"Not Found","status":404,"detail":"no vm x"}'
        writer.write(b"HTTP/1.1 404 Not Found\r\nContent-Type: application/problem+json\r\n"
                     b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        await writer.drain()

    async with peer(handler) as (client, _):
        with pytest.raises(NotFound, match="no vm x"):
            await client.request("GET", "/vms/x")


async def test_what_is_sent_on_the_wire() -> None:
    seen, handler = recording()
    async with peer(handler) as (client, _):
        await client.request("POST", "/a b/ü", body={"name": "é"},
                             params={"q": "state=running and x", "flag": ["1", "2"]})
        await client.request("DELETE", "/thing")
        await client.request("GET", "/q?x=1#f")  # no query or fragment through the path
    head, _, body = seen[0].partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    assert lines[0] == (b"POST /a%20b/%C3%BC?q=state%3Drunning%20and%20x&flag=1&flag=2 "
                        b"HTTP/1.1")
    assert body == '{"name":"é"}'.encode()
    assert f"content-length: {len(body)}".encode() in [line.lower() for line in lines]
    assert seen[1].startswith(b"DELETE /thing HTTP/1.1\r\n")
    assert b"content-length" not in seen[1].lower()
    assert seen[2].startswith(b"GET /q%3Fx=1%23f HTTP/1.1\r\n")


async def test_a_head_answer_without_its_announced_body_ends() -> None:
    async def handler(request: bytes, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\n")
        await writer.drain()

    async with peer(handler) as (client, _):
        answer = await client.send("HEAD", "/x", timeout=2)
        assert answer.status_code == 200 and answer.content == b""


async def test_a_header_with_a_line_break_is_refused_before_anything_is_sent() -> None:
    seen, handler = recording()
    async with peer(handler) as (client, accepted):
        with pytest.raises(ValueError, match="line break"):
            await client.send("GET", "/a", headers={"X-Yun-Request-Id": "x\r\nX-Evil: 1"})
        assert seen == [] and accepted == []


async def test_an_unreachable_peer_is_not_sent_and_a_bad_url_fails_as_unreachable(
) -> None:
    server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    server.close()
    await server.wait_closed()
    async with PeerClient(f"http://127.0.0.1:{port}", timeout=2) as client:
        with pytest.raises(NotSent, match="could not connect"):
            await client.send("POST", "/create", json={})
    for url in ("u", "ftp://host/x", "https://h:99999x", "https://:80"):
        async with PeerClient(url) as client:
            with pytest.raises(PeerError, match="not a peer URL"):
                await client.request("GET", "/x")


async def test_calls_beyond_the_pool_wait_for_a_free_connection() -> None:
    async def handler(request: bytes, writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(0.05)
        writer.write(ok())
        await writer.drain()

    async with peer(handler) as (client, accepted):
        port = int(client.authority.rsplit(":", 1)[1])
        pool = ConnectionPool("127.0.0.1", port, max_connections=3)
        request = b"GET /x HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
        answers = await asyncio.gather(*(pool.exchange(request, 5) for _ in range(12)))
        assert [a.json() for a in answers] == ["ok"] * 12
        assert pool.opened == 3 and len(accepted) == 3
        await pool.aclose()
        with pytest.raises(NotSent, match="closed"):
            await pool.exchange(request, 5)


def test_over_tls_on_uvloop_as_every_component_runs(tmp_path: Path) -> None:
    """uvloop's TLS transport (not an asyncio.Transport subclass) carries the exchanges,
    the client's certificate is presented, and a wrong CA is refused before sending."""
    ca = DomainCA.load_or_create(tmp_path / "ca", "test")
    key = load_or_create_key(tmp_path / "server.key")
    (tmp_path / "server.crt").write_bytes(
        ca.issue("server-1", "control", key.public_key(), "127.0.0.1", 3600))
    (tmp_path / "server.pem").write_bytes(private_pem(key))
    other = DomainCA.load_or_create(tmp_path / "other", "other")
    app = FastAPI()

    @app.post("/echo")
    async def echo(request: Request) -> dict[str, object]:
        return {"got": await request.json(), "tls": request.scope.get("scheme")}

    async def main() -> None:
        server = AppServer(app, "127.0.0.1", 0)
        await server.start(server_context(tmp_path / "server.crt", tmp_path / "server.pem",
                                          ca.cert_pem, require_client_cert=False))
        try:
            async with PeerClient(f"https://127.0.0.1:{server.port}",
                                  tls=client_context(ca.cert_pem)) as client:
                for i in range(3):
                    assert await client.request("POST", "/echo", body={"i": i}) == {
                        "got": {"i": i}, "tls": "https"}
                assert client.connections_opened == 1
            async with PeerClient(f"https://127.0.0.1:{server.port}",
                                  tls=client_context(other.cert_pem)) as stranger:
                with pytest.raises(NotSent, match="certificate verify failed"):
                    await stranger.send("POST", "/echo", json={})
        finally:
            await server.stop()

    uvloop.run(main())
