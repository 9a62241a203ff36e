"""Extra addresses of running sandbox VMs (U-HOTPLUG): one more address of the node's
sandbox subnet routed to the VM's NIC, added and removed without restarting the VM.

The address is held (``addresses``, the VM's ``extra_ips``) in one transaction, then the
node is asked to make the NIC again as the VM's network mode now describes it (the same
idempotent request as the create's provision, without starting anything). When the node
refuses, the address is given back: nothing is half made.
"""

from __future__ import annotations

import logging
import uuid as uuidlib

from sqlalchemy import delete, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from yun.control.access.policy import Permission, Scope, require_in_project
from yun.control.allocators.addresses import AddressAllocator, node_scope
from yun.control.context import ControlContext
from yun.control.db.models import AddressRow, FlowRow, ImageRow, NodeRow, PoolRow, VmRow
from yun.control.flows.engine import UNFINISHED
from yun.control.flows.vm import provision_request
from yun.control.network.modes import mode_for
from yun.control.nodeclient import node_client
from yun.control.services.common import find
from yun.proto.errors import Conflict, NotFound
from yun.proto.network import NicNetwork
from yun.proto.resources import VmAddress

log = logging.getLogger("yun.control.vm_addresses")

#: at most this many extra addresses per VM (NicSpec.extra_ips allows 64)
MAX_EXTRA_IPS = 64


class VmAddressService:
    """Adds and removes extra addresses of sandbox VMs (see the module docstring)."""

    def __init__(self, ctx: ControlContext) -> None:
        self.ctx = ctx
        self.allocator = AddressAllocator()

    async def _placed(self, session: AsyncSession, ref: str, scope: Scope
                      ) -> tuple[VmRow, NodeRow, PoolRow | None]:
        vm = await find(session, VmRow, ref, "VM", scope)
        require_in_project(scope.context, Permission.WRITE, vm.project_uuid,
                           what=f"change the addresses of VM {vm.name}")
        pool = await session.get(PoolRow, vm.pool_uuid) if vm.pool_uuid else None
        if mode_for(pool.network_mode if pool else None).network is not NicNetwork.SANDBOX:
            raise Conflict(f"VM {vm.name} is on the LAN (direct mode): its addresses come "
                           f"from the LAN's DHCP server, not the platform")
        busy = (await session.scalars(select(FlowRow.kind).where(
            FlowRow.resource_uuid == vm.uuid, FlowRow.state.in_(UNFINISHED)))).first()
        if busy is not None:
            raise Conflict(f"VM {vm.name} is busy ({busy}); try again when it is done")
        node = await session.get(NodeRow, vm.node_uuid) if vm.node_uuid else None
        if node is None or not node.sandbox_subnet or not vm.ip:
            raise Conflict(f"VM {vm.name} is not placed on a node")
        return vm, node, pool

    async def add(self, ref: str, scope: Scope) -> VmAddress:
        """One more address of the node's subnet for the VM, routed to its NIC at once."""
        async with self.ctx.db.session() as session:
            vm_uuid = (await find(session, VmRow, ref, "VM", scope)).uuid
        async with self.ctx.queues.hold(f"network:{vm_uuid}"):
            async with self.ctx.db.session() as session:
                vm, node, _ = await self._placed(session, vm_uuid, scope)
                if len(vm.extra_ips or []) >= MAX_EXTRA_IPS:
                    raise Conflict(f"VM {vm.name} already has {MAX_EXTRA_IPS} extra addresses")
                try:
                    async with session.begin_nested():
                        ip = await self.allocator.allocate(
                            session, node_scope(node.uuid), node.sandbox_subnet or "",
                            vm.uuid, another=True)
                        await session.flush()
                except IntegrityError as exc:
                    raise Conflict(f"node {node.name}: the address was taken meanwhile; "
                                   f"try again") from exc
                vm.extra_ips = [*(vm.extra_ips or []), ip]
            try:
                await self._apply(vm_uuid, f"add {ip}")
            except Exception:
                await self._forget(vm_uuid, ip)
                raise
        log.info("extra address added to a VM", extra={"vm": vm_uuid, "ip": ip})
        return VmAddress(ip=ip)

    async def remove(self, ref: str, ip: str, scope: Scope) -> None:
        """Take an extra address off the VM (its primary address stays)."""
        async with self.ctx.db.session() as session:
            vm_uuid = (await find(session, VmRow, ref, "VM", scope)).uuid
        async with self.ctx.queues.hold(f"network:{vm_uuid}"):
            async with self.ctx.db.session() as session:
                vm, _, _ = await self._placed(session, vm_uuid, scope)
                if ip not in (vm.extra_ips or []):
                    raise NotFound(f"VM {vm.name} has no extra address {ip}")
            await self._forget(vm_uuid, ip)
            await self._apply(vm_uuid, f"remove {ip}")
        log.info("extra address removed from a VM", extra={"vm": vm_uuid, "ip": ip})

    async def _forget(self, vm_uuid: str, ip: str) -> None:
        async with self.ctx.db.session() as session:
            vm = await session.get(VmRow, vm_uuid)
            if vm is not None:
                vm.extra_ips = [a for a in (vm.extra_ips or []) if a != ip]
            await session.execute(delete(AddressRow).where(
                AddressRow.vm_uuid == vm_uuid, AddressRow.ip == ip))

    async def _apply(self, vm_uuid: str, why: str) -> None:
        """The node makes the VM's NICs as the database now has them (no power change)."""
        async with self.ctx.db.session() as session:
            vm = await session.get(VmRow, vm_uuid)
            if vm is None:
                raise NotFound(f"VM {vm_uuid} no longer exists")
            node = await session.get(NodeRow, vm.node_uuid) if vm.node_uuid else None
            image = await session.get(ImageRow, vm.image_uuid) if vm.image_uuid else None
            if node is None or (vm.image_uuid and image is None):
                raise Conflict(f"VM {vm.name}: its node or image vanished")
            pool = await session.get(PoolRow, vm.pool_uuid) if vm.pool_uuid else None
            request = await provision_request(self.ctx, session, vm, node, image, pool)
            client = node_client(self.ctx, node)
        request.start = False
        # A request id of its own: the same address added again later is another request.
        await client.provision(request, request_id=f"{vm_uuid}:addresses:{uuidlib.uuid4()}",
                               timeout=120)
        log.info("VM's NICs made again on its node", extra={"vm": vm_uuid, "why": why})
