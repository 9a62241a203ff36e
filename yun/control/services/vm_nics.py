"""NICs plugged into VMs after their create (U-HOTPLUG): listed, added and removed, on a
running VM (hot-plug: the guest sees a new interface at once) or a stopped one (it has
the NIC at its next start).

A plugged NIC is a ``vm_nics`` row: its index (the primary NIC, the VM's own ``mac`` and
``ip``, is 0), the MAC the platform chose and, in sandbox mode, an address of the node's
sandbox subnet held like the primary one (an ``addresses`` row of the VM, from the same
:class:`AddressAllocator`). It is on the VM's network; a sandbox NIC is always private
(no public address or port, even in a mono or share pool: keep it simple). The row is
part of the VM's desired state: :func:`yun.control.flows.vm.provision_request` puts it
in the VM's spec, so a redefinition or a restart keeps it.

Adding holds the MAC and address in one transaction, then asks the node to plug the NIC
(port first, then the hypervisor, live when the domain runs and in its definition);
when the node refuses, the row and address are given back: nothing is half made.
Removing asks the node to unplug first, then gives the MAC and address back. Both run
through the VM's ``network:`` queue, as extra addresses do, so they never interleave
with another change of the VM's NICs.
"""

from __future__ import annotations

import contextlib
import logging
import re
import uuid as uuidlib

from sqlalchemy import delete, func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from yun.control.access.policy import Permission, Scope, require_in_project
from yun.control.allocators.addresses import AddressAllocator, mac_for, node_scope
from yun.control.context import ControlContext
from yun.control.db.models import AddressRow, FlowRow, NodeRow, PoolRow, VmNicRow, VmRow
from yun.control.flows.engine import UNFINISHED
from yun.control.flows.vm import hostname_for
from yun.control.network.modes import NetworkMode, mode_for
from yun.control.network.modes.sandbox import nic_id_for
from yun.control.network.subnets import sandbox_settings
from yun.control.nodeclient import node_client
from yun.control.services.common import find
from yun.proto.errors import Conflict, NotFound, Unprocessable
from yun.proto.messages import NicAttach
from yun.proto.network import Exposure, NicNetwork
from yun.proto.resources import VmNic, VmNicCreate, VmState

log = logging.getLogger("yun.control.vm_nics")

#: at most this many NICs per VM, the primary one included
MAX_NICS = 8
#: how long the node may take to plug or unplug (a guest releases a NIC slowly under TCG)
NODE_TIMEOUT = 120.0
# VMs whose NICs may change: a running one (hot-plug) or a stopped one (at next start).
_CHANGEABLE = (VmState.RUNNING, VmState.STOPPED)
_MAC_TRIES = 16
_INDEX = re.compile(r"^[0-9]{1,3}$")
_DASHED_MAC = re.compile(r"^[0-9a-f]{2}(-[0-9a-f]{2}){5}$")


