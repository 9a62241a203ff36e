"""vCPUs under the pool's CPU overcommit ratio."""

from __future__ import annotations

from yun.control.scheduler.base import CapacityFilter, register_filter


@register_filter
class VcpuFilter(CapacityFilter):
    """Passes hosts with ``(cores - reserved) * cpu_ratio - allocated >= vcpus asked``."""

    name = "vcpu"
    resource = "vCPU"
    capacity_field = "vcpu"
    ratio_field = "cpu_ratio"
    asked_field = "vcpus"
