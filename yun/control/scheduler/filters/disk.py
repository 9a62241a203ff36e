"""Local disk under the pool's disk overcommit ratio (thin provisioning)."""

from __future__ import annotations

from yun.control.scheduler.base import CapacityFilter, register_filter


@register_filter
class DiskFilter(CapacityFilter):
    """Passes hosts with ``(GiB - reserved) * disk_ratio - allocated >= GiB asked``."""

    name = "disk"
    resource = "disk"
    unit = "GiB"
    capacity_field = "disk_gb"
    ratio_field = "disk_ratio"
    asked_field = "disk_gb"
