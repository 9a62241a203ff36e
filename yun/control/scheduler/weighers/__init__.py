"""The built-in host weighers, one per module; importing this package registers them all.

Each returns the load a host would have with the request on it (lower is better):
``cpu``, ``memory``, ``disk`` and ``network``, the seed's real-time weighted load split
into parts whose weights a pool sets.
"""

from yun.control.scheduler.weighers import cpu, disk, memory, network

__all__ = ["cpu", "disk", "memory", "network"]
