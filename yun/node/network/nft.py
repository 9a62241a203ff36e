"""nftables rules of the node's sandbox network, through nft's JSON API.

One table, ``inet yun_sandbox``, holds every rule of the sandbox network. Its skeleton
(counters, sets, chains and rules) depends only on the node's :class:`SandboxSettings`
and is replaced whole in one transaction (``add table`` so that the delete cannot fail,
``delete table``, then everything with every element): the kernel applies the batch
atomically, so there is never a moment with half the rules. A port or a node forward
changes only elements of the sets, a node forward only the rules of the regular chain
``node_ports`` (one transaction each; a map with concatenated address . port data
crashes nft 1.0.6's JSON parser), so the named
counters keep counting.

Layout (``ys*`` is every sandbox tap; all base chains have policy accept, so traffic
that touches no tap is none of this table's business)::

    counters  ipv6 rogue_dhcp spoofed to_host vm_to_vm blocked private_out to_vm
    set  allowed       ifname . ipv4_addr   (tap, address it may send from)
    set  exposed_taps  ifname               taps of mono/share VMs (may send out)
    set  exposed_ips   ipv4_addr            addresses of mono/share VMs (routers DNAT in)
    set  blocked       ipv4_addr interval   settings.blocked + the node's own addresses
    chain node_ports (regular)   one rule per node forward:
        meta l4proto tcp th dport 40001 dnat ip to 10.64.0.5:80

    chain guard (filter, prerouting, priority raw -300)
        iifname "ys*" meta nfproto ipv6 counter ipv6 drop
        iifname "ys*" udp sport 67 counter rogue_dhcp drop        # a VM's DHCP server
        iifname "ys*" ip saddr 0.0.0.0 udp dport 67 accept       # DHCPDISCOVER
        iifname "ys*" iifname . ip saddr != @allowed counter spoofed drop
    chain ports_in (nat, prerouting, dstnat -100)                 # F-SB-PRIVATE
        meta nfproto ipv4 iifname != "ys*" fib daddr type local
            jump node_ports
    chain ports_out (nat, output, -100)                           # the host itself
        meta nfproto ipv4 ip daddr != 127.0.0.0/8 fib daddr type local
            jump node_ports
    chain input (filter, input, 0)
        iifname "ys*" ct state established,related accept        # answers to the host
        iifname "ys*" udp dport 67 accept                         # DHCP
        iifname "ys*" ip daddr GATEWAY udp dport 53 accept        # DNS
        iifname "ys*" ip daddr GATEWAY tcp dport 53 accept
        iifname "ys*" counter to_host drop                        # agent port, sshd...
    chain forward (filter, forward, 0)
        iifname "ys*" oifname "ys*" counter vm_to_vm drop
        iifname "ys*" ct state established,related accept
        oifname "ys*" ct state established,related accept
        oifname "ys*" ct status dnat accept                       # node ports
        iifname "ys*" ip daddr @blocked counter blocked drop
        iifname @exposed_taps accept                              # mono/share out
        iifname "ys*" counter private_out drop
        oifname "ys*" ip daddr @exposed_ips accept                # routers' DNAT in
        oifname "ys*" counter to_vm drop
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from yun.util.run import CommandError, run

FAMILY = "inet"
TABLE = "yun_sandbox"
NFT = "nft"
TAPS = "ys*"
_TIMEOUT = 30.0
COUNTERS = ("ipv6", "rogue_dhcp", "spoofed", "to_host", "vm_to_vm", "blocked",
            "private_out", "to_vm")

Json = dict[str, Any]


@dataclass(frozen=True)
class PortElements:
    """What one port puts in the table's sets."""

    tap: str
    ips: tuple[str, ...]
    exposed: bool


@dataclass(frozen=True)
class ForwardElement:
    """One entry of the node_ports map: ``protocol/node_port -> vm_ip:vm_port``."""

    protocol: str
    node_port: int
    vm_ip: str
    vm_port: int


