"""The two clients: :class:`Client` (blocking) and :class:`AsyncClient`, with the same
namespaces; only how a call is awaited differs."""

from __future__ import annotations

import json as jsonlib
import ssl
from collections.abc import Mapping
from types import TracebackType
from typing import Any, Generic

import httpx

from yun.client._core import Call, QueryValue, R, any_json
from yun.client._runners import AsyncRunner, SyncRunner
from yun.client.addresses import AddressPools, ElasticIps
from yun.client.auth import TokenAuth
from yun.client.compute import Images, Nodes, Tasks, Vms
from yun.client.identity import (
    Audit,
    Auth,
    CurrentQuota,
    Departments,
    Keys,
    Projects,
    Roles,
    SshKeys,
    Users,
)
from yun.client.pools import Pools, VmGroups, Zones
from yun.client.routers import Routers
from yun.client.volumes import Events, Volumes
from yun.proto.identity import IssuedToken

API_PREFIX = "/api/v1"
USER_AGENT = "yun-client/1"
DEFAULT_TIMEOUT = 60.0


def gateway_url(url: str) -> str:
    """The gateway's root URL, whether or not ``url`` ends with ``/api/v1``."""
    url = url.rstrip("/")
    return url[: -len(API_PREFIX)] if url.endswith(API_PREFIX) else url


class _Namespaces(Generic[R]):
    """Every namespace, bound to one runner; shared by both clients."""

    def __init__(self, runner: R) -> None:
        self._runner = runner
        self.vms = Vms(runner)
        self.volumes = Volumes(runner)
        self.events = Events(runner)
        self.images = Images(runner)
        self.nodes = Nodes(runner)
        self.zones = Zones(runner)
        self.pools = Pools(runner)
        self.vm_groups = VmGroups(runner)
        self.address_pools = AddressPools(runner)
        self.eips = ElasticIps(runner)
        self.routers = Routers(runner)
        self.tasks = Tasks(runner)
        self.projects = Projects(runner)
        self.departments = Departments(runner)
        self.users = Users(runner)
        self.roles = Roles(runner)
        self.keys = Keys(runner)
        self.ssh_keys = SshKeys(runner)
        self.quota = CurrentQuota(runner)
        self.audit = Audit(runner)
        self.auth = Auth(runner)


def _raw(method: str, path: str, params: Mapping[str, QueryValue] | None,
         json: Any, headers: Mapping[str, str] | None) -> Call[Any]:
    # A plain JSON body travels pre-encoded: a call's body is otherwise a model.
    content = None if json is None else jsonlib.dumps(json).encode()
    head = {**(headers or {}), **({"Content-Type": "application/json"} if content else {})}
    return Call(method, path, any_json, params=params or {}, content=content, headers=head)


class Client(_Namespaces[SyncRunner]):
    """A blocking client of the REST API at ``url`` (the gateway, ``/api/v1`` optional).

    ``auth`` is a :class:`~yun.client.TokenAuth`, a :class:`~yun.client.KeyPairAuth`,
    or None for the one route that needs none (:meth:`login` uses it). ``transport``
    replaces httpx's network transport (tests). Use it as a context manager or
    :meth:`close` it."""

    def __init__(self, url: str, auth: httpx.Auth | None = None, *,
                 timeout: float = DEFAULT_TIMEOUT, verify: bool | ssl.SSLContext = True,
                 transport: httpx.BaseTransport | None = None) -> None:
        self.url = gateway_url(url)
        self.http = httpx.Client(base_url=self.url + API_PREFIX, auth=auth, timeout=timeout,
                                 verify=verify, transport=transport,
                                 headers={"User-Agent": USER_AGENT})
        super().__init__(SyncRunner(self.http))

    @classmethod
    def login(cls, url: str, username: str, password: str, project: str | None = None, *,
              ttl: float | None = None, timeout: float = DEFAULT_TIMEOUT,
              verify: bool | ssl.SSLContext = True,
              transport: httpx.BaseTransport | None = None) -> tuple[Client, IssuedToken]:
        """Log in with a password: a client using the new token, and the token."""
        options: dict[str, Any] = {"timeout": timeout, "verify": verify, "transport": transport}
        with cls(url, **options) as anonymous:
            issued = anonymous.auth.login(username, password, project, ttl)
        return cls(url, TokenAuth(issued.token), **options), issued

    def request(self, method: str, path: str, *, params: Mapping[str, QueryValue] | None = None,
                json: Any = None, headers: Mapping[str, str] | None = None) -> Any:
        """Call a route the namespaces do not cover; ``path`` is relative to ``/api/v1``
        and must be quoted already. Returns the decoded JSON, text, or None."""
        return self._runner.run(_raw(method, path, params, json, headers))

    def close(self) -> None:
        """Close the connections."""
        self.http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


class AsyncClient(_Namespaces[AsyncRunner]):
    """The asynchronous twin of :class:`Client`: every call is awaited, every
    ``iterate`` is an async iterator. Use it with ``async with`` or :meth:`aclose` it."""

    def __init__(self, url: str, auth: httpx.Auth | None = None, *,
                 timeout: float = DEFAULT_TIMEOUT, verify: bool | ssl.SSLContext = True,
                 transport: httpx.AsyncBaseTransport | None = None) -> None:
        self.url = gateway_url(url)
        self.http = httpx.AsyncClient(base_url=self.url + API_PREFIX, auth=auth,
                                      timeout=timeout, verify=verify, transport=transport,
                                      headers={"User-Agent": USER_AGENT})
        super().__init__(AsyncRunner(self.http))

    @classmethod
    async def login(cls, url: str, username: str, password: str, project: str | None = None,
                    *, ttl: float | None = None, timeout: float = DEFAULT_TIMEOUT,
                    verify: bool | ssl.SSLContext = True,
                    transport: httpx.AsyncBaseTransport | None = None,
                    ) -> tuple[AsyncClient, IssuedToken]:
        """Log in with a password: a client using the new token, and the token."""
        options: dict[str, Any] = {"timeout": timeout, "verify": verify, "transport": transport}
        async with cls(url, **options) as anonymous:
            issued = await anonymous.auth.login(username, password, project, ttl)
        return cls(url, TokenAuth(issued.token), **options), issued

    async def request(self, method: str, path: str, *,
                      params: Mapping[str, QueryValue] | None = None, json: Any = None,
                      headers: Mapping[str, str] | None = None) -> Any:
        """Call a route the namespaces do not cover; see :meth:`Client.request`."""
        return await self._runner.run(_raw(method, path, params, json, headers))

    async def aclose(self) -> None:
        """Close the connections."""
        await self.http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.aclose()
