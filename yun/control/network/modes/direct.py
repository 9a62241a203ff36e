"""Direct mode (F-NET-DIRECT): the VM's tap joins the node's bridge on its uplink; the
LAN's own DHCP server gives the VM its address, which the node learns and reports."""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

from sqlalchemy.ext.asyncio import AsyncSession

from yun.control.allocators.addresses import mac_for
from yun.control.db.models import VmNicRow, VmRow
from yun.control.network.modes.base import ForwardKind, NetworkMode, Undo
from yun.control.network.modes.sandbox import nic_id_for
from yun.proto.errors import Conflict
from yun.proto.messages import NicSpec, NodeCapability
from yun.proto.network import NicNetwork
from yun.proto.resources import NetworkMode as PoolNetworkMode


class DirectMode(NetworkMode):
    """A VM on the LAN like a physical server: only nodes with a direct bridge take it."""

    name = PoolNetworkMode.DIRECT.value
    network: ClassVar[NicNetwork] = NicNetwork.DIRECT
    capabilities: ClassVar[frozenset[str]] = frozenset({NodeCapability.NET_DIRECT.value})

    async def on_placed(self, session: AsyncSession, vm: VmRow, node_uuid: str,
                        subnet: str) -> Undo | None:
        # The LAN's DHCP server gives the address: only the MAC is the platform's.
        vm.mac = vm.mac or mac_for(vm.uuid)
        return None

    def nic_specs(self, vm: VmRow, nics: Sequence[VmNicRow] = (),
                  hostname: str | None = None) -> list[NicSpec]:
        if not vm.mac:
            raise Conflict(f"VM {vm.name} has no MAC yet")
        specs = [NicSpec(nic_id=nic_id_for(vm.uuid), mac=vm.mac, network=self.network,
                         hostname=hostname)]
        for nic in sorted(nics, key=lambda n: n.idx):
            specs.append(NicSpec(nic_id=nic_id_for(vm.uuid, nic.idx), mac=nic.mac,
                                 network=self.network))
        return specs

    def forward_kind(self) -> ForwardKind:
        raise Conflict("a direct-mode VM is on the LAN itself: reach it at its own address, "
                       "no port forward is needed")


DIRECT = DirectMode()
