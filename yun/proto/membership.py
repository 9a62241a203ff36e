"""A component's life in the work domain: discover, join, heartbeat, follow its peers.

Every service except the domain server runs one :class:`Membership`. It keeps the
credential issued at join, the list of associated peers (F-ASSOC) and one
:class:`PeerClient` per peer, and calls back when peers appear or vanish (F-LEAVE).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import random
from collections.abc import Awaitable, Callable
from pathlib import Path

from yun.config import ComponentSettings
from yun.proto.client import PeerClient
from yun.proto.components import ComponentType
from yun.proto.discovery import discover_domain
from yun.proto.errors import Forbidden, NotFound, PeerError, Unauthorized, YunError
from yun.proto.messages import (
    HeartbeatRequest,
    HeartbeatResponse,
    JoinRequest,
    JoinResponse,
    Peer,
)

log = logging.getLogger("yun.membership")

PeersChanged = Callable[[list[Peer], list[Peer]], Awaitable[None] | None]


class JoinRefused(RuntimeError):
    """The domain refused this component (wrong secret); retrying will not help."""


class Membership:
    """Membership of one component in its work domain."""

    def __init__(
        self, settings: ComponentSettings, component_type: ComponentType, url: str,
        *, name: str | None = None,
    ) -> None:
        self.settings = settings
        self.type = component_type
        self.url = url
        self.name = name or settings.name
        self.component_id: str | None = self._load_id()
        self.credential: str | None = None
        self.domain_url: str | None = None
        self.peers: dict[str, Peer] = {}
        self.joined = asyncio.Event()
        self.generation = -1
        self._callbacks: list[PeersChanged] = []
        self._clients: dict[str, PeerClient] = {}
        self._domain: PeerClient | None = None
        self._task: asyncio.Task[None] | None = None
        self._interval = settings.heartbeat_interval

    # -- identity kept across restarts ------------------------------------------------

    @property
    def _id_file(self) -> Path:
        return self.settings.state_dir / "ids" / f"{self.type}-{self.name}.id"

    def _load_id(self) -> str | None:
        try:
            return self._id_file.read_text().strip() or None
        except OSError:
            return None

    def _save_id(self) -> None:
        try:
            self._id_file.parent.mkdir(parents=True, exist_ok=True)
            self._id_file.write_text(self.component_id or "")
        except OSError as exc:
            log.warning("cannot keep component id: %s", exc, extra={"file": str(self._id_file)})

    # -- public API ---------------------------------------------------------------------

    @property
    def domain_secret(self) -> str:
        return self.settings.domain_secret

    def on_peers_changed(self, callback: PeersChanged) -> None:
        """Call ``callback(added, removed)`` whenever the associated peers change."""
        self._callbacks.append(callback)

    def peers_of(self, component_type: ComponentType) -> list[Peer]:
        return sorted(
            (p for p in self.peers.values() if p.type == component_type),
            key=lambda p: p.component_id,
        )

    def client(self, peer: Peer) -> PeerClient:
        """The client speaking to ``peer`` with this component's credential."""
        client = self._clients.get(peer.component_id)
        if client is None or client.base_url != peer.url.rstrip("/"):
            client = PeerClient(peer.url, self.credential)
            self._clients[peer.component_id] = client
        client.credential = self.credential
        return client

    def client_for_url(self, url: str) -> PeerClient:
        """A client for a peer known only by its URL (e.g. taken from the database)."""
        for peer in self.peers.values():
            if peer.url.rstrip("/") == url.rstrip("/"):
                return self.client(peer)
        key = f"url:{url}"
        client = self._clients.get(key)
        if client is None:
            client = PeerClient(url, self.credential)
            self._clients[key] = client
        client.credential = self.credential
        return client

    async def start(self, wait: bool = True) -> None:
        """Join the domain (retrying until it answers) and keep heartbeating in the background.

        Raises :class:`JoinRefused` at once if the domain refuses the secret.
        """
        await self._join_once_or_refused(first=True)
        self._task = asyncio.create_task(self._run(), name=f"membership-{self.name}")
        if wait:
            await self.joined.wait()

    async def stop(self, leave: bool = True) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        if leave and self._domain is not None and self.component_id and self.credential:
            try:
                await self._domain.request(
                    "POST", f"/v1/components/{self.component_id}/leave", timeout=2
                )
            except YunError:
                pass
        for client in [*self._clients.values(), *([self._domain] if self._domain else [])]:
            await client.aclose()
        self._clients.clear()

    # -- internals ----------------------------------------------------------------------

    async def _locate_domain(self) -> str | None:
        if self.settings.domain_url:
            return self.settings.domain_url.rstrip("/")
        url = await discover_domain(self.settings.domain_name)
        if url:
            log.info("found domain server by mDNS", extra={"domain": self.settings.domain_name,
                                                             "url": url})
        return url

    async def _join_once_or_refused(self, first: bool = False) -> bool:
        """Try to join once; False when the domain could not be reached."""
        url = await self._locate_domain()
        if url is None:
            if first:
                log.warning("domain server not found yet",
                            extra={"domain": self.settings.domain_name})
            return False
        if self._domain is None or self._domain.base_url != url:
            if self._domain is not None:
                await self._domain.aclose()
            self._domain = PeerClient(url, timeout=10)
            self.domain_url = url
        req = JoinRequest(
            type=self.type, name=self.name, url=self.url,
            secret=self.settings.domain_secret or "-", component_id=self.component_id,
        )
        try:
            resp = await self._domain.call("POST", "/v1/join", JoinResponse, body=req)
        except (Forbidden, Unauthorized) as exc:
            raise JoinRefused(f"domain at {url} refused {self.type} '{self.name}': {exc}") from exc
        except PeerError as exc:
            if first:
                log.warning("domain server unreachable: %s", exc, extra={"url": url})
            return False
        self.component_id = resp.component_id
        self.credential = resp.credential
        self._domain.credential = resp.credential
        self._interval = resp.heartbeat_interval
        self._save_id()
        self.generation = -1  # the next heartbeat's peers are applied whatever they are
        log.info("joined domain", extra={"domain": resp.domain, "component": self.component_id,
                                         "type": str(self.type), "peers": len(resp.peers)})
        await self._apply_peers(resp.peers)
        self.joined.set()
        return True

    async def _run(self) -> None:
        while True:
            # Jitter keeps many components from heartbeating in lock step.
            await asyncio.sleep(self._interval * random.uniform(0.8, 1.0))
            try:
                if not self.joined.is_set():
                    await self._join_once_or_refused()
                    continue
                await self._heartbeat()
            except JoinRefused:
                log.error("domain refuses this component now; retrying",
                          extra={"component": self.component_id})
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("membership loop error", extra={"component": self.component_id})

    async def _heartbeat(self) -> None:
        assert self._domain is not None
        try:
            resp = await self._domain.call(
                "POST", f"/v1/components/{self.component_id}/heartbeat", HeartbeatResponse,
                body=HeartbeatRequest(url=self.url), timeout=max(self._interval, 2.0),
            )
        except (NotFound, Unauthorized):
            # The domain server restarted (or expired us): join again as ourselves.
            log.info("domain forgot this component; rejoining",
                     extra={"component": self.component_id})
            self.joined.clear()
            await self._join_once_or_refused()
            return
        except PeerError as exc:
            log.warning("heartbeat failed: %s", exc, extra={"component": self.component_id})
            if not self.settings.domain_url:
                # Rediscover: the domain server may have moved (F-MOVE).
                self.joined.clear()
            return
        if resp.generation != self.generation:
            self.generation = resp.generation
            await self._apply_peers(resp.peers)

    async def _apply_peers(self, peers: list[Peer]) -> None:
        new = {p.component_id: p for p in peers}
        added = [p for cid, p in new.items() if self.peers.get(cid) != p]
        removed = [p for cid, p in self.peers.items() if cid not in new]
        self.peers = new
        for peer in removed:
            # Its client stays open: requests under way to it must not be cut because the
            # peer list changed (after a domain-server restart, peers not yet rejoined
            # look removed for a moment). Clients are closed when this component stops.
            log.info("peer gone", extra={"component": self.component_id,
                                         "peer": peer.component_id, "peer_type": str(peer.type)})
        for peer in added:
            log.info("peer available", extra={"component": self.component_id,
                                              "peer": peer.component_id,
                                              "peer_type": str(peer.type), "url": peer.url})
        if added or removed:
            for callback in self._callbacks:
                result = callback(added, removed)
                if inspect.isawaitable(result):
                    await result
