"""The gateway process."""

from __future__ import annotations

import logging

from yun.config import GatewaySettings
from yun.gateway.app import create_gateway_app
from yun.proto.components import ComponentType
from yun.proto.membership import Membership
from yun.util.serve import AppServer, service_url

log = logging.getLogger("yun.gateway")


class GatewayService:
    """A gateway: its membership in the work domain and its HTTP server."""

    def __init__(self, settings: GatewaySettings) -> None:
        self.settings = settings
        self.membership = Membership(settings, ComponentType.GATEWAY, url="")
        self.server = AppServer(create_gateway_app(self.membership, settings),
                                settings.listen_host, settings.listen_port)
        self.url = self.membership.url = service_url(settings, self.server.port)

    async def start(self) -> None:
        await self.membership.start()
        await self.server.start()
        log.info("gateway ready", extra={"url": self.url})

    async def stop(self) -> None:
        await self.server.stop()
        await self.membership.stop()
