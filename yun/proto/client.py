"""Client side of the internal protocol: one authenticated httpx client per peer."""

from __future__ import annotations

import functools
import ssl
import uuid
from typing import Any, TypeVar

import httpx
from pydantic import BaseModel, ValidationError

from yun.proto import PROTOCOL_VERSION, REQUEST_ID_HEADER, VERSION_HEADER
from yun.proto.auth import authorization_header
from yun.proto.errors import PeerError, Problem, YunError, error_from_problem

M = TypeVar("M", bound=BaseModel)


@functools.cache
def _tls_context() -> ssl.SSLContext:
    """One verifying TLS context for every peer client: loading the CA bundle costs ~20 ms
    of CPU, paid once per process instead of once per peer."""
    return ssl.create_default_context()


class PeerClient:
    """Speaks the internal protocol to one peer at ``base_url``.

    Errors answered by the peer come back as the same :class:`YunError` subclass
    the peer raised; an unreachable peer raises :class:`PeerError`.
    """

    def __init__(
        self, base_url: str, credential: str | None = None, *, timeout: float = 30.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        """``transport`` replaces the network (tests serve a peer in-process with
        ``httpx.ASGITransport``)."""
        self.base_url = base_url.rstrip("/")
        self.credential = credential
        self._client = httpx.AsyncClient(base_url=self.base_url, timeout=timeout,
                                         verify=_tls_context(), transport=transport)

    async def aclose(self) -> None:
        await self._client.aclose()

    async def __aenter__(self) -> PeerClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def headers(self, request_id: str | None = None) -> dict[str, str]:
        """Headers every internal request carries."""
        headers = {
            VERSION_HEADER: str(PROTOCOL_VERSION),
            REQUEST_ID_HEADER: request_id or uuid.uuid4().hex,
        }
        if self.credential:
            headers["Authorization"] = authorization_header(self.credential)
        return headers

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
