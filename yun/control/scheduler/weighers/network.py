"""Network load as the node measures it."""

from __future__ import annotations

from collections.abc import Sequence

from yun.control.scheduler.base import HostWeigher, register_weigher
from yun.control.scheduler.hoststate import HostState, PoolPolicy, RequestSpec


@register_weigher
class NetworkWeigher(HostWeigher):
    """``net_load`` (0..1 of the uplink); a request names no traffic to add to it."""

    name = "network"

    def weigh(self, host: HostState, spec: RequestSpec, pool: PoolPolicy) -> float:
        return host.net_load

    def weigh_all(self, hosts: Sequence[HostState], spec: RequestSpec,
                  pool: PoolPolicy) -> list[float]:
        return [h.net_load for h in hosts]
