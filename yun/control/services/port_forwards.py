"""Port forwards of VMs: how an operator reaches a port of a VM from outside.

- sandbox-private (F-SB-PRIVATE): a NAT port of the VM's node (the lowest free one of
  ``NODE_PORTS`` on that node) → the VM's port; pushed to the node at once;
- sandbox-share (F-SB-SHARE): a public ``ip:port`` of the pool's shared address pool →
  the VM's port; the routers follow the change (best effort, they catch up anyway);
- sandbox-mono and direct VMs need none: refused with the reason.

The rows are the truth; the node's set of forwards of a VM is replaced as a whole by
every change, so a retried or repeated push converges.
"""

from __future__ import annotations

import logging
import uuid as uuidlib
from collections import defaultdict
from urllib.parse import urlsplit

from sqlalchemy import bindparam, delete, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from yun.control.access.policy import Permission, Scope, require_in_project
from yun.control.context import ControlContext
from yun.control.db.models import NodeForwardRow, NodeRow, PoolRow, PublicIpRow, VmRow
from yun.control.db.prepared import column_rows
from yun.control.network import public_ips
from yun.control.network.modes import mode_for
from yun.control.network.modes.base import address_pool_of
from yun.control.network.modes.publish import notify
from yun.control.nodeclient import node_client
from yun.control.services.common import find
from yun.proto.errors import Conflict, InsufficientCapacity, NotFound, Unprocessable, YunError
from yun.proto.network import NodeForward
from yun.proto.resources import PortForward, PortForwardCreate

log = logging.getLogger("yun.control.port_forwards")

#: the NAT ports of a node handed to private VMs' forwards
NODE_PORTS = range(40000, 50000)
# A lost race for a node port (another control server took it) is retried this often.
_ATTEMPTS = 8


def node_address(node: NodeRow) -> str:
    """Where the node's NAT ports answer: the address it reports for them, else the
    host of its agent's URL."""
    return forward_address_of(node.forward_address, node.url)


def forward_address_of(forward_address: str | None, url: str) -> str:
    """:func:`node_address` from the two columns it reads."""
    return forward_address or urlsplit(url).hostname or url


async def forwards_of(session: AsyncSession, vm_uuids: list[str]
                      ) -> dict[str, list[PortForward]]:
    """The port forwards of each VM (node NAT ports and public ports), by VM port."""
    return (await addressing_of(session, vm_uuids))[1]


_NODE_FORWARDS = (
    select(NodeForwardRow.vm_uuid, NodeForwardRow.protocol, NodeForwardRow.vm_port,
           NodeForwardRow.node_port, NodeRow.forward_address, NodeRow.url)
    .join(NodeRow, NodeRow.uuid == NodeForwardRow.node_uuid)
    .where(NodeForwardRow.vm_uuid.in_(bindparam("uuids", expanding=True))))
_PUBLIC_ADDRESSES = (
    select(PublicIpRow.vm_uuid, PublicIpRow.ip, PublicIpRow.port, PublicIpRow.protocol,
           PublicIpRow.vm_port)
    .where(PublicIpRow.vm_uuid.in_(bindparam("uuids", expanding=True)))
    .order_by(PublicIpRow.created_at))


async def addressing_of(session: AsyncSession, vm_uuids: list[str]
                        ) -> tuple[dict[str, str], dict[str, list[PortForward]]]:
    """Each VM's whole public address, if it has one (sandbox-mono, or an elastic IP), and
    its port forwards (node NAT ports and public ports, by VM port): two statements."""
    public: dict[str, str] = {}
    found: dict[str, list[PortForward]] = defaultdict(list)
    if not vm_uuids:
        return public, found
    params = {"uuids": vm_uuids}
    for vm_uuid, protocol, vm_port, node_port, forward_address, url in await column_rows(
            session, _NODE_FORWARDS, params):
        found[vm_uuid].append(PortForward(
            protocol=protocol, vm_port=vm_port, address=forward_address_of(forward_address, url),
            port=node_port))
    # A whole address is a row with port 0; a public port forward, one with its port.
    for holder, ip, port, public_protocol, public_vm_port in await column_rows(
            session, _PUBLIC_ADDRESSES, params):
        if not holder:
            continue
        if port == 0:
            public.setdefault(holder, ip)
        else:
            found[holder].append(PortForward(
                protocol=public_protocol, vm_port=public_vm_port or 0, address=ip, port=port))
    for forwards in found.values():
        forwards.sort(key=lambda f: (f.vm_port, f.protocol))
    return public, found


