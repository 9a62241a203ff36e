"""The built-in host filters, one per module; importing this package registers them all.

Each module holds one :class:`~yun.control.scheduler.base.HostFilter`: ``status`` (up and
not drained), ``vcpu``, ``memory``, ``disk`` (capacity under the pool's overcommit
ratios), ``labels`` (aggregates), ``capabilities``, ``affinity`` and ``anti_affinity``
(VM groups). The pool filter is implicit: the caller passes only the pool's hosts.
"""

from yun.control.scheduler.filters import (
    affinity,
    anti_affinity,
    capabilities,
    disk,
    labels,
    memory,
    status,
    vcpu,
)

__all__ = ["affinity", "anti_affinity", "capabilities", "disk", "labels", "memory",
           "status", "vcpu"]
