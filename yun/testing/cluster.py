"""A whole Yun cloud in one event loop, on loopback: for integration tests and benchmarks.

Every component is the real service with its real HTTP server and protocol (TLS on
internal ports, signed requests); only the hypervisor is the `sim` driver. Ports are
picked by the kernel.
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import secrets
import shutil
import ssl
import tempfile
import threading
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from yun.config import (
    ControlSettings,
    DomainSettings,
    GatewaySettings,
    NodeSettings,
    StorageSettings,
)
from yun.control.db.session import upgrade
from yun.control.service import ControlService
from yun.domain.service import DomainService
from yun.gateway.service import GatewayService
from yun.node.service import NodeService
from yun.proto.auth import Signer, issue_credential
from yun.proto.client import PeerClient
from yun.proto.components import ComponentType
from yun.proto.pki import client_context, load_or_create_key, url_host, write_private
from yun.storage.service import StorageService

log = logging.getLogger("yun.testing.cluster")


@dataclass
class SimCluster:
    root: Path
    nodes: int = 1
    heartbeat_interval: float = 0.5
    ttl: float = 2.0
    report_interval: float = 1.0
    database_url: str = ""
    secret: str = field(default_factory=lambda: secrets.token_urlsafe(16))
    admin_password: str = field(default_factory=lambda: secrets.token_urlsafe(16))
    token: str = ""
    gateway_options: dict[str, Any] = field(default_factory=dict)
    storage_options: dict[str, Any] = field(default_factory=dict)
    domain: DomainService | None = None
    control: ControlService | None = None
    storage: StorageService | None = None
    gateway: GatewayService | None = None
    node_services: list[NodeService] = field(default_factory=list)
    api: httpx.AsyncClient | None = None

    def common(self, name: str) -> dict[str, Any]:
        return dict(name=name, domain_name="it", domain_secret=self.secret,
                    domain_url=self.domain.url if self.domain else None,
                    listen_host="127.0.0.1", listen_port=0, state_dir=self.root / name,
                    heartbeat_interval=self.heartbeat_interval)

    async def start(self) -> SimCluster:
        self.domain = DomainService(DomainSettings(
            **self.common("domain"), ttl=self.ttl, mdns=False))
        await self.domain.start()
        password_file = self.root / "admin-password"
        password_file.parent.mkdir(parents=True, exist_ok=True)
        password_file.write_text(self.admin_password)
        password_file.chmod(0o600)
        if not self.database_url:
            await asyncio.to_thread(_copy_migrated_sqlite, self.root / "control" / "control.db")
        self.control = ControlService(ControlSettings(
            **self.common("control"), database_url=self.database_url,
            admin_password_file=password_file))
        await self.control.start()
        self.storage = StorageService(StorageSettings(**self.common("storage"),
                                                      **self.storage_options))
        await self.storage.start()
        await self.add_nodes(self.nodes)
        # Tests and benchmarks send far more than one user would: no rate limit here
        # unless a test asks for one.
        options = {"rate_limit": 0, **self.gateway_options}
        self.gateway = GatewayService(GatewaySettings(**self.common("gateway"), **options))
        await self.gateway.start()
        await self.wait_peers()
        self.token = await self.login("admin", self.admin_password)
        self.api = self.client(self.token)
        await self.wait_nodes_up(len(self.node_services))
        return self

    async def login(self, user: str, password: str, project: str | None = None) -> str:
        """A token for ``user`` (scoped to ``project``, or the user's first project)."""
        assert self.gateway is not None
        return await login(self.gateway.url, user, password, project)

    def client(self, token: str) -> httpx.AsyncClient:
        """An HTTP client of the public API authenticated with ``token``."""
        assert self.gateway is not None
        return httpx.AsyncClient(base_url=self.gateway.url, timeout=120,
                                 headers={"Authorization": f"Bearer {token}"})

    async def wait_peers(self, timeout: float = 30) -> None:
        """Until the control server sees the storage server and the gateway sees the control."""
        assert self.control and self.gateway
        deadline = asyncio.get_running_loop().time() + timeout
        while not (self.control.ctx.membership.peers_of(ComponentType.STORAGE)
                   and self.gateway.membership.peers_of(ComponentType.CONTROL)):
            if asyncio.get_running_loop().time() > deadline:
                raise TimeoutError("components did not learn their peers")
            await asyncio.sleep(0.05)

    async def wait_association(self, timeout: float = 30) -> None:
        """Until every component knows all the peers it is meant to: the control server
        the nodes, storage server and gateway; the gateway the control server; each node
        the control and storage servers. A component learns peers that joined after it at
        its next heartbeat, which a loaded host may delay by seconds."""
        assert self.control and self.gateway
        expected = [(self.control.ctx.membership, {ComponentType.STORAGE, ComponentType.GATEWAY}
                     | ({ComponentType.NODE} if self.node_services else set())),
                    (self.gateway.membership, {ComponentType.CONTROL})]
        expected += [(node.agent.membership, {ComponentType.CONTROL, ComponentType.STORAGE})
                     for node in self.node_services]
        deadline = asyncio.get_running_loop().time() + timeout
        while not all({p.type for p in membership.peers.values()} >= types
                      for membership, types in expected):
            if asyncio.get_running_loop().time() > deadline:
                raise TimeoutError("components did not learn all their peers in "
                                   f"{timeout:g} s")
            await asyncio.sleep(0.05)

    def node_settings(self, name: str) -> NodeSettings:
        return NodeSettings(**self.common(name), hypervisor="sim",
                            report_interval=self.report_interval, sim_vcpus=16,
                            sim_memory_mb=32768, sim_disk_gb=1000, pool="default",
                            memory_reserve_mb=0)

    async def add_nodes(self, count: int) -> list[NodeService]:
        start = len(self.node_services)
        new = [NodeService(self.node_settings(f"node-{i:04d}"))
               for i in range(start, start + count)]
        for chunk in range(0, len(new), 25):
            await asyncio.gather(*(n.start() for n in new[chunk:chunk + 25]))
        self.node_services.extend(new)
        return new

    async def crash_node(self, index: int) -> NodeService:
        """Stop node ``index`` the way kill -9 would: no leave, no goodbye; its sim host
        state stays in its state dir (``sim-host.json``)."""
        node = self.node_services[index]
        await node.server.stop()
        await node.agent.stop()
        await node.agent.membership.stop(leave=False)
        return node

    async def start_node(self, index: int) -> NodeService:
        """Start node ``index`` again from its settings and state dir (same id, same sim
        host state; guests that ran come back shut off, as after a host crash)."""
        old = self.node_services[index]
        again = NodeService(old.settings, name=old.name)
        await again.start()
        self.node_services[index] = again
        return again

    async def restart_node(self, index: int) -> NodeService:
        """Crash node ``index`` and start it again at once."""
        await self.crash_node(index)
        return await self.start_node(index)

    async def restart_domain(self) -> DomainService:
        """Stop the domain server and start a fresh one (no registry kept) on its port."""
        assert self.domain is not None
        old = self.domain
        settings = old.settings.model_copy(update={"listen_port": old.server.port})
        await old.stop()
        self.domain = DomainService(settings)
        await self.domain.start()
        return self.domain

    async def wait_nodes_up(self, count: int, timeout: float = 60) -> None:
        assert self.api is not None
        await wait_nodes_up(self.api, count, timeout)

    async def wait_task(self, task_uuid: str, timeout: float = 120) -> dict[str, Any]:
        assert self.api is not None
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            task: dict[str, Any] = (await self.api.get(
                f"/api/v1/tasks/{task_uuid}", params={"wait": 5})).json()
            if task["state"] in ("succeeded", "failed"):
                return task
            if asyncio.get_running_loop().time() > deadline:
                raise TimeoutError(f"task {task_uuid} still {task['state']}")

    async def wait_tasks(self, task_uuids: list[str], timeout: float = 600
                         ) -> list[dict[str, Any]]:
        """Wait for many tasks the way a bulk client does: poll the count of unfinished
        tasks, then read them all once (one request per poll, not one per task)."""
        assert self.api is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            page = (await self.api.get("/api/v1/tasks", params={
                "q": "state in (pending,running,rolling_back)", "limit": 1,
                "count": "true"})).json()
            unfinished = page["total"]
            if unfinished == 0:
                break
            if loop.time() > deadline:
                raise TimeoutError(f"{unfinished} tasks unfinished after {timeout} s")
            await asyncio.sleep(0.5)
        wanted = set(task_uuids)
        found: dict[str, dict[str, Any]] = {}
        cursor: str | None = None
        while len(found) < len(wanted):
            params: dict[str, Any] = {"limit": 1000}
            if cursor:
                params["cursor"] = cursor
            page = (await self.api.get("/api/v1/tasks", params=params)).json()
            found.update((t["uuid"], t) for t in page["items"] if t["uuid"] in wanted)
            cursor = page.get("next_cursor")
            if not cursor:
                break
        return [found[u] for u in task_uuids]

    def member(self, component_type: ComponentType, component_id: str, url: str = ""
               ) -> tuple[Signer, ssl.SSLContext]:
        """A signer and a TLS client context of a made-up member of this domain, issued by
        the domain's own CA: what a (possibly compromised) component of that type holds.
        For tests of the internal protocol's checks."""
        assert self.domain is not None
        ca = self.domain.ca
        folder = self.root / "members" / component_id
        key = load_or_create_key(folder / "key.pem")
        cert = ca.issue(component_id, component_type.value, key.public_key(),
                        url_host(url or self.domain.url), 3600)
        write_private(folder / "cert.pem", cert)
        credential = issue_credential(ca.key, component_id, component_type.value,
                                      key.public_key(), 3600)
        return (Signer(key, credential),
                client_context(ca.cert_pem, folder / "cert.pem", folder / "key.pem"))

    def member_client(self, url: str, component_type: ComponentType,
                      component_id: str) -> PeerClient:
        """A :class:`PeerClient` to ``url`` signing as a made-up member (see :meth:`member`)."""
        signer, tls = self.member(component_type, component_id)
        return PeerClient(url, signer, tls)

    async def stop(self) -> None:
        if self.api is not None:
            await self.api.aclose()
        # The control server before the nodes: its pooled clients then close their idle
        # TLS connections to the nodes, whose servers otherwise wait out the graceful
        # shutdown timeout (5 s each) for a close_notify that never comes.
        # Each server's stop takes ~0.2 s of uvicorn's own ticks and pauses, so the
        # storage server and the nodes, which call nothing but the domain server on their
        # way out, stop together (7 sequential stops were ~1.2 s of every test's teardown).
        await _stop_all([self.gateway, self.control])
        await _stop_all([self.storage, *self.node_services])
        await _stop_all([self.domain])


#: A service's stop is seconds at most; one that takes longer is logged and left, so that
#: a test's teardown never hangs the run (seen once: a stop that never returned).
STOP_TIMEOUT = 30.0


def _awaiting(coro: Any) -> str:
    """Where a suspended coroutine waits: each frame of its chain of awaits, outermost
    first (a task's own stack shows only the outermost)."""
    lines = []
    while coro is not None:
        frame = getattr(coro, "cr_frame", None) or getattr(coro, "gi_frame", None)
        if frame is not None:
            lines.append(f"  {frame.f_code.co_filename}:{frame.f_lineno} "
                         f"in {frame.f_code.co_name}")
        coro = getattr(coro, "cr_await", None) or getattr(coro, "gi_yieldfrom", None)
    return "\n".join(lines) or "  (no frame)"


async def _stop_all(services: list[Any]) -> None:
    """Stop ``services`` (None: not started) at once; one failing stops none of the others.

    A stop that outlasts ``STOP_TIMEOUT`` is cancelled and reported as a warning naming
    the service and where its stop was waiting: pytest lists warnings at the end of a
    run, passing tests' included, where a log record of a passing test is never shown."""
    async def stop(service: Any) -> None:
        task = asyncio.ensure_future(service.stop())
        done, _ = await asyncio.wait({task}, timeout=STOP_TIMEOUT)
        if done:
            task.result()
            return
        waiting = _awaiting(task.get_coro())
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        settings = getattr(service, "settings", None)
        what = f"{type(service).__name__} {getattr(settings, 'name', '') or ''}".strip()
        log.warning("service did not stop in time; left running",
                    extra={"service": what, "timeout_s": STOP_TIMEOUT, "waiting": waiting})
        warnings.warn(f"{what} did not stop within {STOP_TIMEOUT:g} s; its stop was "
                      f"waiting in:\n{waiting}", RuntimeWarning, stacklevel=1)

    await asyncio.gather(*(stop(s) for s in services if s is not None),
                         return_exceptions=True)


async def login(base_url: str, user: str, password: str, project: str | None = None) -> str:
    """A token for ``user`` from the gateway at ``base_url`` (scoped to ``project``, or the
    user's first project)."""
    body: dict[str, Any] = {"username": user, "password": password}
    if project is not None:
        body["project"] = project
    async with httpx.AsyncClient(base_url=base_url, timeout=60) as http:
        resp = await http.post("/api/v1/auth/tokens", json=body)
    if resp.status_code != 201:
        raise RuntimeError(f"login of {user} failed: {resp.status_code} {resp.text}")
    return str(resp.json()["token"])


async def wait_nodes_up(api: httpx.AsyncClient, count: int, timeout: float = 60) -> None:
    """Until the public API (``api``, authenticated) lists at least ``count`` nodes up."""
    deadline = asyncio.get_running_loop().time() + timeout
    page: dict[str, Any] = {}
    while True:
        try:
            page = (await api.get("/api/v1/nodes", params={"q": "status=up", "limit": 1,
                                                           "count": "true"})).json()
        except (httpx.HTTPError, ValueError):
            page = {}  # the gateway or control server is (re)starting
        if page.get("total", 0) >= count:
            return
        if asyncio.get_running_loop().time() > deadline:
            raise TimeoutError(f"only {page.get('total')} of {count} nodes up: {page}")
        await asyncio.sleep(0.1)


_template_lock = threading.Lock()
_template: Path | None = None


def _copy_migrated_sqlite(target: Path) -> None:
    """Put a copy of an SQLite database already migrated to the head revision at
    ``target`` (when nothing is there yet). The template is migrated once per process
    by the real migrations; the control server's own migrate step then finds the
    schema at head. Running every migration for each test's cloud cost ~0.25 s of each
    of the hundreds of clouds the tests build."""
    global _template
    if target.exists():
        return  # a cloud started again on its state directory keeps its database
    with _template_lock:
        if _template is None:
            directory = Path(tempfile.mkdtemp(prefix="yun-sim-schema-"))
            atexit.register(shutil.rmtree, directory, True)
            path = directory / "control.db"
            upgrade(f"sqlite+aiosqlite:///{path}")
            # The migrations' connections are closed, so SQLite folded its write-ahead
            # log into the file: the one file is the whole database.
            if any(path.with_name(path.name + s).exists() for s in ("-wal", "-journal")):
                raise RuntimeError(f"migrated template {path} still has a journal")
            _template = path
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(_template, target)
    target.chmod(0o600)
