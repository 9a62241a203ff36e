"""Many simulated nodes in one process (``yun serve sim-nodes``), cheap enough for 10,000.

Each sim node stays a real node as the control plane sees it: its own component id and
key, its own join, heartbeats and reports, its own certificate and credential, and
requests to it verified by its own :class:`~yun.proto.auth.Verifier` and answered by its
own :class:`~yun.node.agent.NodeAgent` through the node API (:func:`create_node_app`).
What the nodes of one process share is the plumbing:

* One listening socket and one uvicorn server. A node advertises
  ``https://<host>:<port>/n/<name>``; :class:`NodeRouter` finds the node by that path
  prefix and answers 404 for a name it does not hold. The path is part of what a caller
  signs (the whole request target), so a request signed for one node is refused by any
  other even though they share ``host:port`` (the signature's audience).
* One node API app. A FastAPI app costs ~370 KiB (measured), more than everything else
  of a node; :class:`AgentOfRequest` stands in for the agent when the app is built and
  is the routed node's agent while a request runs (a context variable set by the
  router), so every route reaches that node's agent and verifier.
* The listener's TLS identity is the first node's certificate (issued by the domain CA
  for the host every node of the process advertises; renewed with that node's
  membership). Callers check the server certificate as they do for any node: signed by
  the domain CA and naming the host addressed (``check_hostname``); nothing checks which
  component's certificate it is, so real nodes are verified exactly as before. Client
  certificates are required and checked against the domain CA, as on any node.
* Keep-alive connection pools to the peers (domain, control and storage servers), one
  per peer and 50 nodes,
  presenting the first node's client certificate (its TLS contexts are every node's:
  image downloads too present it); each request is still signed by its
  own node's key and credential, which is what peers authenticate a caller by.
* The simulated hosts' state files are written in batches (at most every
  ``flush_delay`` seconds per node, and at stop; see
  :mod:`yun.node.hypervisor.sim.hostfile`): a kill -9 of the process may lose the last
  ``flush_delay`` seconds of changes. A real (libvirt) node keeps no such state.
* The start is spread: at most ``join_concurrency`` nodes join at a time, so 10,000
  joins do not stampede the domain server.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from typing import Any, cast

import httpx
from starlette.types import Receive, Scope, Send

from yun.config import NodeSettings
from yun.node.agent import NodeAgent
from yun.node.api import create_node_app
from yun.node.hypervisor.sim.hostfile import SimHostFile
from yun.node.service import build_agent, sim_state_file
from yun.proto.errors import NotFound
from yun.proto.http11 import PoolGroup
from yun.proto.server import problem_response
from yun.util.serve import AppServer, service_url

log = logging.getLogger("yun.node.sim")

PREFIX = "/n/"
NODES_PER_POOL = 50  # nodes sharing keep-alive pools (``pool_size`` connections per peer)

_CURRENT: ContextVar[NodeAgent | None] = ContextVar("yun_sim_node_agent", default=None)


class AgentOfRequest:
    """The agent of the node the running request was routed to.

    Outside a request (while the app is built) an attribute is a deferred path
    (``agent.membership.verifier`` gives a stand-in whose ``verify`` is looked up on
    the routed node's verifier at call time); inside one, it is the real attribute.
    """

    def __init__(self, path: tuple[str, ...] = ()) -> None:
        self._path = path

    def __getattr__(self, name: str) -> Any:
        path = (*self._path, name)
        agent = _CURRENT.get()
        if agent is None:
            return AgentOfRequest(path)
        value: Any = agent
        for part in path:
            value = getattr(value, part)
        return value


class NodeRouter:
    """ASGI app routing ``/n/<name>/...`` to the node API of sim node ``name``."""

    def __init__(self) -> None:
        self.agents: dict[str, NodeAgent] = {}
        # Built once for every node of the process (see the module docstring).
        self.app = create_node_app(cast(NodeAgent, AgentOfRequest()))

    def add(self, name: str, agent: NodeAgent) -> None:
        self.agents[name] = agent

    def remove(self, name: str) -> None:
        self.agents.pop(name, None)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)  # lifespan
            return
        path: str = scope["path"]
        name = path[len(PREFIX):].split("/", 1)[0] if path.startswith(PREFIX) else ""
        agent = self.agents.get(name) if name else None
        if agent is None:
            what = f"no sim node {name!r} in this process" if name else (
                f"no sim node named in {path!r}: node URLs are {PREFIX}<name>/...")
            if scope["type"] == "websocket":
                await send({"type": "websocket.close", "code": 4404, "reason": what[:120]})
                return
            await problem_response(NotFound(what).problem(path))(scope, receive, send)
            return
        # ASGI's root_path: the routes see the path after the prefix; raw_path stays what
        # the caller sent and signed.
        child = {**scope, "root_path": scope.get("root_path", "") + PREFIX + name}
        token = _CURRENT.set(agent)
        try:
            await self.app(child, receive, send)
        finally:
            _CURRENT.reset(token)


class SharedTransport(httpx.AsyncBaseTransport):
    """The keep-alive pools of a group of nodes, one per peer (``host:port``), so a slow
    peer (a busy control server answering reports) cannot starve the requests to
    another (heartbeats to the domain server: with one pool for both they timed out
    waiting for a connection, and 10,000 nodes were declared gone). Whole-body calls
    (reports, heartbeats, answers) go through :attr:`whole`, streamed ones through the
    httpx pools. Closing a node's client leaves the pools to the others;
    :meth:`close_pools` closes them."""

    def __init__(self, tls: ssl.SSLContext | None, pool_size: int) -> None:
        self.tls = tls
        self.limits = httpx.Limits(max_connections=pool_size,
                                   max_keepalive_connections=pool_size)
        self.pools: dict[bytes, httpx.AsyncHTTPTransport] = {}
        self.whole = PoolGroup(tls, pool_size)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        pool = self.pools.get(request.url.netloc)
        if pool is None:
            pool = self.pools[request.url.netloc] = httpx.AsyncHTTPTransport(
                verify=self.tls or True, limits=self.limits)
        return await pool.handle_async_request(request)

    async def aclose(self) -> None:
        pass  # shared: closed by close_pools when the process stops

    async def close_pools(self) -> None:
        for pool in self.pools.values():
            await pool.aclose()
        self.pools.clear()
        await self.whole.aclose()


class SimNode:
    """One simulated node of the process: its agent and its batched host state file."""

    def __init__(self, settings: NodeSettings, name: str, url: str, flush_delay: float) -> None:
        self.name = name
        self.file = SimHostFile(sim_state_file(settings, name), flush_delay=flush_delay)
        self.agent = build_agent(settings, name, sim_file=self.file)
        self.agent.membership.url = url
        self.started = False

    async def start(self) -> None:
        await self.agent.membership.start()
        await self.agent.start()
        self.started = True

    async def stop_agent(self) -> None:
        """Stop reporting and write the host's state (local work only)."""
        try:
            if self.started:
                await self.agent.stop()
        finally:
            self.file.flush()

    async def leave(self) -> None:
        """Leave the domain (one request) and close the node's clients."""
        await self.agent.membership.stop()


class SimNodesService:
    """``count`` sim nodes named ``<prefix>-<nnnnn>`` behind one listener."""

    def __init__(self, settings: NodeSettings, count: int, *, prefix: str = "sim",
                 flush_delay: float = 0.5, join_concurrency: int = 32,
                 pool_size: int = 16) -> None:
        if count < 1:
            raise ValueError(f"sim-nodes count must be at least 1, not {count}")
        if join_concurrency < 1:
            raise ValueError(f"join concurrency must be at least 1, not {join_concurrency}")
        self.settings = settings
        self.router = NodeRouter()
        self.server = AppServer(self.router, settings.listen_host, settings.listen_port)
        self.url = service_url(settings, self.server.port)
        self.join_concurrency = join_concurrency
        self.transports: list[SharedTransport] = []
        self.pool_size = pool_size
        self.nodes = [SimNode(settings, f"{prefix}-{i:05d}", f"{self.url}{PREFIX}{prefix}-{i:05d}",
                              flush_delay) for i in range(count)]

    async def _bounded(self, work: Callable[[SimNode], Awaitable[None]],
                       nodes: list[SimNode]) -> list[BaseException | None]:
        gate = asyncio.Semaphore(self.join_concurrency)

        async def one(node: SimNode) -> None:
            async with gate:
                await work(node)

        return await asyncio.gather(*(one(n) for n in nodes), return_exceptions=True)

    async def _start_node(self, node: SimNode) -> None:
        self.router.add(node.name, node.agent)
        await node.start()

    async def start(self) -> None:
        """Join the first node (its certificate is the listener's), serve, then join
        the others ``join_concurrency`` at a time."""
        first = self.nodes[0]
        await self._start_node(first)
        await self.server.start(first.agent.membership.serving_tls())
        # The first node's client context: the domain CA, its certificate (renewed in
        # place by its membership), hostname checks on. One group of pools per NODES_PER_POOL
        # nodes: httpcore scans every queued request and every connection of a pool at
        # each assignment, so one pool for 5,000 nodes spent 70% of the process's CPU
        # in that scan (py-spy) once requests queued.
        tls = (first.agent.membership.serving_tls(), first.agent.membership.client_tls)
        for i, node in enumerate(self.nodes):
            if i % NODES_PER_POOL == 0:
                shared = SharedTransport(tls[1], self.pool_size)
                self.transports.append(shared)
            if i == 0:
                continue  # joined already, with connections of its own
            node.agent.membership.transport = shared
            node.agent.membership.pools = shared.whole
            if tls[1] is not None:
                node.agent.membership.shared_tls = (tls[0], tls[1])
        failed = [(n, e) for n, e in zip(self.nodes[1:],
                                         await self._bounded(self._start_node, self.nodes[1:]),
                                         strict=True) if e is not None]
        for node, exc in failed:
            log.error("sim node did not start: %s", exc, extra={"node_name": node.name})
        if failed and isinstance(failed[0][1], Exception):
            raise failed[0][1]
        log.info("sim nodes ready", extra={"url": self.url, "nodes": len(self.nodes),
                                           "join_concurrency": self.join_concurrency})

    async def stop(self) -> None:
        """Stop serving, stop every node's agent and write its state (local, all at
        once: a stop cut short by SIGKILL has written the state already), then leave the
        domain ``join_concurrency`` nodes at a time."""
        with contextlib.suppress(Exception):
            await self.server.stop()
        stopped = await asyncio.gather(*(n.stop_agent() for n in self.nodes),
                                       return_exceptions=True)
        left = await self._bounded(lambda n: n.leave(), self.nodes)
        for node, *errors in zip(self.nodes, stopped, left, strict=True):
            self.router.remove(node.name)
            for exc in errors:
                if exc is not None:
                    log.warning("sim node stop failed: %s", exc,
                                extra={"node_name": node.name})
        for transport in self.transports:
            await transport.close_pools()