@dataclass
class Skeleton:
    """What the table's skeleton depends on."""

    gateway: str
    blocked: list[str] = field(default_factory=list)

    def fingerprint(self) -> str:
        text = json.dumps(skeleton_commands(self), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


# --------------------------------------------------------------------------- building


def _match(op: str, left: Any, right: Any) -> Json:
    return {"match": {"op": op, "left": left, "right": right}}


def _meta(key: str) -> Json:
    return {"meta": {"key": key}}


def _payload(protocol: str, name: str) -> Json:
    return {"payload": {"protocol": protocol, "field": name}}


def _ct(key: str) -> Json:
    return {"ct": {"key": key}}


def _iif_taps() -> Json:
    return _match("==", _meta("iifname"), TAPS)


def _oif_taps() -> Json:
    return _match("==", _meta("oifname"), TAPS)


def _counted_drop(name: str) -> list[Json]:
    return [{"counter": name}, {"drop": None}]


def merge_networks(nets: Iterable[str]) -> list[ipaddress.IPv4Network]:
    """The networks collapsed (an interval set refuses overlapping elements)."""
    return list(ipaddress.collapse_addresses(
        ipaddress.IPv4Network(n, strict=False) for n in nets))


def _prefix(net: ipaddress.IPv4Network) -> Any:
    if net.prefixlen == 32:
        return str(net.network_address)
    return {"prefix": {"addr": str(net.network_address), "len": net.prefixlen}}


def _jump_ports() -> Json:
    return {"jump": {"target": "node_ports"}}


def chains() -> dict[str, Json]:
    """The base chains of the table, by name."""
    def chain(name: str, type_: str, hook: str, prio: int) -> Json:
        return {"family": FAMILY, "table": TABLE, "name": name, "type": type_, "hook": hook,
                "prio": prio, "policy": "accept"}
    return {
        "guard": chain("guard", "filter", "prerouting", -300),
        "ports_in": chain("ports_in", "nat", "prerouting", -100),
        "ports_out": chain("ports_out", "nat", "output", -100),
        "input": chain("input", "filter", "input", 0),
        "forward": chain("forward", "filter", "forward", 0),
    }


def rules(gateway: str) -> list[tuple[str, list[Json]]]:
    """``(chain, expressions)`` of every rule, in order."""
    iif, oif = _iif_taps(), _oif_taps()
    udp_sport = _payload("udp", "sport")
    udp_dport = _payload("udp", "dport")
    local = _match("==", {"fib": {"result": "type", "flags": ["daddr"]}}, "local")
    v4 = _match("==", _meta("nfproto"), "ipv4")
    established = _match("in", _ct("state"), ["established", "related"])
    gw = _match("==", _payload("ip", "daddr"), gateway)
    return [
        ("guard", [iif, _match("==", _meta("nfproto"), "ipv6"), *_counted_drop("ipv6")]),
        ("guard", [iif, _match("==", udp_sport, 67), *_counted_drop("rogue_dhcp")]),
        ("guard", [iif, _match("==", _payload("ip", "saddr"), "0.0.0.0"),
                   _match("==", udp_dport, 67), {"accept": None}]),
        ("guard", [iif, _match("!=", {"concat": [_meta("iifname"), _payload("ip", "saddr")]},
                               "@allowed"), *_counted_drop("spoofed")]),
        ("ports_in", [v4, _match("!=", _meta("iifname"), TAPS), local, _jump_ports()]),
        ("ports_out", [v4, _match("!=", _payload("ip", "daddr"),
                                  {"prefix": {"addr": "127.0.0.0", "len": 8}}),
                       local, _jump_ports()]),
        ("input", [iif, established, {"accept": None}]),
        ("input", [iif, _match("==", udp_dport, 67), {"accept": None}]),
        ("input", [iif, gw, _match("==", udp_dport, 53), {"accept": None}]),
        ("input", [iif, gw, _match("==", _payload("tcp", "dport"), 53), {"accept": None}]),
        ("input", [iif, *_counted_drop("to_host")]),
        ("forward", [iif, oif, *_counted_drop("vm_to_vm")]),
        ("forward", [iif, established, {"accept": None}]),
        ("forward", [oif, established, {"accept": None}]),
        ("forward", [oif, _match("in", _ct("status"), "dnat"), {"accept": None}]),
        ("forward", [iif, _match("==", _payload("ip", "daddr"), "@blocked"),
                     *_counted_drop("blocked")]),
        ("forward", [_match("==", _meta("iifname"), "@exposed_taps"), {"accept": None}]),
        ("forward", [iif, *_counted_drop("private_out")]),
        ("forward", [oif, _match("==", _payload("ip", "daddr"), "@exposed_ips"),
                     {"accept": None}]),
        ("forward", [oif, *_counted_drop("to_vm")]),
    ]


def _sets(blocked: list[str]) -> list[Json]:
    base = {"family": FAMILY, "table": TABLE}
    blocked_set: Json = {**base, "name": "blocked", "type": "ipv4_addr",
                         "flags": ["interval"]}
    merged = merge_networks(blocked)
    if merged:
        blocked_set["elem"] = [_prefix(n) for n in merged]
    return [
        {"set": {**base, "name": "allowed", "type": ["ifname", "ipv4_addr"]}},
        {"set": {**base, "name": "exposed_taps", "type": "ifname"}},
        {"set": {**base, "name": "exposed_ips", "type": "ipv4_addr"}},
        {"set": blocked_set},
    ]


def skeleton_commands(sk: Skeleton) -> list[Json]:
    """The ``add`` commands of the table's skeleton (no port or forward element)."""
    table = {"family": FAMILY, "name": TABLE}
    cmds: list[Json] = [{"add": {"table": dict(table)}}]
    for name in COUNTERS:
        cmds.append({"add": {"counter": {"family": FAMILY, "table": TABLE, "name": name}}})
    cmds += [{"add": s} for s in _sets(sk.blocked)]
    cmds += [{"add": {"chain": dict(c)}} for c in chains().values()]
    cmds.append({"add": {"chain": {"family": FAMILY, "table": TABLE, "name": "node_ports"}}})
    for chain_name, expr in rules(sk.gateway):
        cmds.append({"add": {"rule": {"family": FAMILY, "table": TABLE,
                                      "chain": chain_name, "expr": expr}}})
    return cmds


def _port_elements(port: PortElements) -> list[tuple[str, list[Any]]]:
    out: list[tuple[str, list[Any]]] = [
        ("allowed", [{"concat": [port.tap, ip]} for ip in port.ips])]
    if port.exposed:
        out.append(("exposed_taps", [port.tap]))
        out.append(("exposed_ips", list(port.ips)))
    return out


def forward_rule(f: ForwardElement) -> Json:
    """The rule of the node_ports chain that makes one node forward."""
    return {"add": {"rule": {"family": FAMILY, "table": TABLE, "chain": "node_ports", "expr": [
        _match("==", _meta("l4proto"), f.protocol),
        _match("==", _payload("th", "dport"), f.node_port),
        {"dnat": {"family": "ip", "addr": f.vm_ip, "port": f.vm_port}}]}}}


def _element(verb: str, set_name: str, elems: list[Any]) -> Json:
    return {verb: {"element": {"family": FAMILY, "table": TABLE, "name": set_name,
                               "elem": elems}}}


def element_commands(verb: str, ports: Iterable[PortElements] = ()) -> list[Json]:
    """``add`` or ``delete`` commands of the set elements of ``ports``."""
    cmds: list[Json] = []
    for port in ports:
        for set_name, elems in _port_elements(port):
            if elems:
                cmds.append(_element(verb, set_name, elems))
    return cmds


def replace_elements(old_ports: Iterable[PortElements],
                     new_ports: Iterable[PortElements]) -> Json:
    """One transaction that takes the old elements out and puts the new ones in.

    Each old element is first added (a no-op when present) so that its delete cannot
    fail when an earlier, interrupted call already removed it."""
    old_p = list(old_ports)
    cmds = [{"metainfo": {"json_schema_version": 1}},
            *element_commands("add", old_p),
            *element_commands("delete", old_p),
            *element_commands("add", new_ports)]
    return {"nftables": cmds}


def replace_forwards(forwards: Iterable[ForwardElement]) -> Json:
    """One transaction that rewrites the node_ports chain with every node forward
    (flushing a chain leaves the counters and sets alone)."""
    return {"nftables": [
        {"metainfo": {"json_schema_version": 1}},
        {"flush": {"chain": {"family": FAMILY, "table": TABLE, "name": "node_ports"}}},
        *[forward_rule(f) for f in forwards]]}


def build_ruleset(sk: Skeleton, ports: Iterable[PortElements] = (),
                  forwards: Iterable[ForwardElement] = ()) -> Json:
    """The one-transaction document that replaces the table whole, elements included."""
    table = {"family": FAMILY, "name": TABLE}
    cmds: list[Json] = [
        {"metainfo": {"json_schema_version": 1}},
        # "add" of an existing table is a no-op: it makes the following delete safe.
        {"add": {"table": dict(table)}},
        {"delete": {"table": dict(table)}},
        *skeleton_commands(sk),
        *element_commands("add", ports),
        *[forward_rule(f) for f in forwards],
    ]
    return {"nftables": cmds}


def delete_document() -> Json:
    """A document that removes the table; no error when it is absent."""
    table = {"family": FAMILY, "name": TABLE}
    return {"nftables": [
        {"metainfo": {"json_schema_version": 1}},
        {"add": {"table": dict(table)}},
        {"delete": {"table": dict(table)}},
    ]}


# --------------------------------------------------------------------------- applying


def apply(document: Json) -> None:
    """Hand ``document`` to ``nft -j -f -``: all of it is applied, or none."""
    run([NFT, "-j", "-f", "-"], input=json.dumps(document), timeout=_TIMEOUT)


def list_table() -> Json | None:
    """The live table as nft lists it, or None when there is none."""
    try:
        res = run([NFT, "-j", "list", "table", FAMILY, TABLE], timeout=_TIMEOUT)
    except CommandError as exc:
        if "No such file or directory" in exc.stderr:
            return None
        raise
    listing: Json = json.loads(res.stdout)
    return listing


def shape_of(listing: Json) -> tuple[set[str], int]:
    """The chain names and the number of rules of a listing (a cheap drift check)."""
    names = {i["chain"]["name"] for i in listing.get("nftables", []) if "chain" in i}
    count = sum(1 for i in listing.get("nftables", []) if "rule" in i)
    return names, count


def counters() -> dict[str, int]:
    """Packets counted by each named counter of the live table (empty: no table)."""
    listing = list_table()
    out: dict[str, int] = {}
    for item in (listing or {}).get("nftables", []):
        if "counter" in item:
            out[item["counter"]["name"]] = int(item["counter"].get("packets", 0))
    return out


def delete_table() -> None:
    """Remove the table; no error when it is absent."""
    apply(delete_document())
