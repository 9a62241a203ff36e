"""Client side of the internal protocol: one authenticated client per peer.

Calls with whole bodies (nearly all) go through a keep-alive :class:`ConnectionPool` of
:mod:`yun.proto.http11`; streamed transfers (image bytes) use an httpx client
(:attr:`PeerClient.http`). Both sign every request with the component's key.
"""

from __future__ import annotations

import functools
import json as json_module
import ssl
import uuid
from collections.abc import Generator, Mapping
from typing import Any, Protocol, TypeVar
from urllib.parse import quote, urlencode, urlsplit

import httpx
from pydantic import BaseModel, ValidationError

from yun.proto import PROTOCOL_VERSION, REQUEST_ID_HEADER, VERSION_HEADER
from yun.proto.auth import CONTEXT_HEADER, Signer
from yun.proto.errors import PeerError, Problem, YunError, error_from_problem
from yun.proto.http11 import Answer, ConnectionPool, NoAnswer, NotSent, PoolGroup

M = TypeVar("M", bound=BaseModel)

# How long an idle connection to a peer is kept for the next call. Longer than a node's
# report interval and a control server's calls to one node at scale, so a call reuses
# its connection instead of paying a TLS handshake (both sides) each time; shorter than
# the servers' own keep-alive (yun.util.serve.KEEP_ALIVE_TIMEOUT), so a server never closes a
# connection the client is about to reuse.
KEEPALIVE_EXPIRY = 30.0
# Connections to one peer in use at once; more concurrent calls wait for one to be free.
MAX_CONNECTIONS = 128
# Characters a path may carry as they are (RFC 3986 pchar and "/"); "%" keeps the escapes
# a caller already made. Anything else is percent-encoded, as httpx would.
_PATH_SAFE = "/%:@!$&'()*+,;=-._~"


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


class HttpAnswer(Protocol):
    """What :func:`decode_response` and :func:`error_for` read of an answer: an
    :class:`~yun.proto.http11.Answer` or an ``httpx.Response``."""

    @property
    def status_code(self) -> int: ...
    @property
    def content(self) -> bytes: ...
    @property
    def is_success(self) -> bool: ...
    @property
    def text(self) -> str: ...
    def json(self) -> Any: ...


