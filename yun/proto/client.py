"""Client side of the internal protocol: one authenticated httpx client per peer."""

from __future__ import annotations

import ssl
import uuid
from collections.abc import Generator
from typing import Any, TypeVar

import httpx
from pydantic import BaseModel, ValidationError

from yun.proto import PROTOCOL_VERSION, REQUEST_ID_HEADER, VERSION_HEADER
from yun.proto.auth import CONTEXT_HEADER, Signer
from yun.proto.errors import PeerError, Problem, YunError, error_from_problem

M = TypeVar("M", bound=BaseModel)

# How long an idle connection to a peer is kept for the next call. Longer than a node's
# report interval and a control server's calls to one node at scale, so a call reuses
# its connection instead of paying a TLS handshake (both sides) each time; shorter than
# the servers' own keep-alive (yun.util.serve.KEEP_ALIVE_TIMEOUT), so a server never closes a
# connection the client is about to reuse.
KEEPALIVE_EXPIRY = 30.0
# Connections to one peer at once (POOL_SHARDS x SHARD_CONNECTIONS, see PeerClient); more
# concurrent calls wait for one to be free. Small shards: httpcore checks every connection
# of a pool for expiry on each request (a socket poll through anyio's TLS stream each), so
# a shard of 16 cost the gateway 20% more CPU per forwarded read than shards of 4.
POOL_SHARDS = 32
SHARD_CONNECTIONS = 4


class SigningAuth(httpx.Auth):
    """Signs every request an httpx client sends with this component's key: the final
    URL (path, query, authority) is known only here, after httpx has built the request."""

    def __init__(self, signer: Signer) -> None:
        self.signer = signer

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        request.headers.update(self.signer.headers(
            request.method, request.url.raw_path.decode("ascii"),
            request.url.netloc.decode("ascii"), request.headers.get(CONTEXT_HEADER)))
        yield request


class PeerClient:
    """Speaks the internal protocol to one peer at ``base_url``.

    Requests are signed by ``signer`` (none before a join) and sent over TLS checked by
    ``tls`` (the domain CA and this component's client certificate). The httpx clients
    keep their connections, so a TLS handshake is paid once per connection, not per call.
    Errors answered by the peer come back as the same :class:`YunError` subclass
    the peer raised; an unreachable peer raises :class:`PeerError`.

    The connections are split among up to ``POOL_SHARDS`` httpx clients of
    ``SHARD_CONNECTIONS`` each, opened as concurrency needs them: httpcore's pool walks
    all its connections for every request it assigns, several times over (its cost grows
    with the square of the connections: 45% of the gateway's CPU at 32 concurrent calls
    in one pool; 20% more per forwarded read with 16 per shard than with 4). A call goes
    to the first client with a free connection, so a peer called one at a time (a node)
    has one client.
    """

    def __init__(
        self, base_url: str, signer: Signer | None = None, tls: ssl.SSLContext | None = None,
        *, timeout: float = 30.0, transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        """``transport`` replaces the network (tests serve a peer in-process with
        ``httpx.ASGITransport``)."""
        self.base_url = base_url.rstrip("/")
        self.signer = signer
        self._timeout, self._tls, self._transport = timeout, tls, transport
        self._shards: list[httpx.AsyncClient] = []
        self._in_flight: list[int] = []
        self._new_shard()

    def _new_shard(self) -> int:
        self._shards.append(httpx.AsyncClient(
            base_url=self.base_url, timeout=self._timeout,
            verify=self._tls if self._tls is not None else True, transport=self._transport,
            auth=SigningAuth(self.signer) if self.signer is not None else None,
            # Every connection opened is kept (until KEEPALIVE_EXPIRY idle): with fewer
            # kept than opened, each burst closed the rest, and the next burst paid a TLS
            # handshake on both sides for each (tests/unit/test_peer_pool.py).
            limits=httpx.Limits(max_connections=SHARD_CONNECTIONS,
                                max_keepalive_connections=SHARD_CONNECTIONS,
                                keepalive_expiry=KEEPALIVE_EXPIRY)))
        self._in_flight.append(0)
        return len(self._shards) - 1

    def _shard(self) -> int:
        """The client for the next call: the first with a connection free, a new one if
        none has and there may be more, else the least busy."""
        for index, busy in enumerate(self._in_flight):
            if busy < SHARD_CONNECTIONS:
                return index
        if len(self._shards) < POOL_SHARDS:
            return self._new_shard()
        return min(range(len(self._shards)), key=self._in_flight.__getitem__)

    async def send(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        """Send one request through the pool (``kwargs`` as for ``httpx.AsyncClient.request``)
        and return the answer read whole; httpx errors propagate."""
        index = self._shard()
        self._in_flight[index] += 1
        try:
            return await self._shards[index].request(method, url, **kwargs)
        finally:
            self._in_flight[index] -= 1

    async def aclose(self) -> None:
        for shard in self._shards:
            await shard.aclose()

    async def __aenter__(self) -> PeerClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def headers(self, request_id: str | None = None) -> dict[str, str]:
        """Headers every internal request carries (the signature is added when it is sent)."""
        return {
            VERSION_HEADER: str(PROTOCOL_VERSION),
            REQUEST_ID_HEADER: request_id or uuid.uuid4().hex,
        }

    async def request(
        self,
        method: str,
        path: str,
        *,
        body: BaseModel | dict[str, Any] | None = None,
        params: dict[str, Any] | None = None,
        request_id: str | None = None,
        timeout: float | None = None,
        headers: dict[str, str] | None = None,
    ) -> Any:
        """Send one request and return the decoded JSON answer (None for 204)."""
        payload: Any = body.model_dump(mode="json") if isinstance(body, BaseModel) else body
        kwargs: dict[str, Any] = {}
        if timeout is not None:
            kwargs["timeout"] = timeout
        try:
            resp = await self.send(
                method, path, json=payload, params=params,
                headers={**self.headers(request_id), **(headers or {})}, **kwargs,
            )
        except httpx.HTTPError as exc:
            raise PeerError(
                f"{self.base_url} unreachable: {exc.__class__.__name__}: {exc}") from exc
        return decode_response(resp, self.base_url)

    async def call(
        self, method: str, path: str, model: type[M], **kwargs: Any
    ) -> M:
        """Like :meth:`request`, validating the answer against ``model``."""
        data = await self.request(method, path, **kwargs)
        try:
            return model.model_validate(data)
        except ValidationError as exc:
            raise PeerError(f"{self.base_url}{path} answered a malformed {model.__name__}") from exc

    @property
    def http(self) -> httpx.AsyncClient:
        """An underlying client (the first), for streaming transfers."""
        return self._shards[0]


def decode_response(resp: httpx.Response, where: str) -> Any:
    """Return the JSON body of a success, or raise the peer's error."""
    if resp.status_code == 204 or not resp.content:
        if resp.is_success:
            return None
    if resp.is_success:
        return resp.json()
    raise error_for(resp, where)


def error_for(resp: httpx.Response, where: str) -> YunError:
    """The error a failed answer stands for."""
    try:
        problem = Problem.model_validate(resp.json())
    except (ValueError, ValidationError):
        return PeerError(
            f"{where} answered HTTP {resp.status_code}: {resp.text[:200]}",
            peer_status=resp.status_code,
        )
    return error_from_problem(problem)
