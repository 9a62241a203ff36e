"""Each node's sandbox subnet: a block of the platform's sandbox supernet, unique.

Routers route each node's subnet to that node, so no two nodes may share one; the
control server hands them out when a node first reports (or reports without one).
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Sequence
from datetime import timedelta

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from yun.config import ControlSettings
from yun.control.db.models import NodeRow, RouterRow, utcnow
from yun.proto.errors import InsufficientCapacity
from yun.proto.network import SandboxSettings

log = logging.getLogger("yun.control.network.subnets")


def gateway_of(subnet: str) -> str:
    """The node's own address on its sandbox taps: the subnet's first host."""
    return str(ipaddress.IPv4Network(subnet).network_address + 1)


async def assign_sandbox_subnet(session: AsyncSession, node: NodeRow, supernet: str,
                                prefix: int) -> str:
    """Give ``node`` the lowest block of ``supernet`` no other node holds (kept if it has
    one). The unique constraint on ``nodes.sandbox_subnet`` settles a race between two
    control servers: the loser's transaction fails and the node's next report retries."""
    if node.sandbox_subnet:
        return node.sandbox_subnet
    net = ipaddress.IPv4Network(supernet)
    held = set((await session.scalars(
        select(NodeRow.sandbox_subnet).where(NodeRow.sandbox_subnet.is_not(None)))).all())
    for block in net.subnets(new_prefix=prefix):  # stops at the first free block
        text = str(block)
        if text not in held:
            node.sandbox_subnet = text
            log.info("node given its sandbox subnet",
                     extra={"node": node.uuid, "node_name": node.name, "subnet": text})
            return text
    raise InsufficientCapacity(f"no free /{prefix} left in the sandbox supernet {supernet} "
                               f"for node {node.name}")


async def sandbox_settings(session: AsyncSession, node: NodeRow, settings: ControlSettings,
                           live_routers: Sequence[str] | None = None
                           ) -> SandboxSettings | None:
    """What the node's sandbox network must be now: its subnet, the live routers (next
    hops of mono and share VMs) and the networks no VM may reach. ``live_routers``: the
    routers as last read (``ControlContext.live_routers``), read here when None."""
    if not node.sandbox_subnet:
        return None
    if live_routers is not None:
        routers = list(live_routers)
    else:
        since = utcnow() - timedelta(seconds=settings.router_timeout)
        routers = sorted(set((await session.scalars(select(RouterRow.lan_address).where(
            RouterRow.last_seen_at >= since))).all()))
    blocked = sorted({settings.sandbox_supernet, *settings.vm_blocked_networks})
    return SandboxSettings(subnet=node.sandbox_subnet, gateway=gateway_of(node.sandbox_subnet),
                           routers=routers, blocked=blocked)
