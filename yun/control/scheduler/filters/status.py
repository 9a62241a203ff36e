"""The node is up and admitted: a down node cannot start a VM, a drained one must not."""

from __future__ import annotations

from collections.abc import Iterable

from yun.control.scheduler.base import HostFilter, register_filter
from yun.control.scheduler.hoststate import HostState, PoolPolicy, RequestSpec


@register_filter
class StatusFilter(HostFilter):
    """Passes hosts whose status is up and whose admin state is active (not drained)."""

    name = "status"
    reason = "down or drained"
    cost = 0

    def host_passes(self, host: HostState, spec: RequestSpec, pool: PoolPolicy) -> bool:
        return host.up and host.active

    def filter_all(self, hosts: Iterable[HostState], spec: RequestSpec,
                   pool: PoolPolicy) -> list[HostState]:
        return [h for h in hosts if h.up and h.active]  # host_passes(), inlined
