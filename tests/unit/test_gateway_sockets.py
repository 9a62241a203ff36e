"""The gateway behind a real uvicorn on loopback, its stub peers too: what the in-process
transport could hide (the raw path uvicorn gives, streaming over TCP) is checked here."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass

import httpx
import pytest

from tests.unit.test_gateway_harness import (
    ACCESS_KEY,
    BEARER,
    KEY_SECRET,
    FakeMembership,
    StubControl,
    StubPeer,
    gateway_signer,
    image_json,
    vm_json,
)
from yun.config import GatewaySettings
from yun.gateway.app import create_gateway_app
from yun.proto import signing
from yun.proto.client import PeerClient
from yun.util.serve import AppServer


class NetMembership(FakeMembership):
    """Peers reached over loopback sockets, as in production."""

    def _client(self, url: str, app: StubPeer) -> PeerClient:
        if url not in self._clients:
            self._clients[url] = PeerClient(url, gateway_signer())
        return self._clients[url]


@dataclass
class Served:
    http: httpx.AsyncClient
    port: int
    control: StubControl
    storage: StubPeer
    storage_url: str


@pytest.fixture
async def served() -> AsyncIterator[Served]:
    control, storage = StubControl(), StubPeer()
    servers = [AppServer(control, "127.0.0.1", 0), AppServer(storage, "127.0.0.1", 0)]
    for server in servers:
        await server.start()
    membership = NetMembership(control, storage)
    membership.controls[0] = membership.controls[0].model_copy(
        update={"url": f"http://127.0.0.1:{servers[0].port}"})
    gateway = AppServer(create_gateway_app(membership, GatewaySettings()),  # type: ignore[arg-type]
                        "127.0.0.1", 0)
    await gateway.start()
    servers.append(gateway)
    http = httpx.AsyncClient(base_url=f"http://127.0.0.1:{gateway.port}")
    try:
        yield Served(http, gateway.port, control, storage,
                     f"http://127.0.0.1:{servers[1].port}")
    finally:
        await http.aclose()
        for client in membership._clients.values():
            await client.aclose()
        for server in reversed(servers):
            await server.stop()


async def raw_get(port: int, target: str) -> int:
    """Send a request line exactly as given (no client-side normalisation); its status."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {target} HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer tok-alice\r\n"
                 f"Connection: close\r\n\r\n".encode())
    await writer.drain()
    status_line = await reader.readline()
    writer.close()
    return int(status_line.split()[1])


async def test_the_raw_path_is_what_is_signed_behind_uvicorn(served: Served) -> None:
    served.control.on("GET", "/internal/v1/vms/web-1", 200, vm_json("web-1"))
    path, query = "/api/v1/vms/web%2D1", [("a", "b c"), ("a", "ä")]
    headers = signing.sign_headers(ACCESS_KEY, KEY_SECRET, "GET", path, query, b"")
    resp = await served.http.get(path, params=query, headers=headers)
    assert resp.status_code == 200, resp.text


async def test_dot_segments_and_encoded_delimiters_never_reach_the_control_server(
        served: Served) -> None:
    assert await raw_get(served.port, "/api/v1/vms/..") == 422
    assert await raw_get(served.port, "/api/v1/vms/%2e%2e/console") == 422
    assert await raw_get(served.port, "/api/v1/vms/x%3Fname%3Ddemo") == 422
    assert await raw_get(served.port, "/api/v1/vms/x%23/console-log") == 422
    assert await raw_get(served.port, "/api/v1/vms/../nodes") == 404  # no such route
    assert served.control.calls() == []


async def test_a_tampered_signed_upload_is_cut_before_its_end(served: Served) -> None:
    image = image_json()
    served.control.on("POST", "/internal/v1/images", 201,
                      {"image": image, "storage_url": served.storage_url})
    served.control.on("DELETE", f"/internal/v1/images/{image['uuid']}", 204)
    served.storage.on("PUT", f"/internal/v1/images/{image['uuid']}/data", 200, {})
    path, query = "/api/v1/images", [("name", "disk")]
    headers = signing.sign_headers(ACCESS_KEY, KEY_SECRET, "POST", path, query, b"signed")
    resp = await served.http.post(path, params=query, content=b"other" * 200_000,
                                  headers=headers)
    assert resp.status_code == 401, resp.text
    assert "body does not match" in resp.json()["detail"]
    assert [s.complete for s in served.storage.seen] in ([], [False])
    assert ("DELETE", f"/internal/v1/images/{image['uuid']}") in [
        (s.method, s.raw_path) for s in served.control.calls()]


async def test_an_oversized_body_is_refused_over_tcp(served: Served) -> None:
    resp = await served.http.post("/api/v1/vms", content=b"{" + b" " * (2 << 20) + b"}",
                                  headers={**BEARER, "Content-Type": "application/json"})
    assert resp.status_code == 413, resp.text
    assert served.control.seen == []
