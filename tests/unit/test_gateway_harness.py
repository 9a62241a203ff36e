"""Shared by the gateway unit tests: a recording stub control server, a stub storage
server and a gateway wired to them in-process (no sockets, no domain).

The stubs record exactly what reached them (method, raw path, query, headers, body):
what is under test is what the gateway sends and answers, not the control server.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import httpx
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from fastapi import FastAPI
from starlette.types import Receive, Scope, Send

from yun.config import GatewaySettings
from yun.gateway.app import create_gateway_app
from yun.proto.auth import Signer, Verifier, issue_credential
from yun.proto.client import PeerClient
from yun.proto.components import ComponentType
from yun.proto.context import (
    AnonymousContext,
    AuthResult,
    KeyAuthResult,
    RequestContext,
    decode_context,
)
from yun.proto.identity import Role
from yun.proto.messages import Peer

GATEWAY_ID = "gw-0001"
# A domain CA and the gateway's key pair, so the stubs can check what a real peer checks.
CA_KEY = Ed25519PrivateKey.generate()
GATEWAY_KEY = Ed25519PrivateKey.generate()
GATEWAY_CREDENTIAL = issue_credential(CA_KEY, GATEWAY_ID, ComponentType.GATEWAY.value,
                                      GATEWAY_KEY.public_key(), ttl=3600)
CLIENT_IP = "203.0.113.7"
TOKEN = "tok-alice"
ACCESS_KEY = "AKIDALICE0001"
KEY_SECRET = "s3cr3t-of-alice-key"

Handler = Callable[["Seen"], tuple[int, Any] | tuple[int, Any, dict[str, str]]]


@dataclass
class Seen:
    """One request as it reached a stub."""

    method: str
    raw_path: str
    query: str
    headers: dict[str, str]
    body: bytes
    complete: bool = True

    def json(self) -> Any:
        return json.loads(self.body) if self.body else None


def gateway_signer() -> Signer:
    return Signer(GATEWAY_KEY, GATEWAY_CREDENTIAL)


def received_context(seen: Seen, audience: str = "control.test"
                     ) -> RequestContext | AnonymousContext:
    """The context a request carried, after checking its signature as a control server
    addressed as ``audience`` would."""
    verifier = Verifier(lambda: [audience], CA_KEY.public_key())
    target = seen.raw_path + (f"?{seen.query}" if seen.query else "")
    caller = verifier.verify(seen.method, target, seen.headers)
    assert caller.component_id == GATEWAY_ID
    return decode_context(seen.headers["x-yun-context"], caller.component_type)


def alice(**changes: Any) -> RequestContext:
    base = RequestContext(user_uuid=str(uuid.UUID(int=1)), user_name="alice",
                          project_uuid=str(uuid.UUID(int=2)), project_name="web",
                          roles=frozenset({Role.MEMBER}), credential_id=str(uuid.UUID(int=3)))
    return base.model_copy(update=changes)


def problem(status: int, detail: str) -> tuple[int, dict[str, Any]]:
    return status, {"type": "about:blank", "title": "x", "status": status, "detail": detail}


@dataclass
class StubPeer:
    """A peer answering from ``routes`` (exact ``METHOD raw-path``) or ``fallback``."""

    routes: dict[str, Handler] = field(default_factory=dict)
    seen: list[Seen] = field(default_factory=list)
    fallback: Handler | None = None

    def on(self, method: str, path: str, status: int, data: Any = None,
           headers: dict[str, str] | None = None) -> None:
        self.routes[f"{method} {path}"] = lambda _seen: (status, data, headers or {})

    def calls(self, prefix: str = "/internal/v1/") -> list[Seen]:
        """What reached the stub, except the credential checks."""
        return [s for s in self.seen if s.raw_path.startswith(prefix)
                and not s.raw_path.startswith("/internal/v1/auth/verify-token")
                and not s.raw_path.startswith("/internal/v1/auth/key")]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":  # served by uvicorn in the socket tests
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        chunks, complete = [], False
        while True:
            message = await receive()
            if message["type"] != "http.request":
                break
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                complete = True
                break
        seen = Seen(scope["method"], scope["raw_path"].decode("latin-1"),
                    scope["query_string"].decode("latin-1"),
                    {k.decode().lower(): v.decode("latin-1") for k, v in scope["headers"]},
                    b"".join(chunks), complete)
        self.seen.append(seen)
        handler = self.routes.get(f"{seen.method} {seen.raw_path}", self.fallback)
        result = handler(seen) if handler else problem(404, f"stub: no {seen.raw_path}")
        status, data, headers = (result[0], result[1], result[2] if len(result) > 2 else {})
        body = b"" if data is None else (data.encode() if isinstance(data, str)
                                         else json.dumps(data).encode())
        media = "text/plain" if isinstance(data, str) else (
            "application/problem+json" if status >= 400 else "application/json")
        raw_headers = [(b"content-type", media.encode())] + [
            (k.encode(), v.encode()) for k, v in headers.items()]
        await send({"type": "http.response.start", "status": status, "headers": raw_headers})
        await send({"type": "http.response.body", "body": body})


class StubControl(StubPeer):
    """A control server knowing one token and one API key of alice's."""

    def __init__(self) -> None:
        super().__init__()
        self.tokens: dict[str, AuthResult] = {
            TOKEN: AuthResult(context=alice(), expires_at=4102444800.0)}
        self.keys: dict[str, KeyAuthResult | None] = {
            ACCESS_KEY: KeyAuthResult(secret=KEY_SECRET, context=alice(auth="key"))}
        self.routes["POST /internal/v1/auth/verify-token"] = self._verify
        self.routes["POST /internal/v1/auth/key"] = self._key

    def _verify(self, seen: Seen) -> tuple[int, Any]:
        result = self.tokens.get(seen.json()["token"])
        if result is None:
            return problem(401, "the token is not valid")
        return 200, result.model_dump(mode="json")

    def _key(self, seen: Seen) -> tuple[int, Any]:
        access_key = seen.json()["access_key"]
        if access_key not in self.keys:
            return problem(401, "unknown access key")
        result = self.keys[access_key]
        if result is None:
            return problem(401, "the API key is disabled")
        return 200, result.model_dump(mode="json")

    def auth_calls(self) -> list[Seen]:
        return [s for s in self.seen if s.raw_path.startswith("/internal/v1/auth/")
                and s.raw_path.split("/")[-1] in ("verify-token", "key")]


