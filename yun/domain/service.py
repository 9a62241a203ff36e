"""The domain server process: CA, registry, HTTPS API, presence expiry and mDNS announcement."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from yun.config import DomainSettings
from yun.domain.api import create_domain_app
from yun.domain.registry import Registry
from yun.proto.auth import Verifier
from yun.proto.components import ComponentType
from yun.proto.discovery import DomainAnnouncer
from yun.proto.pki import (
    DomainCA,
    load_or_create_key,
    server_context,
    url_authority,
    url_host,
    write_private,
)
from yun.util.serve import AppServer, service_url

log = logging.getLogger("yun.domain")

# A presence sweep this late (seconds) means the server was not serving meanwhile.
STALL = 0.05


class DomainService:
    """One domain server."""

    def __init__(self, settings: DomainSettings) -> None:
        self.settings = settings
        self.state = settings.state_dir / "domain"
        # Kept across restarts: certificates and credentials already issued stay valid.
        self.ca = DomainCA.load_or_create(self.state, settings.domain_name)
        self.verifier = Verifier(lambda: [url_authority(self.url)], self.ca.public_key)
        self.registry = Registry(
            settings.domain_name, settings.domain_secret,
            ttl=settings.ttl, heartbeat_interval=settings.heartbeat_interval,
            ca=self.ca, credential_lifetime=settings.credential_lifetime,
            state_dir=self.state, verifier=self.verifier,
        )
        self.server = AppServer(create_domain_app(self.registry, self.verifier),
                                settings.listen_host, settings.listen_port)
        self.url = service_url(settings, self.server.port)
        self._key_file = self.state / "server.key"
        self._cert_file = self.state / "server.crt"
        self._key = load_or_create_key(self._key_file)
        self._cert_issued = 0.0
        self._issue_own_cert()
        # Client certificates are optional here only: a component that has not joined has
        # none yet. Every route but the join is still refused without a signed credential.
        self.tls = server_context(self._cert_file, self._key_file, self.ca.cert_pem,
                                  require_client_cert=False)
        self._announcer: DomainAnnouncer | None = None
        self._expiry: asyncio.Task[None] | None = None

    def _issue_own_cert(self) -> None:
        cert = self.ca.issue(f"domain-{self.settings.domain_name}", ComponentType.DOMAIN.value,
                             self._key.public_key(), url_host(self.url),
                             self.settings.credential_lifetime)
        write_private(self._cert_file, cert)
        self._cert_issued = time.time()

    async def start(self) -> None:
        await self.server.start(self.tls)
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
                                               "url": self.url,
                                               "ca_sha256": self.ca.fingerprint.hex()[:16]})

    async def stop(self) -> None:
        if self._expiry is not None:
            self._expiry.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._expiry
        if self._announcer is not None:
            await self._announcer.stop()
        await self.server.stop()

    async def _expire_loop(self) -> None:
        period = min(1.0, self.settings.ttl / 3)
        while True:
            due = time.monotonic() + period
            await asyncio.sleep(period)
            # Woken late, this server was stalled and heard nobody meanwhile: the members'
            # heartbeats of that time are still unread, and must not expire them first.
            late = time.monotonic() - due
            if late > STALL:
                now = time.time()
                self.registry.deaf(now - late, now)
                if late > self.settings.ttl / 2:
                    log.warning("domain server stalled; members' silence meanwhile not "
                                "counted", extra={"stalled_for": round(late, 2),
                                                  "ttl": self.settings.ttl})
            self.registry.expire()
            self.registry.purge_revoked()
            if time.time() - self._cert_issued > self.settings.credential_lifetime / 2:
                self._issue_own_cert()
                self.tls.load_cert_chain(self._cert_file, self._key_file)
                log.info("domain server certificate renewed", extra={"url": self.url})
