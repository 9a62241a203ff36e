"""nftables rules of the node's direct network: table ``bridge yun_direct``.

The bridge family sees every frame a direct-mode VM sends, at layer 2, before the bridge
forwards it (prerouting) and when it is delivered to the host (input). Layout (``yd*``
is every direct tap)::

    counters  spoofed rogue_dhcp blocked to_host
    set  allowed  ifname . ether_addr     (tap, the MAC the platform gave its VM)
    set  blocked  ipv4_addr interval      management networks + the node's own addresses

    chain guard (filter, prerouting, priority -300)
        iifname "yd*" iifname . ether saddr != @allowed counter spoofed drop
        iifname "yd*" udp sport { 67, 547 } counter rogue_dhcp drop   # a VM's DHCP server
        iifname "yd*" ip daddr @blocked counter blocked drop
    chain input (filter, input, 0)                 # frames the host itself receives
        iifname "yd*" counter to_host drop

Every chain has policy accept: frames of the LAN or the host are none of its business.
The skeleton (which depends only on the blocked networks) is replaced whole in one
``nft -f`` transaction (``add table`` so that the ``delete`` cannot fail, then the table
with every element); a port only adds or deletes its element, so the named counters
keep counting while VMs come and go.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass

from yun.util.run import CommandError, run

FAMILY = "bridge"
TABLE = "yun_direct"
TAPS = "yd*"
COUNTERS = ("spoofed", "rogue_dhcp", "blocked", "to_host")
_TIMEOUT = 30.0
_TAP_RE = re.compile(r"^yd[0-9a-f]{10}$")
_MAC_RE = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")


@dataclass(frozen=True)
class PortElement:
    """One direct port in the ``allowed`` set: its tap and its VM's MAC."""

    tap: str
    mac: str

    def __post_init__(self) -> None:
        # Both go into nft's text: refuse anything that is not exactly a tap and a MAC.
        if not _TAP_RE.match(self.tap):
            raise ValueError(f"not a direct tap name: {self.tap!r}")
        if not _MAC_RE.match(self.mac):
            raise ValueError(f"not a lower-case MAC address: {self.mac!r}")

    def text(self) -> str:
        return f'"{self.tap}" . {self.mac}'


def blocked_networks(control_blocked: Iterable[str], lan: Iterable[str],
                     extra: Iterable[str], node_addresses: Iterable[str]
                     ) -> list[ipaddress.IPv4Network]:
    """The networks a direct VM may not reach, collapsed.

    ``control_blocked`` (the control server's list, made for sandbox VMs: every private
    range by default) is taken minus the LAN networks the bridge sits in, or a direct VM
    could not reach its own LAN; ``extra`` (``[node] direct_blocked``: the management
    hosts on that LAN) and the node's own addresses are always blocked."""
    lans = [ipaddress.IPv4Network(n, strict=False) for n in lan]
    out: list[ipaddress.IPv4Network] = []
    for text in control_blocked:
        pieces = [ipaddress.IPv4Network(text, strict=False)]
        for lan_net in lans:
            next_pieces: list[ipaddress.IPv4Network] = []
            for piece in pieces:
                if lan_net == piece or piece.subnet_of(lan_net):
                    continue  # wholly inside the LAN: dropped
                if lan_net.subnet_of(piece):
                    next_pieces.extend(piece.address_exclude(lan_net))
                else:
                    next_pieces.append(piece)
            pieces = next_pieces
        out.extend(pieces)
    out.extend(ipaddress.IPv4Network(n, strict=False) for n in extra)
    out.extend(ipaddress.IPv4Network(f"{a}/32") for a in node_addresses)
    return list(ipaddress.collapse_addresses(out))


def skeleton_text(blocked: Iterable[ipaddress.IPv4Network]) -> str:
    """The table without port elements, in nft's own syntax."""
    nets = ", ".join(str(n) for n in blocked)
    counters = "\n".join(f"    counter {name} {{ }}" for name in COUNTERS)
    blocked_elems = f"\n        elements = {{ {nets} }}" if nets else ""
    return f"""table {FAMILY} {TABLE} {{
{counters}
    set allowed {{
        type ifname . ether_addr
    }}
    set blocked {{
        type ipv4_addr
        flags interval{blocked_elems}
    }}
    chain guard {{
        type filter hook prerouting priority -300; policy accept;
        iifname "{TAPS}" iifname . ether saddr != @allowed counter name "spoofed" drop
        iifname "{TAPS}" ether type ip udp sport {{ 67 }} counter name "rogue_dhcp" drop
        iifname "{TAPS}" ether type ip6 udp sport {{ 547 }} counter name "rogue_dhcp" drop
        iifname "{TAPS}" ether type ip ip daddr @blocked counter name "blocked" drop
    }}
    chain input {{
        type filter hook input priority 0; policy accept;
        iifname "{TAPS}" counter name "to_host" drop
    }}
}}
"""


def fingerprint(blocked: Iterable[ipaddress.IPv4Network]) -> str:
    """What the live skeleton must match (kept in a file beside the ports)."""
    return hashlib.sha256(skeleton_text(blocked).encode()).hexdigest()[:16]


def _elements(verb: str, ports: Iterable[PortElement]) -> str:
    elems = ", ".join(p.text() for p in ports)
    if not elems:
        return ""
    return f"{verb} element {FAMILY} {TABLE} allowed {{ {elems} }}\n"


def replace_table(blocked: Iterable[ipaddress.IPv4Network],
                  ports: Iterable[PortElement]) -> str:
    """One transaction that replaces the whole table, elements included."""
    return (f"add table {FAMILY} {TABLE}\ndelete table {FAMILY} {TABLE}\n"
            + skeleton_text(blocked) + _elements("add", ports))


def replace_elements(old: Iterable[PortElement], new: Iterable[PortElement]) -> str:
    """One transaction taking ``old`` out and putting ``new`` in; each old element is
    added first (a no-op when present) so that its delete cannot fail."""
    old = list(old)
    return _elements("add", old) + _elements("delete", old) + _elements("add", new)


def delete_text() -> str:
    """Remove the table; no error when it is absent."""
    return f"add table {FAMILY} {TABLE}\ndelete table {FAMILY} {TABLE}\n"


# --------------------------------------------------------------------------- applying


def apply(text: str) -> None:
    """Hand ``text`` to ``nft -f -``: all of it is applied, or none."""
    if text:
        run(["nft", "-f", "-"], input=text, timeout=_TIMEOUT)


def table_exists() -> bool:
    try:
        run(["nft", "list", "table", FAMILY, TABLE], timeout=_TIMEOUT)
    except CommandError as exc:
        if "No such file or directory" in exc.stderr:
            return False
        raise
    return True


def counters() -> dict[str, int]:
    """Packets counted by each named counter of the live table (empty: no table)."""
    try:
        res = run(["nft", "-j", "list", "counters", "table", FAMILY, TABLE], timeout=_TIMEOUT)
    except CommandError as exc:
        if "No such file or directory" in exc.stderr:
            return {}
        raise
    return {item["counter"]["name"]: int(item["counter"].get("packets", 0))
            for item in json.loads(res.stdout).get("nftables", []) if "counter" in item}
