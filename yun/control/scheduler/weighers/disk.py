"""Disk load: the larger of the allocated and the measured share, after placement."""

from __future__ import annotations

from collections.abc import Sequence

from yun.control.scheduler.base import HostWeigher, capacity_load, register_weigher
from yun.control.scheduler.hoststate import HostState, PoolPolicy, RequestSpec


def disk_load(host: HostState, ratio: float, asked_gb: int) -> float:
    """``max(allocated share, measured share)`` of local disk with ``asked_gb`` more."""
    return capacity_load(host.disk_gb, host.disk_used_gb, ratio, asked_gb)


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
