"""Anti-affinity groups: no two members on one node."""

from __future__ import annotations

from yun.control.scheduler.base import GroupFilter, register_filter
from yun.control.scheduler.hoststate import HostState, PoolPolicy, RequestSpec


@register_filter
class AntiAffinityFilter(GroupFilter):
    """Passes only nodes holding no member of the request's anti-affinity group.

    A no-op without a group and for an affinity group.
    """

    name = "anti_affinity"
    reason = "excluded by anti-affinity group"
    cost = 1

    def host_passes(self, host: HostState, spec: RequestSpec, pool: PoolPolicy) -> bool:
        group = spec.group
        if group is None or group.policy != "anti-affinity":
            return True
        return host.uuid not in group.node_uuids

    def applies(self, spec: RequestSpec) -> bool:
        group = spec.group
        return group is not None and group.policy == "anti-affinity" and bool(group.node_uuids)
