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
# Connections to one peer at once; more concurrent calls wait for one to be free.
MAX_CONNECTIONS = 100


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
    ``tls`` (the domain CA and this component's client certificate). The httpx client
    keeps its connections, so a TLS handshake is paid once per connection, not per call.
    Errors answered by the peer come back as the same :class:`YunError` subclass
    the peer raised; an unreachable peer raises :class:`PeerError`.
    """

    def __init__(
        self, base_url: str, signer: Signer | None = None, tls: ssl.SSLContext | None = None,
        *, timeout: float = 30.0, transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        """``transport`` replaces the network (tests serve a peer in-process with
        ``httpx.ASGITransport``)."""
        self.base_url = base_url.rstrip("/")
        self.signer = signer
        self._client = httpx.AsyncClient(
            base_url=self.base_url, timeout=timeout, verify=tls if tls is not None else True,
            transport=transport, auth=SigningAuth(signer) if signer is not None else None,
            # Every connection opened is kept (until KEEPALIVE_EXPIRY idle): with fewer
            # kept than opened, each burst above that many closed the rest, and the next
            # burst paid a TLS handshake on both sides for each (tests/unit/test_peer_pool).
            limits=httpx.Limits(max_connections=MAX_CONNECTIONS,
                                max_keepalive_connections=MAX_CONNECTIONS,
                                keepalive_expiry=KEEPALIVE_EXPIRY))

    async def aclose(self) -> None:
        await self._client.aclose()

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
            resp = await self._client.request(
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
        """The underlying client, for streaming transfers."""
        return self._client


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
