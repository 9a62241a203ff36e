"""The node's network load: traffic on its uplink as a fraction of the uplink's capacity.

Read from the kernel's byte counters (``/proc/net/dev``) between two reports, so it
costs one small file read per report and needs no root. The busier direction counts:
a link saturated one way is full for the traffic that needs that way.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger("yun.node.netload")

PROC_NET_DEV = Path("/proc/net/dev")
PROC_NET_ROUTE = Path("/proc/net/route")


def default_route_interface(route_file: Path = PROC_NET_ROUTE) -> str | None:
    """The interface of the IPv4 default route, or None when there is none."""
    try:
        lines = route_file.read_text().splitlines()[1:]
    except OSError:
        return None
    for line in lines:
        fields = line.split()
        # Iface Destination Gateway Flags ...; destination 0.0.0.0 is the default route.
        if len(fields) > 3 and fields[1] == "00000000":
            return fields[0]
    return None


def read_counters(interface: str, dev_file: Path = PROC_NET_DEV) -> tuple[int, int] | None:
    """``(received, transmitted)`` bytes of ``interface`` since boot, None if unknown."""
    try:
        lines = dev_file.read_text().splitlines()[2:]
    except OSError:
        return None
    for line in lines:
        name, sep, rest = line.partition(":")
        if not sep or name.strip() != interface:
            continue
        fields = rest.split()
        # receive: bytes packets errs drop fifo frame compressed multicast; transmit: bytes ...
        if len(fields) < 9:
            return None
        return int(fields[0]), int(fields[8])
    return None


class UplinkMeter:
    """Busy fraction (0..1) of one interface since the previous :meth:`sample`."""

    def __init__(self, interface: str | None, capacity_mbit: int, *,
                 dev_file: Path = PROC_NET_DEV, route_file: Path = PROC_NET_ROUTE,
                 clock: Callable[[], float] = time.monotonic) -> None:
        """``interface`` None: the default route's interface, looked up at each sample
        (it may appear after the agent starts). ``capacity_mbit`` 0: always 0."""
        self.interface = interface
        self.capacity_mbit = capacity_mbit
        self.dev_file = dev_file
        self.route_file = route_file
        self.clock = clock
        self._previous: tuple[str, float, int, int] | None = None
        self._warned: str | None = None

    def sample(self) -> float:
        """The load since the previous call; 0.0 the first time, or when it cannot tell."""
        if self.capacity_mbit <= 0:
            return 0.0
        interface = self.interface or default_route_interface(self.route_file)
        counters = read_counters(interface, self.dev_file) if interface else None
        if interface is None or counters is None:
            if self._warned != (interface or ""):
                self._warned = interface or ""
                log.warning("network load not measured: %s", (
                    f"no interface {interface} in {self.dev_file}" if interface else
                    "no default route and no uplink configured"),
                    extra={"interface": interface})
            self._previous = None
            return 0.0
        now = self.clock()
        previous, self._previous = self._previous, (interface, now, *counters)
        if previous is None or previous[0] != interface or now <= previous[1]:
            return 0.0
        received, sent = counters[0] - previous[2], counters[1] - previous[3]
        if received < 0 or sent < 0:  # counters reset (interface recreated)
            return 0.0
        bits_per_second = max(received, sent) * 8 / (now - previous[1])
        return round(min(1.0, bits_per_second / (self.capacity_mbit * 1_000_000)), 3)
