"""Sandbox modes (F-NET-SANDBOX): every VM in its own routed link, its address from its
node's sandbox subnet. One class, parametrised by what reaches the VM from outside."""

from __future__ import annotations

import uuid as uuidlib
from collections.abc import Sequence
from typing import ClassVar

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from yun.control.allocators.addresses import AddressAllocator, mac_for, node_scope
from yun.control.db.models import PoolRow, PublicIpRow, VmNicRow, VmRow
from yun.control.network import public_ips
from yun.control.network.modes.base import ForwardKind, NetworkMode, Undo, address_pool_of
from yun.proto.errors import Conflict, InsufficientCapacity
from yun.proto.messages import NicSpec
from yun.proto.network import Exposure, NicNetwork
from yun.proto.resources import NetworkMode as PoolNetworkMode


def nic_id_for(vm_uuid: str, index: int = 0) -> str:
    """The stable id of the VM's NIC number ``index`` (0: the primary one)."""
    return str(uuidlib.uuid5(uuidlib.UUID(vm_uuid), f"nic{index}"))


class SandboxMode(NetworkMode):
    """A sandbox VM: private, mono or share by ``exposure``."""

    network: ClassVar[NicNetwork] = NicNetwork.SANDBOX

    def __init__(self, exposure: Exposure) -> None:
        self.exposure = exposure
        self.name = f"sandbox-{exposure.value}"
        # mono: its own public address; share: public ports of the pool's address.
        self.public_at_create = exposure is Exposure.MONO
        self.routed = exposure is not Exposure.PRIVATE
        self.addresses = AddressAllocator()

    async def on_placed(self, session: AsyncSession, vm: VmRow, node_uuid: str,
                        subnet: str) -> Undo | None:
        if not subnet:
            # The node has not been given its sandbox subnet yet (before its first
            # report was answered): another node takes the VM.
            raise InsufficientCapacity(f"node {node_uuid} has no sandbox subnet yet")
        vm.ip = await self.addresses.allocate(session, node_scope(node_uuid), subnet, vm.uuid)
        vm.mac = vm.mac or mac_for(vm.uuid)

        async def undo() -> None:
            await AddressAllocator.release(session, vm.uuid)
            vm.ip = None

        return undo

    async def allocate_public(self, session: AsyncSession, vm: VmRow,
                              pool: PoolRow) -> list[PublicIpRow]:
        if self.exposure is not Exposure.MONO:
            return []  # share: ports are taken by port forwards; private: none
        held = (await session.scalars(select(PublicIpRow).where(
            PublicIpRow.vm_uuid == vm.uuid, PublicIpRow.port == 0))).first()
        if held is not None:  # the step ran before (a retry after a crash)
            return [held]
        address_pool = await address_pool_of(session, pool)
        return [await public_ips.allocate_address(
            session, address_pool, vm.project_uuid, kind=public_ips.KIND_VM,
            name=vm.name, vm_uuid=vm.uuid, description=f"public address of VM {vm.name}")]

    def nic_specs(self, vm: VmRow, nics: Sequence[VmNicRow] = (),
                  hostname: str | None = None) -> list[NicSpec]:
        if not vm.ip or not vm.mac:
            raise Conflict(f"VM {vm.name} has no sandbox address yet")
        specs = [NicSpec(nic_id=nic_id_for(vm.uuid), mac=vm.mac, network=self.network,
                         ip=vm.ip, exposure=self.exposure, extra_ips=list(vm.extra_ips or []),
                         hostname=hostname)]
        for nic in sorted(nics, key=lambda n: n.idx):
            # A NIC plugged in later is private whatever the pool: its address is only of
            # the node's subnet (no public address or port maps to it). DHCP offers the
            # VM's hostname on it too, so a guest taking it from any lease keeps its name.
            specs.append(NicSpec(nic_id=nic_id_for(vm.uuid, nic.idx), mac=nic.mac,
                                 network=self.network, ip=nic.ip, exposure=Exposure.PRIVATE,
                                 hostname=hostname))
        return specs

    def forward_kind(self) -> ForwardKind:
        if self.exposure is Exposure.PRIVATE:
            return "node"
        if self.exposure is Exposure.SHARE:
            return "public"
        raise Conflict("a sandbox-mono VM has its own public address: every port of it is "
                       "reached there, no port forward is needed")


PRIVATE = SandboxMode(Exposure.PRIVATE)
MONO = SandboxMode(Exposure.MONO)
SHARE = SandboxMode(Exposure.SHARE)
MODES = {PoolNetworkMode.SANDBOX_PRIVATE: PRIVATE, PoolNetworkMode.SANDBOX_MONO: MONO,
         PoolNetworkMode.SANDBOX_SHARE: SHARE}
