"""Finding the domain server by mDNS / DNS-SD on the LAN (F-DISC).

The domain server announces ``<domain>._yun-domain._tcp.local.`` with its URL in
the TXT record; a component that knows only its domain's name asks for exactly
that instance.
"""

from __future__ import annotations

import logging
import socket

from zeroconf import ServiceInfo
from zeroconf.asyncio import AsyncZeroconf

log = logging.getLogger("yun.discovery")

SERVICE_TYPE = "_yun-domain._tcp.local."


def instance_name(domain: str) -> str:
    return f"{domain}.{SERVICE_TYPE}"


class DomainAnnouncer:
    """Publishes the domain server on the LAN while it runs."""

    def __init__(self, domain: str, url: str, addresses: list[str], port: int) -> None:
        self.info = ServiceInfo(
            SERVICE_TYPE,
            instance_name(domain),
            addresses=[socket.inet_aton(a) for a in addresses],
            port=port,
            properties={"url": url, "domain": domain},
            server=f"yun-domain-{domain}.local.",
        )
        self._zc: AsyncZeroconf | None = None

    async def start(self) -> None:
        self._zc = AsyncZeroconf()
        await self._zc.async_register_service(self.info, allow_name_change=False)
        log.info("announcing domain by mDNS", extra={"service": self.info.name})

    async def stop(self) -> None:
        if self._zc is not None:
            await self._zc.async_unregister_service(self.info)
            await self._zc.async_close()
            self._zc = None


async def discover_domain(domain: str, timeout: float = 3.0) -> str | None:
    """The URL of the domain server of ``domain`` found on the LAN, or None."""
    azc = AsyncZeroconf()
    try:
        info = await azc.async_get_service_info(
            SERVICE_TYPE, instance_name(domain), timeout=int(timeout * 1000)
        )
    finally:
        await azc.async_close()
    if info is None:
        return None
    url = info.properties.get(b"url")
    if url:
        return url.decode()
    addresses = info.parsed_addresses()
    return f"https://{addresses[0]}:{info.port}" if addresses else None
