"""The network backend contract: the node-local NAT network and each VM's port on it."""

from __future__ import annotations

import abc
from dataclasses import dataclass

from yun.node.hypervisor.base import ResolvedNic
from yun.proto.messages import NicSpec


class NetworkError(RuntimeError):
    """Host networking could not be set up."""


@dataclass(frozen=True)
class NatNetwork:
    bridge: str
    subnet: str  # e.g. "10.77.0.0/24"
    gateway: str  # e.g. "10.77.0.1"


class NetworkBackend(abc.ABC):
    """The node-local NAT network: a bridge, its DHCP server and its NAT rules."""

    @abc.abstractmethod
    async def ensure_network(self) -> NatNetwork:
        """Create (or check) the bridge, dnsmasq and nftables rules; idempotent."""

    @abc.abstractmethod
    async def ensure_port(self, vm_uuid: str, nic: NicSpec) -> ResolvedNic:
        """Reserve the NIC's static DHCP lease (MAC→IP) and name its tap; idempotent."""

    @abc.abstractmethod
    async def release_ports(self, vm_uuid: str) -> None:
        """Remove every lease and leftover tap of the VM; no error if there is none."""

    @abc.abstractmethod
    async def vm_ports(self) -> dict[str, list[str]]:
        """Every VM with a lease on this node, with its MACs (for reconciliation)."""

    async def teardown(self) -> None:
        """Remove the whole network (bridge, dnsmasq, rules): for tests and `yun aio down`."""
