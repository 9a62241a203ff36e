"""Network modes of pools on the control side: one :class:`NetworkMode` per mode."""

from __future__ import annotations

from sqlalchemy.ext.asyncio import AsyncSession

from yun.control.db.models import PoolRow, VmRow
from yun.control.network.modes.base import NetworkMode, Undo, release_all, release_node_scoped
from yun.control.network.modes.direct import DIRECT
from yun.control.network.modes.sandbox import MODES as _SANDBOX
from yun.control.network.modes.sandbox import PRIVATE
from yun.proto.errors import Unprocessable
from yun.proto.resources import NetworkMode as PoolNetworkMode

_REGISTRY: dict[str, NetworkMode] = {PoolNetworkMode.DIRECT.value: DIRECT,
                                     **{k.value: v for k, v in _SANDBOX.items()}}
#: the mode of VMs without a pool (the all-in-one default is sandbox-private)
DEFAULT = PRIVATE

__all__ = ["DEFAULT", "NetworkMode", "mode_for", "on_placed", "pool_mode", "release_all",
           "release_node_scoped"]


def mode_for(network_mode: str | None) -> NetworkMode:
    """The network mode a pool's ``network_mode`` names (the default when None)."""
    if network_mode is None:
        return DEFAULT
    mode = _REGISTRY.get(str(network_mode))
    if mode is None:
        raise Unprocessable(f"unknown network mode {network_mode!r}; one of "
                            f"{', '.join(sorted(_REGISTRY))}")
    return mode


async def pool_mode(session: AsyncSession, pool_uuid: str | None) -> NetworkMode:
    """The network mode of the pool ``pool_uuid`` (the default without one)."""
    pool = await session.get(PoolRow, pool_uuid) if pool_uuid else None
    return mode_for(pool.network_mode if pool is not None else None)


async def on_placed(session: AsyncSession, vm: VmRow, node_uuid: str, pool_uuid: str,
                    subnet: str) -> Undo | None:
    """The placement's hook: the mode of the pool the VM is placed in takes the VM's
    node-scoped addresses on the node, in the placement's transaction."""
    return await (await pool_mode(session, pool_uuid)).on_placed(session, vm, node_uuid,
                                                                 subnet)
