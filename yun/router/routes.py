"""The router's routes to the nodes' sandbox subnets: ``subnet via node`` per
:class:`~yun.proto.network.NodeRoute`, in the main table, marked with the router's own
route protocol number so that stale ones are found and removed and nothing else is
touched. Replaced idempotently (``replace``)."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from pathlib import Path

from yun.proto.network import NodeRoute

log = logging.getLogger("yun.router.routes")

#: The ``proto`` of the routes this router owns (rtnetlink route protocol; 0-4 are the
#: kernel's, common daemons use 8-192; this one is ours).
RTPROT_YUN = 201
FORWARD_SYSCTL = Path("/proc/sys/net/ipv4/ip_forward")


def _apply_routes(routes: list[NodeRoute]) -> tuple[int, int]:
    from pyroute2 import IPRoute  # imported here: only the router process needs it

    wanted = {r.subnet: r.via for r in routes}
    added = removed = 0
    with IPRoute() as ipr:
        present: dict[str, str | None] = {}
        for route in ipr.get_routes(family=2, proto=RTPROT_YUN):
            dst = route.get_attr("RTA_DST")
            if dst is None:
                continue
            present[f"{dst}/{route['dst_len']}"] = route.get_attr("RTA_GATEWAY")
        for subnet, via in wanted.items():
            if present.get(subnet) == via:
                continue
            ipr.route("replace", dst=subnet, gateway=via, proto=RTPROT_YUN)
            added += 1
        for subnet in present:
            if subnet not in wanted:
                net = ipaddress.IPv4Network(subnet)
                ipr.route("del", dst=str(net.network_address), dst_len=net.prefixlen,
                          proto=RTPROT_YUN)
                removed += 1
    return added, removed


async def apply_routes(routes: list[NodeRoute]) -> None:
    """Make the routes of this router exactly ``routes`` (idempotent)."""
    added, removed = await asyncio.to_thread(_apply_routes, list(routes))
    if added or removed:
        log.info("routes to the nodes updated",
                 extra={"routes": len(routes), "replaced": added, "removed": removed})


def set_forwarding(enabled: bool, path: Path = FORWARD_SYSCTL) -> None:
    """Turn IPv4 forwarding of this network namespace on or off."""
    path.write_text("1\n" if enabled else "0\n")


def forwarding(path: Path = FORWARD_SYSCTL) -> bool:
    """Whether this network namespace forwards IPv4."""
    return path.read_text().strip() == "1"
