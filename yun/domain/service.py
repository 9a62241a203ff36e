"""The domain server process: registry, HTTP API, presence expiry and mDNS announcement."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from yun.config import DomainSettings
from yun.domain.api import create_domain_app
from yun.domain.registry import Registry
from yun.proto.discovery import DomainAnnouncer
from yun.util.serve import AppServer, service_url

log = logging.getLogger("yun.domain")


class DomainService:
    """One domain server."""

    def __init__(self, settings: DomainSettings) -> None:
        self.settings = settings
        self.registry = Registry(
            settings.domain_name, settings.domain_secret,
            ttl=settings.ttl, heartbeat_interval=settings.heartbeat_interval,
        )
        self.server = AppServer(create_domain_app(self.registry), settings.listen_host,
                                settings.listen_port)
        self.url = service_url(settings, self.server.port)
        self._announcer: DomainAnnouncer | None = None
        self._expiry: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self.server.start()
        self._expiry = asyncio.create_task(self._expire_loop())
        if self.settings.mdns:
            host = self.url.split("//", 1)[-1].rsplit(":", 1)[0]
            try:
                self._announcer = DomainAnnouncer(self.settings.domain_name, self.url, [host],
                                                  self.server.port)
                await self._announcer.start()
            except Exception as exc:  # mDNS is a convenience; the configured address still works
                log.warning("mDNS announcement failed: %s", exc)
                self._announcer = None
        log.info("domain server ready", extra={"domain": self.settings.domain_name,
                                               "url": self.url})

    async def stop(self) -> None:
        if self._expiry is not None:
            self._expiry.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._expiry
        if self._announcer is not None:
            await self._announcer.stop()
        await self.server.stop()

    async def _expire_loop(self) -> None:
        while True:
            await asyncio.sleep(min(1.0, self.settings.ttl / 3))
            self.registry.expire()
