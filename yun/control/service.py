"""The control server process: database, flow engine, node registry, internal API."""

from __future__ import annotations

import asyncio
import logging

from yun.config import ControlSettings
from yun.control.access.identity import bootstrap_admin
from yun.control.api import create_control_app
from yun.control.context import ControlContext
from yun.control.db.idempotency import purge_expired
from yun.control.db.session import Database
from yun.control.flows.cascade import cascade_flows
from yun.control.flows.engine import FlowEngine
from yun.control.flows.image_capture import image_capture_flows
from yun.control.flows.vm import vm_flows
from yun.control.services.images import expire_uploads_loop
from yun.control.services.nodes import NodeRegistry
from yun.proto.components import ComponentType
from yun.proto.membership import Membership
from yun.proto.messages import Peer
from yun.util.serve import AppServer, service_url

log = logging.getLogger("yun.control")


class ControlService:
    """One control server (C-CTL)."""

    def __init__(self, settings: ControlSettings) -> None:
        self.settings = settings
        self.db = Database(settings.db_url())
        membership = Membership(settings, ComponentType.CONTROL, url="")
        self.ctx = ControlContext(settings=settings, db=self.db, membership=membership)
        self.nodes = NodeRegistry(self.ctx)
        self.server = AppServer(create_control_app(self.ctx, self.nodes),
                                settings.listen_host, settings.listen_port)
        self.url = membership.url = service_url(settings, self.server.port)
        self._jobs: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        await self.db.migrate()
        password_file = self.settings.admin_password_file
        await bootstrap_admin(self.db, str(password_file) if password_file else None)
        await self.ctx.membership.start()
        owner = self.ctx.membership.component_id or "control"
        self.ctx.engine = FlowEngine(self.db, self.ctx.queues, self.ctx, owner)
        for definition in [*vm_flows(), *cascade_flows(), *image_capture_flows()]:
            self.ctx.engine.register(definition)
        await self.server.start(self.ctx.membership.serving_tls())
        self.nodes.start()
        settings = self.settings
        # Flows of this server's previous life at once; those of departed control servers
        # once their heartbeat has been silent for the grace time (here and later, by
        # the periodic takeover).
        recovered = await self.ctx.engine.recover(self._control_peers(),
                                                  grace=settings.flow_takeover_grace)
        self.ctx.engine.start_background(self._control_peers,
                                         settings.flow_heartbeat_interval,
                                         settings.flow_takeover_grace)
        self.ctx.membership.on_peers_changed(self._peers_changed)
        self._jobs.append(asyncio.create_task(self._purge_keys(), name="idempotency-purge"))
        timeout = settings.upload_timeout
        self._jobs.append(asyncio.create_task(expire_uploads_loop(
            self.ctx, timeout, every=min(60.0, timeout / 4)), name="expire-uploads"))
        log.info("control server ready", extra={"url": self.url, "component": owner,
                                                "database": self.db.engine.url.render_as_string(
                                                    hide_password=True),
                                                "recovered_flows": recovered})

    def _control_peers(self) -> set[str]:
        """The other control servers alive now."""
        return {p.component_id for p in self.ctx.membership.peers_of(ComponentType.CONTROL)}

    def _peers_changed(self, added: list[Peer], removed: list[Peer]) -> None:
        if any(p.type == ComponentType.CONTROL for p in removed):
            # A control server left: look for its flows now, not at the next round.
            self.ctx.engine.wake()

    async def _purge_keys(self) -> None:
        """Forget Idempotency-Keys past their retention, a few times per retention."""
        interval = min(max(self.settings.idempotency_retention / 4, 1.0), 3600.0)
        while True:
            try:
                purged = await purge_expired(self.db)
                if purged:
                    log.info("expired idempotency keys purged", extra={"keys": purged})
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("purging expired idempotency keys failed; next round retries",
                            extra={"error": str(exc)})
            await asyncio.sleep(interval)

    async def stop(self) -> None:
        for job in self._jobs:
            job.cancel()
        await asyncio.gather(*self._jobs, return_exceptions=True)
        self._jobs.clear()
        await self.nodes.stop()
        await self.ctx.placement.stop()
        if getattr(self.ctx, "engine", None) is not None:
            await self.ctx.engine.shutdown()
        await self.ctx.audit.close()
        await self.ctx.membership.stop()
        await self.server.stop()
        await self.db.dispose()