class PeerClient:
    """Speaks the internal protocol to one peer at ``base_url``.

    Requests are signed by ``signer`` (none before a join) and sent over TLS checked by
    ``tls`` (the domain CA and this component's client certificate). Connections are
    kept, so a TLS handshake is paid once per connection, not per call. Errors answered
    by the peer come back as the same :class:`YunError` subclass the peer raised; an
    unreachable peer raises :class:`PeerError`.
    """

    def __init__(
        self, base_url: str, signer: Signer | None = None, tls: ssl.SSLContext | None = None,
        *, timeout: float = 30.0, transport: httpx.AsyncBaseTransport | None = None,
        pools: PoolGroup | None = None,
    ) -> None:
        """``transport`` replaces the network for httpx (tests serve a peer in-process
        with ``httpx.ASGITransport``): without ``pools``, every call then goes through
        httpx. ``pools`` are connection pools shared with other clients of the process
        (the sim nodes of one process), used instead of a pool of this client's own."""
        self.base_url = base_url.rstrip("/")
        self.signer = signer
        self._timeout, self._transport = timeout, transport
        self._http: httpx.AsyncClient | None = None
        self._tls = tls
        self._pool: ConnectionPool | None = None
        self._owns_pool = True
        self._url_problem: str | None = None
        try:
            self._origin, self._prefix, self.authority = _split_peer_url(self.base_url)
        except ValueError as exc:
            # A peer URL taken from a record may be anything: calls to it fail as
            # unreachable, as they would through httpx.
            self._origin, self._prefix, self.authority = "", "", ""
            self._url_problem = str(exc)
            return
        if tls is None and self._origin.startswith("https:"):
            self._tls = _default_tls()
        url = urlsplit(self._origin)
        host, port = url.hostname or "", url.port or (443 if url.scheme == "https" else 80)
        tls_of_pool = self._tls if url.scheme == "https" else None
        self._owns_pool = pools is None
        if pools is not None:
            self._pool = pools.pool(host, port, tls_of_pool)
        elif transport is None:
            self._pool = ConnectionPool(host, port, tls_of_pool, max_connections=MAX_CONNECTIONS,
                                        keepalive_expiry=KEEPALIVE_EXPIRY)

    @property
    def http(self) -> httpx.AsyncClient:
        """An httpx client of the peer, for streaming transfers (opened on first use)."""
        if self._http is None:
            self._http = httpx.AsyncClient(
                base_url=self.base_url, timeout=self._timeout,
                verify=self._tls if self._tls is not None else True, transport=self._transport,
                auth=SigningAuth(self.signer) if self.signer is not None else None,
                limits=httpx.Limits(max_connections=MAX_CONNECTIONS,
                                    max_keepalive_connections=MAX_CONNECTIONS,
                                    keepalive_expiry=KEEPALIVE_EXPIRY))
        return self._http

    @property
    def connections_opened(self) -> int:
        """Connections the pool has opened so far (a steady load opens none)."""
        return self._pool.opened if self._pool is not None else 0

    async def send(
        self, method: str, path: str, *, params: Mapping[str, Any] | None = None,
        json: Any = None, headers: Mapping[str, str] | None = None,
        timeout: float | None = None,
    ) -> Answer:
        """Send one request, signed, and return its answer read whole.

        ``path`` is a path only: a ``?`` or ``#`` in it is percent-encoded like any other
        character a path may not hold, so the query goes in ``params``.

        Raises :class:`NotSent` when the peer could not be reached (nothing was sent: the
        call may go to another peer) and :class:`NoAnswer` when it gave no whole answer.
        """
        timeout = self._timeout if timeout is None else timeout
        body = None if json is None else json_module.dumps(
            json, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode()
        target = quote(self._prefix + path, safe=_PATH_SAFE)
        if params:
            target += "?" + urlencode(params, doseq=True, quote_via=quote)
        headers = dict(headers or {})
        if self._url_problem:
            raise NotSent(self._url_problem)
        if self._pool is None or method == "HEAD":
            # The pool's parser would wait for the body a HEAD answer announces but has not.
            return await self._send_through_httpx(method, target, headers, body, timeout)
        if self.signer is not None:
            headers.update(self.signer.headers(method, target, self.authority,
                                               headers.get(CONTEXT_HEADER)))
        return await self._pool.exchange(_message(method, target, self.authority, headers, body),
                                         timeout)

    async def _send_through_httpx(self, method: str, target: str, headers: dict[str, str],
                                  body: bytes | None, timeout: float) -> Answer:
        if body is not None:
            headers["Content-Type"] = "application/json"
        try:
            resp = await self.http.request(method, self._origin + target, content=body,
                                           headers=headers, timeout=timeout)
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            raise NotSent(f"{exc.__class__.__name__}: {exc}") from exc
        except httpx.HTTPError as exc:
            raise NoAnswer(f"{exc.__class__.__name__}: {exc}") from exc
        return Answer(resp.status_code, {k.lower(): v for k, v in resp.headers.items()},
                      resp.content)

    async def aclose(self) -> None:
        """Close this client's connections (shared pools stay open for the others)."""
        if self._pool is not None and self._owns_pool:
            await self._pool.aclose()
        if self._http is not None:
            await self._http.aclose()

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
        try:
            resp = await self.send(method, path, json=payload, params=params, timeout=timeout,
                                   headers={**self.headers(request_id), **(headers or {})})
        except (NotSent, NoAnswer) as exc:
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


def _split_peer_url(base_url: str) -> tuple[str, str, str]:
    """``base_url``'s origin, path prefix and authority (``host:port`` as httpx sends it,
    which is what the peer checks a signature against); ValueError if it is not one."""
    try:
        url = urlsplit(base_url)
        port = url.port
        authority = httpx.URL(base_url).netloc.decode("ascii")
    except (ValueError, httpx.InvalidURL) as exc:
        raise ValueError(f"not a peer URL: {base_url[:200]!r} ({exc})") from exc
    if url.scheme not in ("http", "https") or not url.hostname or port == 0:
        raise ValueError(f"not a peer URL: {base_url[:200]!r}")
    return f"{url.scheme}://{authority}", url.path, authority


@functools.cache
def _default_tls() -> ssl.SSLContext:
    """What httpx checks a server with when given no context: the system's CAs."""
    return ssl.create_default_context()


def _message(method: str, target: str, authority: str, headers: Mapping[str, str],
             body: bytes | None) -> bytes:
    """The whole HTTP/1.1 request. A header that could end the head early (a CR or LF in
    it) is refused: every value is the caller's, and some come from a client's input."""
    lines = [f"{method} {target} HTTP/1.1", f"Host: {authority}"]
    for name, value in headers.items():
        if "\r" in value or "\n" in value or not name or any(c in name for c in ":\r\n "):
            raise ValueError(f"header {name!r} may not hold a line break")
        lines.append(f"{name}: {value}")
    if body is not None:
        lines.append("Content-Type: application/json")
    if body is not None or method in ("POST", "PUT", "PATCH"):
        lines.append(f"Content-Length: {len(body or b'')}")
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    return head + body if body else head


def decode_response(resp: HttpAnswer, where: str) -> Any:
    """Return the JSON body of a success, or raise the peer's error."""
    if resp.status_code == 204 or not resp.content:
        if resp.is_success:
            return None
    if resp.is_success:
        return resp.json()
    raise error_for(resp, where)


def error_for(resp: HttpAnswer, where: str) -> YunError:
    """The error a failed answer stands for."""
    try:
        problem = Problem.model_validate(resp.json())
    except (ValueError, ValidationError):
        return PeerError(
            f"{where} answered HTTP {resp.status_code}: {resp.text[:200]}",
            peer_status=resp.status_code,
        )
    return error_from_problem(problem)
