"""Memory under the pool's memory overcommit ratio."""

from __future__ import annotations

from yun.control.scheduler.base import CapacityFilter, register_filter


@register_filter
class MemoryFilter(CapacityFilter):
    """Passes hosts with ``(MiB - reserved) * memory_ratio - allocated >= MiB asked``."""

    name = "memory"
    resource = "memory"
    unit = "MiB"
    capacity_field = "memory_mb"
    ratio_field = "memory_ratio"
    asked_field = "memory_mb"
