"""The intelligent router process (C-RT): ``yun serve router``.

On start it joins the domain, turns forwarding off, pulls the whole rule set from a
control server, applies it (table and routes) and only then turns forwarding on: before
its first successful sync it forwards nothing. It then follows changes: a
:class:`~yun.proto.network.RouterNotice` makes it pull again (the difference is applied
as element additions and deletions), and every ``sync_interval`` seconds it pulls in
full and compares the live nftables table with what it applied, replacing the table
when they differ (a table deleted or edited by hand comes back).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

from yun.config import RouterSettings
from yun.proto.components import ComponentType
from yun.proto.errors import Unavailable, YunError
from yun.proto.membership import Membership
from yun.proto.network import RouterHello, RouterNotice, RouterRuleSet
from yun.router.api import create_router_app
from yun.router.decode import RuleSetDecoder
from yun.router.nft import NftError, NftTable, desired_state
from yun.router.routes import apply_routes, set_forwarding
from yun.util.lifecycle import wait_set
from yun.util.serve import AppServer, service_url

log = logging.getLogger("yun.router")

RETRY_FIRST = 0.5  # seconds before retrying a failed sync, doubled up to sync_interval


class RouterService:
    """One intelligent router: membership, notice API, sync loop."""

    def __init__(self, settings: RouterSettings) -> None:
        self.settings = settings
        self.membership = Membership(settings, ComponentType.ROUTER, url="")
        self.nft = NftTable(nft=settings.nft_command, wan=tuple(settings.wan_interfaces))
        self.applied: RouterRuleSet | None = None
        self.decoder = RuleSetDecoder()  # validates only the mappings new since last pull
        self.forwarding = False
        self.last_sync: dict[str, Any] = {}
        self._wake = asyncio.Event()
        self._lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        app = create_router_app(self.membership.verifier, self._on_notice, self.status)
        self.server = AppServer(app, settings.listen_host, settings.listen_port)
        self.url = self.membership.url = service_url(settings, self.server.port)

    # -- API callbacks

    async def _on_notice(self, notice: RouterNotice) -> None:
        if self.applied is None or notice.generation > self.applied.generation:
            self._wake.set()

    def status(self) -> dict[str, Any]:
        """What this router applied and whether it forwards."""
        rules = self.applied
        return {"applied_generation": rules.generation if rules else None,
                "mono": len(rules.mono) if rules else 0,
                "ports": len(rules.ports) if rules else 0,
                "routes": len(rules.routes) if rules else 0,
                "forwarding": self.forwarding, "last_sync": self.last_sync}

    # -- sync

    async def pull(self) -> RouterRuleSet:
        """The whole rule set from the first control server that answers."""
        hello = RouterHello(lan_address=self.settings.lan_address or "0.0.0.0",
                            applied_generation=self.applied.generation if self.applied else 0,
                            name=self.membership.name, url=self.membership.url)
        controls = self.membership.peers_of(ComponentType.CONTROL)
        if not controls:
            raise Unavailable("no control server is known yet")
        errors = []
        for peer in controls:
            try:
                data = await self.membership.client(peer).request(
                    "POST", "/internal/v1/router/rules", body=hello, timeout=30)
                return self.decoder.decode(data)
            except YunError as exc:
                errors.append(f"{peer.name}: {exc}")
        raise Unavailable("no control server gave the rule set: " + "; ".join(errors))

    async def sync(self, full: bool) -> RouterRuleSet:
        """Pull the rule set and make the table and routes hold it.

        ``full``: compare the live table with what was applied and replace it when they
        differ; otherwise apply only the difference. The first sync always replaces the
        whole table (what a previous life left there is not trusted)."""
        async with self._lock:
            started = time.perf_counter()
            rules = await self.pull()
            pulled = time.perf_counter()
            how = "incremental"
            if self.applied is None:
                await self.nft.replace(rules)
                how = "full"
            else:
                drift = False
                if full:
                    live = await self.nft.state()
                    drift = live != desired_state(self.applied, self.nft.wan)
                    if drift:
                        log.warning("router table drifted from the applied rules: replaced",
                                    extra={"generation": self.applied.generation,
                                           "table_missing": live is None})
                if drift:
                    await self.nft.replace(rules)
                    how = "repair"
                else:
                    try:
                        await self.nft.update(self.applied, rules)
                    except NftError as exc:
                        # An element a hand edit removed makes the delete fail: start over.
                        log.warning("incremental update refused, replacing the table: %s",
                                    exc, extra={"generation": rules.generation})
                        await self.nft.replace(rules)
                        how = "repair"
            if full or how != "incremental" or self.applied is None \
                    or rules.routes != self.applied.routes:
                # (a notice's pull with the same routes leaves them: a thread hop and a
                # netlink dump saved; the periodic full sync still repairs them)
                await apply_routes(rules.routes)
            previous = self.applied.generation if self.applied else None
            self.applied = rules
            if not self.forwarding:
                if self.settings.manage_forwarding:
                    set_forwarding(True)
                self.forwarding = True
                log.info("first sync done: forwarding on",
                         extra={"generation": rules.generation, "mono": len(rules.mono),
                                "ports": len(rules.ports), "routes": len(rules.routes)})
            elapsed = time.perf_counter() - started
            self.last_sync = {"how": how, "seconds": round(elapsed, 4),
                              "pull_seconds": round(pulled - started, 4),
                              "backend": self.nft.backend,
                              "generation": rules.generation, "at": time.time()}
            if previous != rules.generation or how != "incremental":
                log.info("rule set applied", extra={"how": how, "generation": rules.generation,
                                                    "previous": previous,
                                                    "seconds": round(elapsed, 4),
                                                    "backend": self.nft.backend})
            return rules

    async def _loop(self) -> None:
        delay = RETRY_FIRST
        full = True
        while True:  # runs until the service stops (cancelled)
            try:
                await self.sync(full=full)
                delay = RETRY_FIRST
                wait = self.settings.sync_interval
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # keep following: the next round retries
                log.warning("rule sync failed, retrying: %s", exc,
                            extra={"retry_in": delay, "synced": self.applied is not None})
                wait, delay = delay, min(delay * 2, self.settings.sync_interval)
            # Woken by a notice: pull and apply the difference; at the periodic check:
            # compare with the live table.
            full = not await wait_set(self._wake, wait)
            self._wake.clear()

    # -- lifecycle

    async def start(self) -> None:
        """Turn forwarding off, join, serve notices, and start syncing (the first sync
        turns forwarding on)."""
        if self.settings.manage_forwarding:
            set_forwarding(False)
        await self.membership.start()
        await self.server.start(self.membership.serving_tls())
        self._task = asyncio.create_task(self._loop(), name="router-sync")
        log.info("router started", extra={"url": self.url,
                                          "component": self.membership.component_id,
                                          "lan_address": self.settings.lan_address})

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.server.stop()
        await self.membership.stop()
        self.nft.close()
