"""The node-side network contract: one backend per kind of VM network.

A node holds one backend per :class:`~yun.proto.network.NicNetwork` it offers:
``sandbox`` always, ``direct`` when its configuration names an uplink. Each NIC of a
VM's spec names its network; the agent hands it to that backend. Every method is
idempotent: the control server repeats commands after timeouts and crashes.

Each backend has a real implementation (netlink, nftables, dnsmasq; root only) and a
simulated twin honouring the same contract (many nodes in one process), both run by
the same contract suite.
"""

from __future__ import annotations

import abc
from typing import ClassVar

from yun.node.hypervisor.base import ResolvedNic
from yun.proto.messages import NicSpec
from yun.proto.network import LearnedAddress, NicNetwork, NodeForward, SandboxSettings


class NetworkError(RuntimeError):
    """Host networking could not be set up, or a request for it is wrong."""


class NetworkBackend(abc.ABC):
    """One kind of VM network on a node: the node-wide part and each VM's ports."""

    kind: ClassVar[NicNetwork]

    @abc.abstractmethod
    async def ensure_network(self, settings: SandboxSettings | None = None) -> None:
        """Create (or check) the node-wide part: bridge or routes, DHCP server, nftables
        table. ``settings`` (sandbox only) come from the control server; None keeps the
        last applied (or, before any, sets up what needs none). Idempotent."""

    @abc.abstractmethod
    async def ensure_port(self, vm_uuid: str, nic: NicSpec) -> ResolvedNic:
        """Make the NIC's port: its tap (sandbox), DHCP lease and filter rules."""

    @abc.abstractmethod
    async def release_port(self, vm_uuid: str, nic_id: str) -> None:
        """Remove one port of the VM (a NIC unplugged); no error if it is not there."""

    @abc.abstractmethod
    async def release_ports(self, vm_uuid: str) -> None:
        """Remove every port, lease, forward, rule and tap of the VM; no error if none."""

    @abc.abstractmethod
    async def vm_ports(self) -> dict[str, list[str]]:
        """Every VM with a port on this node, with its MACs (for reconciliation)."""

    async def set_forwards(self, vm_uuid: str, forwards: list[NodeForward]) -> None:
        """Replace the node NAT ports of the VM (sandbox private mode only)."""
        raise NetworkError(f"{self.kind} networks have no node NAT ports")

    async def learned(self) -> list[LearnedAddress]:
        """Addresses the VMs were seen to take from a DHCP server that is not ours
        (direct mode); empty where the node gives the addresses itself."""
        return []

    async def teardown(self) -> None:
        """Remove the whole network (bridge, dnsmasq, rules): for tests and `yun aio down`."""
