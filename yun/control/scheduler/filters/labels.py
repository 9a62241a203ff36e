"""Aggregates: the request's labels (``ssd=true``) must all be on the host, same value."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from yun.control.scheduler.base import HostFilter, register_filter
from yun.control.scheduler.hoststate import HostState, PoolPolicy, RequestSpec


@register_filter
class LabelsFilter(HostFilter):
    """Passes hosts whose labels contain every ``key=value`` the request names."""

    name = "labels"
    reason = "missing labels"
    cost = 3

    def host_passes(self, host: HostState, spec: RequestSpec, pool: PoolPolicy) -> bool:
        labels = host.labels
        return all(labels.get(key) == value for key, value in spec.labels.items())

    def filter_all(self, hosts: Iterable[HostState], spec: RequestSpec,
                   pool: PoolPolicy) -> list[HostState]:
        wanted = tuple(spec.labels.items())
        return [h for h in hosts if all(h.labels.get(k) == v for k, v in wanted)]

    def applies(self, spec: RequestSpec) -> bool:
        return bool(spec.labels)

    def explain(self, eliminated: Sequence[HostState], spec: RequestSpec,
                pool: PoolPolicy) -> str:
        wanted = ", ".join(f"{k}={v}" for k, v in sorted(spec.labels.items()))
        return f"{len(eliminated)} {self.reason} {wanted}"
