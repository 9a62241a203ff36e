"""Disk load: the larger of the allocated and the measured share, after placement."""

from __future__ import annotations

from collections.abc import Sequence

from yun.control.scheduler.base import HostWeigher, register_weigher, share_after
from yun.control.scheduler.hoststate import HostState, PoolPolicy, RequestSpec


def disk_load(host: HostState, ratio: float, asked_gb: int) -> float:
    """``max(allocated share, measured share)`` of local disk with ``asked_gb`` more."""
    capacity = host.disk_gb
    allocated = share_after(capacity, ratio, asked_gb)
    total = capacity.total
    measured = (host.disk_used_gb + asked_gb) / total if total > 0 else 1.0
    return allocated if allocated > measured else measured


@register_weigher
class DiskWeigher(HostWeigher):
    """``max(allocated share, measured share)`` of local disk with the request placed.

    With thin provisioning the allocated share overstates what is written and the
    measured one understates what will be; the larger is the safer guide.
    """

    name = "disk"

    def weigh(self, host: HostState, spec: RequestSpec, pool: PoolPolicy) -> float:
        return disk_load(host, pool.disk_ratio, spec.disk_gb)

    def weigh_all(self, hosts: Sequence[HostState], spec: RequestSpec,
                  pool: PoolPolicy) -> list[float]:
        ratio, asked = pool.disk_ratio, spec.disk_gb
        return [disk_load(h, ratio, asked) for h in hosts]
