"""TCP ports for the services and guests tests start."""

from __future__ import annotations

import random
import socket
from pathlib import Path

# Ports handed out for test services come from below the kernel's ephemeral range
# (net.ipv4.ip_local_port_range, 32768-60999 by default): an outgoing connection takes
# its local port from that range, and once took the port of a control server killed by
# a chaos test before it was restarted on it ("Address already in use").
_SERVICE_PORTS = range(20000, 32000)
_handed_out: set[int] = set()


def _ephemeral_range() -> range:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return range(int(low), int(high) + 1)
    except (OSError, ValueError):
        return range(32768, 61000)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on now, outside the ephemeral range and not handed out
    before by this process, kept for a restartable service: a restarted component must
    come back where its clients look for it."""
    ephemeral = _ephemeral_range()
    for _ in range(200):
        port = random.choice(_SERVICE_PORTS)
        if port in _handed_out or port in ephemeral:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind((host, port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    raise RuntimeError(f"no free TCP port on {host} in {_SERVICE_PORTS}")