class VmNicService:
    """Lists, plugs and unplugs the NICs of VMs (see the module docstring)."""

    def __init__(self, ctx: ControlContext) -> None:
        self.ctx = ctx
        self.allocator = AddressAllocator()

    # -- reading --------------------------------------------------------------------------

    async def list(self, ref: str, scope: Scope) -> list[VmNic]:
        """Every NIC of the VM, the primary one (index 0) first."""
        async with self.ctx.db.reading() as session:
            vm = await find(session, VmRow, ref, "VM", scope)
            mode = await _mode(session, vm)
            rows = await _rows(session, vm.uuid)
            return [_primary(vm, mode), *(_model(vm, mode, r) for r in rows)]

    # -- changes --------------------------------------------------------------------------

    async def add(self, ref: str, req: VmNicCreate, scope: Scope) -> VmNic:
        """Plug one more NIC into the VM: a MAC and (sandbox) an address are held, then
        its node plugs it; given back if the node fails."""
        async with self.ctx.db.session() as session:
            vm_uuid = (await find(session, VmRow, ref, "VM", scope)).uuid
        async with self.ctx.queues.hold(f"network:{vm_uuid}"):
            async with self.ctx.db.session() as session:
                vm, node, mode = await self._changeable(session, vm_uuid, scope, "add NICs to")
                _check_request(vm, mode, req)
                rows = await _rows(session, vm.uuid)
                if len(rows) + 1 >= MAX_NICS:
                    raise Conflict(f"VM {vm.name} already has {len(rows) + 1} NICs, the most "
                                   f"a VM may have ({MAX_NICS}); remove one first")
                used = {r.idx for r in rows}
                index = next(i for i in range(1, MAX_NICS) if i not in used)
                try:
                    async with session.begin_nested():
                        row = VmNicRow(uuid=str(uuidlib.uuid4()), vm_uuid=vm.uuid, idx=index,
                                       mac=await _free_mac(session), ip=None)
                        if mode.network is NicNetwork.SANDBOX:
                            row.ip = await self.allocator.allocate(
                                session, node_scope(node.uuid), node.sandbox_subnet or "",
                                vm.uuid, another=True)
                        session.add(row)
                        await session.flush()
                except IntegrityError as exc:
                    raise Conflict(f"VM {vm.name}: the NIC's index, MAC or address was taken "
                                   f"meanwhile; try again") from exc
                nic = _model(vm, mode, row)
                spec = mode.nic_specs(vm, [row], hostname=hostname_for(vm.name))[-1]
                settings = None
                if spec.network is NicNetwork.SANDBOX:
                    settings = await sandbox_settings(session, node, self.ctx.settings)
                    if settings is None:
                        raise Conflict(f"node {node.name} has no sandbox subnet yet")
                client = node_client(self.ctx, node)
            try:
                await client.attach_nic(vm_uuid, NicAttach(nic=spec, sandbox=settings),
                                        request_id=f"{vm_uuid}:nic:{row.uuid}:attach",
                                        timeout=NODE_TIMEOUT)
            except Exception as exc:
                # The node may have plugged it after all (an answer lost to a timeout):
                # unplug, best effort, so nothing is left there with no row naming it.
                with contextlib.suppress(Exception):
                    await client.detach_nic(vm_uuid, spec.nic_id,
                                            request_id=f"{vm_uuid}:nic:{row.uuid}:undo",
                                            timeout=NODE_TIMEOUT)
                await self._forget(vm_uuid, row.uuid)
                log.warning("NIC not plugged: the node failed; its MAC and address given "
                            "back", extra={"vm": vm_uuid, "nic": row.uuid, "mac": row.mac,
                                           "ip": row.ip, "error": str(exc)})
                raise
        log.info("NIC plugged into a VM", extra={"vm": vm_uuid, "nic": row.uuid,
                                                 "index": index, "mac": row.mac, "ip": row.ip})
        return nic

    async def remove(self, ref: str, nic_ref: str, scope: Scope) -> str:
        """Unplug a NIC of the VM (named by its index, uuid or MAC) and give its MAC and
        address back; the primary NIC stays. Returns the VM's uuid."""
        async with self.ctx.db.session() as session:
            vm_uuid = (await find(session, VmRow, ref, "VM", scope)).uuid
        async with self.ctx.queues.hold(f"network:{vm_uuid}"):
            async with self.ctx.db.session() as session:
                vm, node, _ = await self._changeable(session, vm_uuid, scope,
                                                     "remove NICs from")
                row = await _find_nic(session, vm, nic_ref)
                nic_id = nic_id_for(vm.uuid, row.idx)
                row_uuid, index = row.uuid, row.idx
                client = node_client(self.ctx, node)
            await client.detach_nic(vm_uuid, nic_id,
                                    request_id=f"{vm_uuid}:nic:{row_uuid}:detach",
                                    timeout=NODE_TIMEOUT)
            await self._forget(vm_uuid, row_uuid)
        log.info("NIC unplugged from a VM", extra={"vm": vm_uuid, "nic": row_uuid,
                                                   "index": index})
        return vm_uuid

    # -- helpers --------------------------------------------------------------------------

    async def _changeable(self, session: AsyncSession, vm_uuid: str, scope: Scope,
                          what: str) -> tuple[VmRow, NodeRow, NetworkMode]:
        """The VM, its node and network mode, when the caller may change its NICs now."""
        vm = await find(session, VmRow, vm_uuid, "VM", scope)
        require_in_project(scope.context, Permission.WRITE, vm.project_uuid,
                           what=f"{what} VM {vm.name}")
        busy = (await session.scalars(select(FlowRow.kind).where(
            FlowRow.resource_uuid == vm.uuid, FlowRow.state.in_(UNFINISHED)))).first()
        if busy is not None:
            raise Conflict(f"VM {vm.name} is busy ({busy}); try again when it is done")
        if vm.state not in _CHANGEABLE:
            raise Conflict(f"VM {vm.name} is {vm.state}: NICs are plugged into running or "
                           f"stopped VMs only")
        node = await session.get(NodeRow, vm.node_uuid) if vm.node_uuid else None
        if node is None:
            raise Conflict(f"VM {vm.name} is not placed on a node")
        mode = await _mode(session, vm)
        if mode.network is NicNetwork.SANDBOX and not node.sandbox_subnet:
            raise Conflict(f"node {node.name} has no sandbox subnet yet")
        return vm, node, mode

    async def _forget(self, vm_uuid: str, row_uuid: str) -> None:
        """Drop the NIC's row and give its address back (its MAC goes with the row)."""
        async with self.ctx.db.session() as session:
            row = await session.get(VmNicRow, row_uuid)
            if row is None:
                return
            if row.ip:
                await session.execute(delete(AddressRow).where(
                    AddressRow.vm_uuid == vm_uuid, AddressRow.ip == row.ip))
            await session.delete(row)


