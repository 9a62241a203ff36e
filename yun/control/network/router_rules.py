"""The intelligent routers' rule set as one pure function of the control server's state.

:func:`rule_set` turns rows already read from the database into the
:class:`~yun.proto.network.RouterRuleSet` every router applies; it does no I/O, so it is
tested without a database or nftables. :func:`load_rule_set` reads those rows in one
snapshot (one transaction) and calls it.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from urllib.parse import urlsplit

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from yun.control.db.models import NodeRow, PublicIpRow, VmRow
from yun.control.network.changes import generation as current_generation
from yun.proto.network import MonoMapping, NodeRoute, PortMapping, RouterRuleSet


def node_lan_address(url: str) -> str | None:
    """The node's LAN address: the host of its URL when it is an IPv4 address, else None
    (a node known only by a name cannot be a next hop of a kernel route)."""
    try:
        host = urlsplit(url).hostname
    except ValueError:
        return None
    if not host:
        return None
    try:
        return str(ipaddress.IPv4Address(host))
    except ValueError:
        return None


def rule_set(generation: int, public_rows: Iterable[PublicIpRow],
             vm_ips: Mapping[str, str | None], nodes: Iterable[NodeRow]) -> RouterRuleSet:
    """What every router applies at ``generation``.

    - mono: each whole address (port 0) bound to a VM (kind ``vm`` or ``eip``) whose VM
      has a sandbox address (``vm_ips[vm_uuid]``), ONE per VM address: a translation is
      1:1 both ways (the VM's outbound packets take that one public address), so an
      elastic IP bound to a mono VM stands in for the VM's own public address while it
      is bound (the own address stays the VM's, translated again once the EIP goes); of
      several EIPs bound to one VM, the lowest address;
    - ports: each public port (port > 0) bound to a VM port of a VM with an address;
    - routes: each node with a sandbox subnet and an IPv4 LAN address (its URL's host).

    The lists are sorted so that equal states give equal rule sets."""
    # vm_ip -> (rank, public address, vm_uuid): the one whole address each VM address
    # is translated to (two would be two outbound translations for one key, which nft
    # refuses, failing the whole table).
    whole: dict[str, tuple[tuple[int, ipaddress.IPv4Address], str, str]] = {}
    ports: list[PortMapping] = []
    for row in public_rows:
        if row.vm_uuid is None or row.kind not in ("vm", "eip"):
            continue
        vm_ip = vm_ips.get(row.vm_uuid)
        if not vm_ip:
            continue  # not addressed yet (or gone): nothing to translate to
        if row.port == 0:
            rank = (0 if row.kind == "eip" else 1, ipaddress.IPv4Address(row.ip))
            if vm_ip not in whole or rank < whole[vm_ip][0]:
                whole[vm_ip] = (rank, row.ip, row.vm_uuid)
        elif row.port > 0:
            protocol = row.protocol or "tcp"
            if protocol not in ("tcp", "udp"):
                continue
            ports.append(PortMapping(protocol=protocol, public_ip=row.ip,  # type: ignore[arg-type]
                                     public_port=row.port, vm_ip=vm_ip,
                                     vm_port=row.vm_port or row.port, vm_uuid=row.vm_uuid))
    mono = [MonoMapping(public_ip=ip, vm_ip=vm_ip, vm_uuid=vm_uuid)
            for vm_ip, (_, ip, vm_uuid) in whole.items()]
    routes: list[NodeRoute] = []
    for node in nodes:
        if not node.sandbox_subnet:
            continue
        via = node_lan_address(node.url)
        if via is None:
            continue
        routes.append(NodeRoute(node_uuid=node.uuid, subnet=node.sandbox_subnet, via=via))
    mono.sort(key=lambda m: (ipaddress.IPv4Address(m.public_ip), m.vm_uuid))
    ports.sort(key=lambda p: (p.protocol, ipaddress.IPv4Address(p.public_ip), p.public_port))
    routes.sort(key=lambda r: (ipaddress.IPv4Network(r.subnet), r.node_uuid))
    return RouterRuleSet(generation=generation, mono=mono, ports=ports, routes=routes)


async def load_rule_set(session: AsyncSession) -> RouterRuleSet:
    """The current rule set, read in the caller's transaction.

    The generation is read first: rows newer than it only make the router pull once more
    on the next notice, whereas an older row labelled with a newer generation would
    leave a router believing it is current when it is not."""
    gen = await current_generation(session)
    public_rows = list(await session.scalars(
        select(PublicIpRow).where(PublicIpRow.vm_uuid.is_not(None))))
    vm_uuids = {row.vm_uuid for row in public_rows if row.vm_uuid}
    vm_ips: dict[str, str | None] = {}
    if vm_uuids:
        for uuid, ip in await session.execute(
                select(VmRow.uuid, VmRow.ip).where(VmRow.uuid.in_(vm_uuids))):
            vm_ips[uuid] = ip
    nodes = list(await session.scalars(
        select(NodeRow).where(NodeRow.sandbox_subnet.is_not(None))))
    return rule_set(gen, public_rows, vm_ips, nodes)
