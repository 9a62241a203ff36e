"""Capabilities the node reports (live migration, hot-plug, QoS, accel) the request needs."""

from __future__ import annotations

from collections.abc import Sequence

from yun.control.scheduler.base import HostFilter, register_filter
from yun.control.scheduler.hoststate import HostState, PoolPolicy, RequestSpec


@register_filter
class CapabilitiesFilter(HostFilter):
    """Passes hosts having every capability the request names."""

    name = "capabilities"
    reason = "missing capabilities"
    cost = 3

    def host_passes(self, host: HostState, spec: RequestSpec, pool: PoolPolicy) -> bool:
        return spec.capabilities <= host.capabilities

    def applies(self, spec: RequestSpec) -> bool:
        return bool(spec.capabilities)

    def explain(self, eliminated: Sequence[HostState], spec: RequestSpec,
                pool: PoolPolicy) -> str:
        return f"{len(eliminated)} {self.reason} {', '.join(sorted(spec.capabilities))}"
