"""The control side of a network mode, shaped like the node's hypervisor driver.

A pool's ``network_mode`` names one :class:`NetworkMode`; the create and delete flows,
the placement hook and the port-forward requests ask it what to do, instead of knowing
the modes themselves:

- ``capabilities``: what a node must have to take the VM (the scheduler filters on it);
- ``on_placed``: node-scoped addresses, in the placement's transaction;
- ``allocate_public``: public addresses taken at create (the flow's "address" step,
  skipped for a mode without ``public_at_create``);
- ``routed``: whether the routers may forward to its VMs (a public address or port):
  the create's "forwarders" step is skipped for a mode that is not;
- ``release``: everything the VM holds of the network, in the caller's transaction;
- ``nic_specs``: the NICs the node makes;
- ``forward_kind``: how the operator reaches a port of the VM (node NAT port, public
  ip:port, or not at all, with the reason).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Sequence
from typing import ClassVar, Literal

from sqlalchemy import delete
from sqlalchemy.ext.asyncio import AsyncSession

from yun.control.allocators.addresses import AddressAllocator
from yun.control.db.models import (
    AddressPoolRow,
    NodeForwardRow,
    PoolRow,
    PublicIpRow,
    VmNicRow,
    VmRow,
)
from yun.control.network import public_ips
from yun.proto.errors import Conflict
from yun.proto.messages import NicSpec
from yun.proto.network import NicNetwork

Undo = Callable[[], Awaitable[None]]
# How a port of a VM is reached from outside: a NAT port of its node (private), a
# public ip:port of the pool's shared address pool (share), or not by a forward.
ForwardKind = Literal["node", "public"]


async def release_node_scoped(session: AsyncSession, vm_uuid: str) -> None:
    """Give back what the VM holds on its node: its sandbox addresses and NAT ports (a
    VM moved to another node, or deleted)."""
    await AddressAllocator.release(session, vm_uuid)
    await session.execute(delete(NodeForwardRow).where(NodeForwardRow.vm_uuid == vm_uuid))


async def release_all(session: AsyncSession, vm_uuid: str) -> list[str]:
    """Everything the VM holds of the network, whatever its mode (its pool may be gone):
    node-scoped addresses and ports, public addresses and ports (elastic IPs are only
    unbound). Returns the public addresses released."""
    await release_node_scoped(session, vm_uuid)
    return await public_ips.release_vm(session, vm_uuid)


async def address_pool_of(session: AsyncSession, pool: PoolRow) -> AddressPoolRow:
    """The address pool linked to ``pool``; Conflict naming the pool when there is none."""
    if not pool.address_pool_uuid:
        raise Conflict(f"pool {pool.name} is {pool.network_mode} but has no address pool "
                       f"linked: link one to it first")
    row = await session.get(AddressPoolRow, pool.address_pool_uuid)
    if row is None:
        raise Conflict(f"pool {pool.name}: its address pool no longer exists")
    return row


class NetworkMode(ABC):
    """One network mode of a pool (see the module docstring)."""

    #: the pool's ``network_mode`` value it serves
    name: str
    #: the node-side backend of the VM's NICs
    network: ClassVar[NicNetwork]
    #: node capabilities a node needs to take a VM of this mode
    capabilities: ClassVar[frozenset[str]] = frozenset()
    #: the VM takes a public address at create (:meth:`allocate_public` has work)
    public_at_create: bool = False
    #: the routers may forward to the VM: a public address or port maps to it
    routed: bool = False

    @abstractmethod
    async def on_placed(self, session: AsyncSession, vm: VmRow, node_uuid: str,
                        subnet: str) -> Undo | None:
        """The VM was placed on ``node_uuid`` (sandbox ``subnet``): take its node-scoped
        addresses in the placement's transaction; returns how to undo it. Raises
        InsufficientCapacity when the node cannot take the VM after all."""

    async def allocate_public(self, session: AsyncSession, vm: VmRow,
                              pool: PoolRow) -> list[PublicIpRow]:
        """Public addresses the VM takes at create (none by default)."""
        return []

    async def release(self, session: AsyncSession, vm: VmRow) -> list[str]:
        """Give back everything the VM holds of the network."""
        return await release_all(session, vm.uuid)

    @abstractmethod
    def nic_specs(self, vm: VmRow, nics: Sequence[VmNicRow] = (),
                  hostname: str | None = None) -> list[NicSpec]:
        """The VM's NICs as its node makes them: the primary one first."""

    def forward_kind(self) -> ForwardKind:
        """How a port of the VM is reached from outside; Conflict's message otherwise."""
        raise NotImplementedError
