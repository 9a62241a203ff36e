"""CPU load: the busier of the measured load and the vCPUs already promised."""

from __future__ import annotations

from collections.abc import Sequence

from yun.control.scheduler.base import HostWeigher, register_weigher, share_after
from yun.control.scheduler.hoststate import HostState, PoolPolicy, RequestSpec


def cpu_load(host: HostState, ratio: float, vcpus: int) -> float:
    """``max(measured CPU load, allocated vCPU share with vcpus more)``."""
    allocated = share_after(host.vcpu, ratio, vcpus)
    return allocated if allocated > host.cpu_load else host.cpu_load


@register_weigher
class CpuWeigher(HostWeigher):
    """``max(cpu_load, allocated vCPU share after placement)``.

    The measured load alone would call a node idle whose VMs were just placed and have
    not booted yet (or report every 10 s), and a burst of creates would all land there;
    the allocated share alone would ignore a node whose few VMs are busy.
    """

    name = "cpu"

    def weigh(self, host: HostState, spec: RequestSpec, pool: PoolPolicy) -> float:
        return cpu_load(host, pool.cpu_ratio, spec.vcpus)

    def weigh_all(self, hosts: Sequence[HostState], spec: RequestSpec,
                  pool: PoolPolicy) -> list[float]:
        ratio, vcpus = pool.cpu_ratio, spec.vcpus
        return [cpu_load(h, ratio, vcpus) for h in hosts]