class PortForwardService:
    """Adds, lists and removes the port forwards of VMs (see the module docstring)."""

    def __init__(self, ctx: ControlContext) -> None:
        self.ctx = ctx

    async def _vm(self, session: AsyncSession, ref: str, scope: Scope, write: bool
                  ) -> tuple[VmRow, PoolRow | None]:
        vm = await find(session, VmRow, ref, "VM", scope)
        if write:
            require_in_project(scope.context, Permission.WRITE, vm.project_uuid,
                               what=f"change the port forwards of VM {vm.name}")
        pool = await session.get(PoolRow, vm.pool_uuid) if vm.pool_uuid else None
        return vm, pool

    async def list(self, ref: str, scope: Scope) -> list[PortForward]:
        async with self.ctx.db.reading() as session:
            vm, _ = await self._vm(session, ref, scope, write=False)
            return (await forwards_of(session, [vm.uuid])).get(vm.uuid, [])

    async def add(self, ref: str, req: PortForwardCreate, scope: Scope) -> PortForward:
        """A new forward to ``req.port`` of the VM; 409 when its mode has none, when it is
        not placed yet, or when that port is already forwarded."""
        async with self.ctx.db.session() as session:
            vm, pool = await self._vm(session, ref, scope, write=True)
            vm_uuid = vm.uuid
        async with self.ctx.queues.hold(f"port-forwards:{vm_uuid}"):
            async with self.ctx.db.session() as session:
                vm, pool = await self._vm(session, vm_uuid, scope, write=True)
                kind = mode_for(pool.network_mode if pool else None).forward_kind()
                if await self._forwarded(session, vm.uuid, req):
                    raise Conflict(f"port {req.protocol}/{req.port} of VM {vm.name} is "
                                   f"already forwarded")
                if kind == "public":
                    assert pool is not None  # a share mode comes from a pool
                    row = await public_ips.allocate_port(
                        session, await address_pool_of(session, pool), vm.project_uuid,
                        vm_uuid=vm.uuid, vm_port=req.port, protocol=req.protocol,
                        name=vm.name)
                    made = PortForward(protocol=req.protocol, vm_port=req.port,
                                       address=row.ip, port=row.port)
                else:
                    node = await self._node_of(session, vm)
                    fwd = await self._take_node_port(session, vm, node, req)
                    made = PortForward(protocol=req.protocol, vm_port=req.port,
                                       address=node_address(node), port=fwd.node_port)
            if kind == "public":
                await notify(self.ctx, vm_uuid)
            else:
                try:
                    await self._push(vm_uuid)
                except YunError:
                    # The node did not take it: it is not a forward (nothing half made).
                    async with self.ctx.db.session() as session:
                        await session.execute(delete(NodeForwardRow).where(
                            NodeForwardRow.vm_uuid == vm_uuid,
                            NodeForwardRow.protocol == req.protocol,
                            NodeForwardRow.vm_port == req.port))
                    raise
        log.info("port forward added", extra={
            "vm": vm_uuid, "protocol": made.protocol, "vm_port": made.vm_port,
            "address": made.address, "port": made.port})
        return made

    async def remove(self, ref: str, protocol: str, port: int, scope: Scope) -> None:
        """Remove the forward to ``port`` of the VM; 404 when there is none."""
        if protocol not in ("tcp", "udp"):
            raise Unprocessable(f"protocol must be tcp or udp, not {protocol!r}")
        async with self.ctx.db.session() as session:
            vm, _ = await self._vm(session, ref, scope, write=True)
            vm_uuid, name = vm.uuid, vm.name
        async with self.ctx.queues.hold(f"port-forwards:{vm_uuid}"):
            async with self.ctx.db.session() as session:
                node_rows = await session.execute(delete(NodeForwardRow).where(
                    NodeForwardRow.vm_uuid == vm_uuid, NodeForwardRow.protocol == protocol,
                    NodeForwardRow.vm_port == port))
                public = (await session.scalars(select(PublicIpRow).where(
                    PublicIpRow.vm_uuid == vm_uuid, PublicIpRow.protocol == protocol,
                    PublicIpRow.vm_port == port, PublicIpRow.port > 0))).all()
                for row in public:
                    await public_ips.release(session, row)
                if not node_rows.rowcount and not public:  # type: ignore[attr-defined]
                    raise NotFound(f"VM {name} has no forward of port {protocol}/{port}")
            if node_rows.rowcount:  # type: ignore[attr-defined]
                await self._push(vm_uuid)
            if public:
                await notify(self.ctx, vm_uuid)
        log.info("port forward removed", extra={"vm": vm_uuid, "protocol": protocol,
                                                "vm_port": port})

    @staticmethod
    async def _forwarded(session: AsyncSession, vm_uuid: str, req: PortForwardCreate) -> bool:
        node = await session.scalar(select(NodeForwardRow.uuid).where(
            NodeForwardRow.vm_uuid == vm_uuid, NodeForwardRow.protocol == req.protocol,
            NodeForwardRow.vm_port == req.port))
        public = await session.scalar(select(PublicIpRow.uuid).where(
            PublicIpRow.vm_uuid == vm_uuid, PublicIpRow.protocol == req.protocol,
            PublicIpRow.vm_port == req.port, PublicIpRow.port > 0))
        return node is not None or public is not None

    @staticmethod
    async def _node_of(session: AsyncSession, vm: VmRow) -> NodeRow:
        node = await session.get(NodeRow, vm.node_uuid) if vm.node_uuid else None
        if node is None or not vm.ip:
            raise Conflict(f"VM {vm.name} is not placed on a node yet")
        return node

    @staticmethod
    async def _take_node_port(session: AsyncSession, vm: VmRow, node: NodeRow,
                              req: PortForwardCreate) -> NodeForwardRow:
        """The lowest free NAT port of the node; the unique (node, protocol, port) settles
        a race with another control server (retried on the next free one)."""
        for _ in range(_ATTEMPTS):
            held = set((await session.scalars(select(NodeForwardRow.node_port).where(
                NodeForwardRow.node_uuid == node.uuid,
                NodeForwardRow.protocol == req.protocol))).all())
            port = next((p for p in NODE_PORTS if p not in held), None)
            if port is None:
                raise InsufficientCapacity(f"node {node.name} has no free {req.protocol} NAT "
                                           f"port left ({NODE_PORTS.start}-{NODE_PORTS.stop - 1})")
            row = NodeForwardRow(uuid=str(uuidlib.uuid4()), vm_uuid=vm.uuid,
                                 node_uuid=node.uuid, protocol=req.protocol, node_port=port,
                                 vm_port=req.port)
            try:
                async with session.begin_nested():
                    session.add(row)
                    await session.flush()
            except IntegrityError:
                continue
            return row
        raise Conflict(f"node {node.name}: every free NAT port was taken by concurrent "
                       f"requests; try again")

    async def _push(self, vm_uuid: str) -> None:
        """Replace the node's forwards of the VM by the rows' (all of them)."""
        async with self.ctx.db.session() as session:
            vm = await session.get(VmRow, vm_uuid)
            node = await session.get(NodeRow, vm.node_uuid) if vm and vm.node_uuid else None
            if vm is None or node is None or not vm.ip:
                return
            rows = (await session.scalars(select(NodeForwardRow).where(
                NodeForwardRow.vm_uuid == vm_uuid, NodeForwardRow.node_uuid == node.uuid)
                .order_by(NodeForwardRow.node_port))).all()
            forwards = [NodeForward(protocol=r.protocol,  # type: ignore[arg-type]
                                    node_port=r.node_port, vm_ip=vm.ip, vm_port=r.vm_port)
                        for r in rows]
            client = node_client(self.ctx, node)
        await client.set_forwards(vm_uuid, forwards)