class FakeMembership:
    """What the gateway uses of a Membership, with its peers served in-process."""

    def __init__(self, control: StubPeer, storage: StubPeer) -> None:
        self.component_id: str | None = GATEWAY_ID
        self.control = control
        self.storage = storage
        self.controls = [Peer(component_id="ctl-1", type=ComponentType.CONTROL,
                              name="ctl-1", url="http://control.test")]
        self._clients: dict[str, PeerClient] = {}

    def peers_of(self, component_type: ComponentType) -> list[Peer]:
        return list(self.controls) if component_type == ComponentType.CONTROL else []

    def _client(self, url: str, app: StubPeer) -> PeerClient:
        if url not in self._clients:
            self._clients[url] = PeerClient(url, gateway_signer(),
                                            transport=httpx.ASGITransport(app=app))
        return self._clients[url]

    def client(self, peer: Peer) -> PeerClient:
        return self._client(peer.url, self.control)

    def client_for_url(self, url: str) -> PeerClient:
        return self._client(url, self.storage)


@dataclass
class Gateway:
    app: FastAPI
    http: httpx.AsyncClient
    control: StubControl
    storage: StubPeer
    membership: FakeMembership


def make_gateway(**settings: Any) -> Gateway:
    """A gateway app over stub peers, and a client speaking to it from ``CLIENT_IP``."""
    control, storage = StubControl(), StubPeer()
    membership = FakeMembership(control, storage)
    app = create_gateway_app(membership, GatewaySettings(**settings))  # type: ignore[arg-type]
    http = httpx.AsyncClient(transport=httpx.ASGITransport(app=app, client=(CLIENT_IP, 5555)),
                             base_url="http://gateway.test")
    return Gateway(app, http, control, storage, membership)


BEARER = {"Authorization": f"Bearer {TOKEN}"}


def stamp() -> str:
    return datetime(2026, 1, 1, tzinfo=UTC).isoformat()


def vm_json(name: str = "web-1", state: str = "running") -> dict[str, Any]:
    return {"uuid": str(uuid.uuid4()), "name": name, "state": state, "vcpus": 1,
            "memory_mb": 256, "disk_gb": 1, "image_uuid": str(uuid.uuid4()),
            "created_at": stamp(), "updated_at": stamp()}


def task_json(state: str = "running", task_uuid: str | None = None) -> dict[str, Any]:
    return {"uuid": task_uuid or str(uuid.uuid4()), "kind": "vm.start",
            "resource_type": "vm", "resource_uuid": str(uuid.uuid4()), "state": state,
            "created_at": stamp(), "updated_at": stamp()}


def image_json(status: str = "uploading", image_uuid: str | None = None) -> dict[str, Any]:
    return {"uuid": image_uuid or str(uuid.uuid4()), "name": "disk", "status": status,
            "created_at": stamp(), "updated_at": stamp()}


async def chunks(total: int, size: int = 64 * 1024,
                 counter: list[int] | None = None) -> AsyncIterator[bytes]:
    """An async body of ``total`` bytes; ``counter[0]`` counts what was pulled from it."""
    sent = 0
    while sent < total:
        piece = min(size, total - sent)
        sent += piece
        if counter is not None:
            counter[0] = sent
        yield b"x" * piece

