"""Affinity groups: every member on the node the first one went to."""

from __future__ import annotations

from yun.control.scheduler.base import GroupFilter, register_filter
from yun.control.scheduler.hoststate import HostState, PoolPolicy, RequestSpec


@register_filter
class AffinityFilter(GroupFilter):
    """Passes only nodes already holding a member of the request's affinity group.

    A no-op without a group, for an anti-affinity group, and for the group's first
    member (no node holds one yet, so any node will do and the weighers choose).
    """

    name = "affinity"
    reason = "excluded by affinity group"
    cost = 1

    def host_passes(self, host: HostState, spec: RequestSpec, pool: PoolPolicy) -> bool:
        group = spec.group
        if group is None or group.policy != "affinity" or not group.node_uuids:
            return True
        return host.uuid in group.node_uuids

    def applies(self, spec: RequestSpec) -> bool:
        group = spec.group
        return group is not None and group.policy == "affinity" and bool(group.node_uuids)
