"""TCP ports for the services and guests tests start."""

from __future__ import annotations

import os
import random
import socket
from pathlib import Path

# Ports handed out for test services come from below the kernel's ephemeral range
# (net.ipv4.ip_local_port_range, 32768-60999 by default): an outgoing connection takes
# its local port from that range, and once took the port of a control server killed by
# a chaos test before it was restarted on it ("Address already in use").
_SERVICE_PORTS = range(20000, 32000)
#: Test runs at the same time (scripts/test.sh runs two streams) each take their own
#: part of the range, "FIRST-LAST": a port one run handed out and has not bound yet, or
#: whose service a chaos test killed, is then never handed out by the other.
PORT_RANGE_VARIABLE = "YUN_TEST_PORT_RANGE"
_handed_out: set[int] = set()


def service_ports() -> range:
    """The ports this run hands out: :data:`PORT_RANGE_VARIABLE` if set, else all."""
    text = os.environ.get(PORT_RANGE_VARIABLE, "").strip()
    if not text:
        return _SERVICE_PORTS
    try:
        first, last = (int(part) for part in text.split("-"))
    except ValueError:
        raise ValueError(f"{PORT_RANGE_VARIABLE}={text!r}: expected FIRST-LAST") from None
    if not 1024 <= first <= last <= 65535:
        raise ValueError(f"{PORT_RANGE_VARIABLE}={text!r}: expected 1024 <= FIRST <= LAST"
                         " <= 65535")
    return range(first, last + 1)


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
    ports = service_ports()
    for _ in range(200):
        port = random.choice(ports)
        if port in _handed_out or port in ephemeral:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind((host, port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    raise RuntimeError(f"no free TCP port on {host} in {ports}")
