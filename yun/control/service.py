"""The control server process: database, flow engine, node registry, internal API."""

from __future__ import annotations

import logging

from yun.config import ControlSettings
from yun.control.access.identity import bootstrap_admin
from yun.control.api import create_control_app
from yun.control.context import ControlContext
from yun.control.db.session import Database
from yun.control.flows.cascade import cascade_flows
from yun.control.flows.engine import FlowEngine
from yun.control.flows.vm import vm_flows
from yun.control.services.nodes import NodeRegistry
from yun.proto.components import ComponentType
from yun.proto.membership import Membership
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

    async def start(self) -> None:
        await self.db.migrate()
        password_file = self.settings.admin_password_file
        await bootstrap_admin(self.db, str(password_file) if password_file else None)
        await self.ctx.membership.start()
        owner = self.ctx.membership.component_id or "control"
        self.ctx.engine = FlowEngine(self.db, self.ctx.queues, self.ctx, owner)
        for definition in [*vm_flows(), *cascade_flows()]:
            self.ctx.engine.register(definition)
        await self.server.start(self.ctx.membership.serving_tls())
        self.nodes.start()
        others = {p.component_id for p in self.ctx.membership.peers_of(ComponentType.CONTROL)}
        recovered = await self.ctx.engine.recover(others)
        log.info("control server ready", extra={"url": self.url, "component": owner,
                                                "database": self.db.engine.url.render_as_string(
                                                    hide_password=True),
                                                "recovered_flows": recovered})

    async def stop(self) -> None:
        await self.nodes.stop()
        await self.ctx.placement.stop()
        if getattr(self.ctx, "engine", None) is not None:
            await self.ctx.engine.shutdown()
        await self.ctx.membership.stop()
        await self.server.stop()
        await self.db.dispose()
