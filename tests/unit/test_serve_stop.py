"""Stopping a TLS server does not wait for idle clients to answer its close_notify."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import httpx
from fastapi import FastAPI

from yun.proto.pki import (
    DomainCA,
    client_context,
    load_or_create_key,
    private_pem,
    server_context,
    serving_tls,
)
from yun.util.serve import AppServer


async def test_tls_server_stops_at_once_with_an_idle_keep_alive_client(tmp_path: Path) -> None:
    ca = DomainCA.load_or_create(tmp_path / "ca", "test")
    ca_pem = ca.cert_pem
    key = load_or_create_key(tmp_path / "server.key")
    cert_pem = ca.issue("server-1", "control", key.public_key(), "127.0.0.1", 3600)
    (tmp_path / "server.crt").write_bytes(cert_pem)
    (tmp_path / "server.pem").write_bytes(private_pem(key))
    app = FastAPI()

    @app.get("/ping")
    async def ping() -> dict[str, str]:
        return {"pong": "yes"}

    server = AppServer(app, "127.0.0.1", 0)
    await server.start(server_context(tmp_path / "server.crt", tmp_path / "server.pem", ca_pem,
                                      require_client_cert=False))
    client = httpx.AsyncClient(verify=client_context(ca_pem))
    try:
        resp = await client.get(f"https://127.0.0.1:{server.port}/ping")
        assert resp.json() == {"pong": "yes"}
        # The client keeps its connection in its pool, idle, and reads nothing from it.
        started = time.monotonic()
        await server.stop()
        assert time.monotonic() - started < 3.0  # uvicorn's graceful timeout is 5 s
    finally:
        await client.aclose()


async def test_readiness_probe_tells_a_serving_tls_port_from_a_bound_one(tmp_path: Path) -> None:
    """The probe the all-in-one and the system harness use: a port that requires a client
    certificate it does not have still counts as serving; a bound socket nobody serves
    does not."""
    ca = DomainCA.load_or_create(tmp_path / "ca", "test")
    key = load_or_create_key(tmp_path / "server.key")
    (tmp_path / "server.crt").write_bytes(
        ca.issue("server-1", "node", key.public_key(), "127.0.0.1", 3600))
    (tmp_path / "server.pem").write_bytes(private_pem(key))
    server = AppServer(FastAPI(), "127.0.0.1", 0)
    assert not await asyncio.to_thread(serving_tls, "127.0.0.1", server.port, 1.0)
    await server.start(server_context(tmp_path / "server.crt", tmp_path / "server.pem",
                                      ca.cert_pem, require_client_cert=True))
    try:
        assert await asyncio.to_thread(serving_tls, "127.0.0.1", server.port, 2.0)
    finally:
        await server.stop()
