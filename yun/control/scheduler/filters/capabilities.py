"""Capabilities the node reports (live migration, hot-plug, QoS, accel) the request needs."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from yun.control.scheduler.base import HostFilter, register_filter
from yun.control.scheduler.hoststate import HostState, PoolPolicy, RequestSpec


@register_filter
class CapabilitiesFilter(HostFilter):
    """Passes hosts having every capability the request names and every one its pool's
    VMs need (a pool with needs always has this filter: see :class:`PoolPolicy`)."""

    name = "capabilities"
    reason = "missing capabilities"
    cost = 3

    def host_passes(self, host: HostState, spec: RequestSpec, pool: PoolPolicy) -> bool:
        return spec.capabilities | pool.needs <= host.capabilities

    def filter_all(self, hosts: Iterable[HostState], spec: RequestSpec,
                   pool: PoolPolicy) -> list[HostState]:
        needed = spec.capabilities | pool.needs
        if not needed:
            return list(hosts)
        return [h for h in hosts if needed <= h.capabilities]

    def explain(self, eliminated: Sequence[HostState], spec: RequestSpec,
                pool: PoolPolicy) -> str:
        return (f"{len(eliminated)} {self.reason} "
                f"{', '.join(sorted(spec.capabilities | pool.needs))}")
