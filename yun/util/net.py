"""Addresses of this host."""

from __future__ import annotations

import ipaddress
import socket


def outbound_address() -> str | None:
    """This host's IPv4 address towards the outside (the source of its default route),
    or None without one. No packet is sent: connecting a UDP socket only looks up the
    route."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            sock.connect(("192.0.2.1", 9))
            return str(sock.getsockname()[0])
        except OSError:
            return None


def reachable_address(listen_host: str) -> str | None:
    """The address other hosts reach this one on, given the address a service listens
    on: that address itself when it is a specific, non-loopback IPv4 address; else
    (loopback, a wildcard, a name) the source of the default route."""
    try:
        address = ipaddress.IPv4Address(listen_host)
    except ValueError:
        return outbound_address()
    if address.is_loopback or address.is_unspecified:
        return outbound_address()
    return str(address)