async def _mode(session: AsyncSession, vm: VmRow) -> NetworkMode:
    pool = await session.get(PoolRow, vm.pool_uuid) if vm.pool_uuid else None
    return mode_for(pool.network_mode if pool is not None else None)


async def _rows(session: AsyncSession, vm_uuid: str) -> list[VmNicRow]:
    return list((await session.scalars(select(VmNicRow).where(
        VmNicRow.vm_uuid == vm_uuid).order_by(VmNicRow.idx))).all())


def _check_request(vm: VmRow, mode: NetworkMode, req: VmNicCreate) -> None:
    """Refuse (422) a NIC on another network than the VM's, naming both."""
    if req.network is not None and req.network != mode.network.value:
        raise Unprocessable(f"network {req.network!r}: VM {vm.name} is in a {mode.name} pool, "
                            f"so its NICs are on the {mode.network.value} network")
    if req.exposure is not None and mode.network is not NicNetwork.SANDBOX:
        raise Unprocessable(f"exposure {req.exposure!r}: VM {vm.name} is on the LAN "
                            f"({mode.name}); only sandbox NICs have an exposure")


async def _free_mac(session: AsyncSession) -> str:
    """A MAC no VM and no other NIC has (QEMU's prefix, random: unique constraints on
    ``vm_nics.mac`` guard against a race)."""
    for _ in range(_MAC_TRIES):
        mac = mac_for(str(uuidlib.uuid4()))
        taken = await session.scalar(select(func.count()).select_from(VmRow).where(
            VmRow.mac == mac)) or await session.scalar(select(func.count()).select_from(
                VmNicRow).where(VmNicRow.mac == mac))
        if not taken:
            return mac
    raise Conflict("no free MAC address found; try again")


async def _find_nic(session: AsyncSession, vm: VmRow, ref: str) -> VmNicRow:
    """The plugged NIC of ``vm`` named by its index, uuid or MAC; Conflict for the
    primary NIC, NotFound naming the VM otherwise."""
    # A MAC may come with '-' for ':' (colons cannot travel in a path through the gateway).
    text = ref.strip().lower()
    if _DASHED_MAC.match(text):
        text = text.replace("-", ":")
    if text == "0" or (vm.mac and text == vm.mac.lower()):
        raise Conflict(f"NIC 0 ({vm.mac}) is the primary NIC of VM {vm.name}: it cannot be "
                       f"removed (delete the VM instead)")
    for row in await _rows(session, vm.uuid):
        if (_INDEX.match(text) and int(text) == row.idx) or text in (row.uuid, row.mac):
            return row
    raise NotFound(f"VM {vm.name} has no NIC {ref!r} (name it by index, uuid or MAC; "
                   f"see the VM's NIC list)")


def _exposure(mode: NetworkMode, primary: bool) -> str | None:
    if mode.network is not NicNetwork.SANDBOX:
        return None
    if not primary:
        return Exposure.PRIVATE.value
    return str(getattr(mode, "exposure", Exposure.PRIVATE).value)


def _primary(vm: VmRow, mode: NetworkMode) -> VmNic:
    return VmNic(index=0, uuid=None, vm_uuid=vm.uuid, mac=vm.mac,
                 network=mode.network.value, exposure=_exposure(mode, True), ip=vm.ip,
                 primary=True)


def _model(vm: VmRow, mode: NetworkMode, row: VmNicRow) -> VmNic:
    return VmNic(index=row.idx, uuid=row.uuid, vm_uuid=vm.uuid, mac=row.mac,
                 network=mode.network.value, exposure=_exposure(mode, False), ip=row.ip)
