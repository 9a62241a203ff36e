"""nftables rules of the node-local NAT network, through nft's JSON API.

One table per owner (``inet yun_nat_<bridge>``) holds every rule of one NAT network.
It is only ever replaced whole, in one transaction (``add table`` so that the delete
cannot fail, ``delete table``, then the table, its chains and rules): the kernel
applies the batch atomically, so there is never a moment with half the rules.

The document is written in the canonical form ``nft -j list`` prints, so that the live
table can be compared with the wanted one and left alone when they already agree.

Rules, for bridge ``B`` and subnet ``S``::

    chain postrouting (nat, srcnat priority)
        ip saddr S oifname != B masquerade         # VMs reach the outside as the node
    chain forward (filter, filter priority)
        iifname B ip saddr != S drop               # a VM spoofing a foreign source
        iifname B accept                           # VMs may open connections out
        oifname B ct state established,related accept    # ... and get the answers
        oifname B ct status dnat accept            # port forwards (DNAT) set up elsewhere
        oifname B drop                             # nothing else reaches the VMs

Accepting here does not override a drop in another table on the same hook: each table
answers only for its own traffic, which is what "one table per owner" means.
"""

from __future__ import annotations

import ipaddress
import json
import re
from typing import Any

from yun.util.run import CommandError, run

FAMILY = "inet"
NFT = "nft"
_TIMEOUT = 30.0

Json = dict[str, Any]


def table_name(bridge: str) -> str:
    """The table owned by the NAT network of ``bridge``: ``yun_nat_<bridge>``."""
    return "yun_nat_" + re.sub(r"[^A-Za-z0-9_]", "_", bridge)


# --------------------------------------------------------------------------- building


def _match(op: str, left: Json, right: Any) -> Json:
    return {"match": {"op": op, "left": left, "right": right}}


def _meta(key: str) -> Json:
    return {"meta": {"key": key}}


def _saddr() -> Json:
    return {"payload": {"protocol": "ip", "field": "saddr"}}


def _prefix(net: ipaddress.IPv4Network) -> Json:
    return {"prefix": {"addr": str(net.network_address), "len": net.prefixlen}}


def _ct(key: str) -> Json:
    return {"ct": {"key": key}}


def nat_chains(bridge: str) -> dict[str, Json]:
    """The base chains of the table, by name, as nft lists them."""
    table = table_name(bridge)
    return {
        "postrouting": {"family": FAMILY, "table": table, "name": "postrouting",
                        "type": "nat", "hook": "postrouting", "prio": 100, "policy": "accept"},
        "forward": {"family": FAMILY, "table": table, "name": "forward",
                    "type": "filter", "hook": "forward", "prio": 0, "policy": "accept"},
    }


def nat_rules(bridge: str, subnet: str) -> list[tuple[str, list[Json]]]:
    """``(chain, expressions)`` of every rule, in order."""
    net = ipaddress.IPv4Network(subnet)
    iif = _match("==", _meta("iifname"), bridge)
    oif = _match("==", _meta("oifname"), bridge)
    return [
        ("postrouting", [_match("==", _saddr(), _prefix(net)),
                         _match("!=", _meta("oifname"), bridge),
                         {"masquerade": None}]),
        ("forward", [iif, _match("!=", _saddr(), _prefix(net)), {"drop": None}]),
        ("forward", [iif, {"accept": None}]),
        ("forward", [oif, _match("in", _ct("state"), ["established", "related"]),
                     {"accept": None}]),
        ("forward", [oif, _match("in", _ct("status"), "dnat"), {"accept": None}]),
        ("forward", [oif, {"drop": None}]),
    ]


def build_ruleset(bridge: str, subnet: str) -> Json:
    """The one-transaction document that replaces the table of ``bridge`` whole."""
    table = {"family": FAMILY, "name": table_name(bridge)}
    cmds: list[Json] = [
        {"metainfo": {"json_schema_version": 1}},
        # "add" of an existing table is a no-op: it makes the following delete safe.
        {"add": {"table": dict(table)}},
        {"delete": {"table": dict(table)}},
        {"add": {"table": dict(table)}},
    ]
    for chain in nat_chains(bridge).values():
        cmds.append({"add": {"chain": dict(chain)}})
    for chain_name, expr in nat_rules(bridge, subnet):
        cmds.append({"add": {"rule": {"family": FAMILY, "table": table["name"],
                                      "chain": chain_name, "expr": expr}}})
    return {"nftables": cmds}


def delete_document(bridge: str) -> Json:
    """A document that removes the table of ``bridge``; no error when it is absent."""
    table = {"family": FAMILY, "name": table_name(bridge)}
    return {"nftables": [
        {"metainfo": {"json_schema_version": 1}},
        {"add": {"table": dict(table)}},
        {"delete": {"table": dict(table)}},
    ]}


# --------------------------------------------------------------------------- comparing


def _strip(obj: Json) -> Json:
    return {k: v for k, v in obj.items() if k != "handle"}


def table_matches(listing: Json, bridge: str, subnet: str) -> bool:
    """True when ``listing`` (``nft -j list table ...``) holds exactly the wanted table."""
    chains: dict[str, Json] = {}
    rules: list[tuple[str, list[Json]]] = []
    for item in listing.get("nftables", []):
        if "chain" in item:
            chain = _strip(item["chain"])
            chains[chain["name"]] = chain
        elif "rule" in item:
            rules.append((item["rule"]["chain"], item["rule"]["expr"]))
    return chains == nat_chains(bridge) and rules == nat_rules(bridge, subnet)


# --------------------------------------------------------------------------- applying


def apply(document: Json) -> None:
    """Hand ``document`` to ``nft -j -f -``: all of it is applied, or none."""
    run([NFT, "-j", "-f", "-"], input=json.dumps(document), timeout=_TIMEOUT)


def list_table(bridge: str) -> Json | None:
    """The live table of ``bridge`` as nft lists it, or None when there is none."""
    try:
        res = run([NFT, "-j", "list", "table", FAMILY, table_name(bridge)], timeout=_TIMEOUT)
    except CommandError as exc:
        if "No such file or directory" in exc.stderr:
            return None
        raise
    listing: Json = json.loads(res.stdout)
    return listing


def ensure_table(bridge: str, subnet: str) -> bool:
    """Make the live table equal to the wanted one; True when it had to be (re)written."""
    listing = list_table(bridge)
    if listing is not None and table_matches(listing, bridge, subnet):
        return False
    apply(build_ruleset(bridge, subnet))
    return True


def delete_table(bridge: str) -> None:
    """Remove the table of ``bridge``; no error when it is absent."""
    apply(delete_document(bridge))
