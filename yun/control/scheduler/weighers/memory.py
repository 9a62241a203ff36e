"""Memory load: the larger of the allocated and the measured share, after placement."""

from __future__ import annotations

from collections.abc import Sequence

from yun.control.scheduler.base import HostWeigher, capacity_load, register_weigher
from yun.control.scheduler.hoststate import HostState, PoolPolicy, RequestSpec


def memory_load(host: HostState, ratio: float, asked_mb: int) -> float:
    """``max(allocated share, measured share)`` of memory with ``asked_mb`` more."""
    return capacity_load(host.memory_mb, host.memory_used_mb, ratio, asked_mb)


@register_weigher
class MemoryWeigher(HostWeigher):
    """``max(allocated share, measured share)`` of memory with the request placed.

    The allocated share is against the usable memory (after the host's reserve and the
    pool's ratio); the measured share against the host's total, as the node reports it.
    """

    name = "memory"

    def weigh(self, host: HostState, spec: RequestSpec, pool: PoolPolicy) -> float:
        return memory_load(host, pool.memory_ratio, spec.memory_mb)

    def weigh_all(self, hosts: Sequence[HostState], spec: RequestSpec,
                  pool: PoolPolicy) -> list[float]:
        ratio, asked = pool.memory_ratio, spec.memory_mb
        return [memory_load(h, ratio, asked) for h in hosts]
