"""The nftables document of a NAT network: one table, replaced whole, in canonical form."""

from __future__ import annotations

import copy
from typing import Any

from yun.node.network import nft


def _commands(doc: dict[str, Any]) -> list[dict[str, Any]]:
    return list(doc["nftables"])


def _listing(bridge: str, subnet: str) -> dict[str, Any]:
    """What ``nft -j list table`` prints for a table built from our document."""
    items: list[dict[str, Any]] = [{"metainfo": {"version": "1.0.6", "json_schema_version": 1}},
                                   {"table": {"family": "inet", "name": nft.table_name(bridge),
                                              "handle": 7}}]
    handle = 1
    for cmd in _commands(nft.build_ruleset(bridge, subnet))[4:]:
        (kind, obj), = cmd["add"].items()
        items.append({kind: {**obj, "handle": handle}})
        handle += 1
    return {"nftables": items}


def test_table_name_is_per_bridge_and_safe() -> None:
    assert nft.table_name("yunbr0") == "yun_nat_yunbr0"
    assert nft.table_name("br-x.1") == "yun_nat_br_x_1"


def test_document_replaces_the_table_atomically() -> None:
    cmds = _commands(nft.build_ruleset("yunbr0", "10.77.0.0/24"))
    table = {"family": "inet", "name": "yun_nat_yunbr0"}
    assert cmds[0] == {"metainfo": {"json_schema_version": 1}}
    # add (so that delete cannot fail), delete, add: one batch, one transaction.
    assert cmds[1:4] == [{"add": {"table": table}}, {"delete": {"table": table}},
                         {"add": {"table": table}}]
    # Everything else only adds into that same table.
    for cmd in cmds[4:]:
        (kind, obj), = cmd["add"].items()
        assert kind in ("chain", "rule")
        assert obj["family"] == "inet"
        assert obj["table"] == "yun_nat_yunbr0"


def test_chains_are_nat_postrouting_and_filter_forward() -> None:
    chains = {c["add"]["chain"]["name"]: c["add"]["chain"]
              for c in _commands(nft.build_ruleset("yunbr0", "10.77.0.0/24"))
              if "chain" in c.get("add", {})}
    assert chains["postrouting"]["type"] == "nat"
    assert chains["postrouting"]["hook"] == "postrouting"
    assert chains["postrouting"]["prio"] == 100  # srcnat
    assert chains["forward"]["type"] == "filter"
    assert chains["forward"]["hook"] == "forward"


def test_masquerade_rule_for_the_subnet_leaving_by_another_interface() -> None:
    rules = nft.nat_rules("yunbr0", "10.77.0.0/24")
    post = [expr for chain, expr in rules if chain == "postrouting"]
    assert post == [[
        {"match": {"op": "==", "left": {"payload": {"protocol": "ip", "field": "saddr"}},
                   "right": {"prefix": {"addr": "10.77.0.0", "len": 24}}}},
        {"match": {"op": "!=", "left": {"meta": {"key": "oifname"}}, "right": "yunbr0"}},
        {"masquerade": None},
    ]]


def test_forward_allows_out_and_answers_back_and_drops_the_rest_inbound() -> None:
    fwd = [expr for chain, expr in nft.nat_rules("yunbr0", "10.0.0.0/16") if chain == "forward"]
    verdicts = [next(iter(expr[-1])) for expr in fwd]
    assert verdicts == ["drop", "accept", "accept", "accept", "drop"]
    # 1: spoofed source from a VM
    assert fwd[0][1]["match"]["op"] == "!="
    assert fwd[0][1]["match"]["right"] == {"prefix": {"addr": "10.0.0.0", "len": 16}}
    # 2: anything from the bridge goes out
    assert fwd[1][0]["match"]["left"] == {"meta": {"key": "iifname"}}
    # 3: answers come back
    assert fwd[2][1]["match"]["right"] == ["established", "related"]
    # 4: port forwards set up by someone else's DNAT
    assert fwd[3][1]["match"]["right"] == "dnat"
    # 5: nothing else enters
    assert fwd[4][0]["match"]["left"] == {"meta": {"key": "oifname"}}


def test_listing_of_the_wanted_table_matches() -> None:
    assert nft.table_matches(_listing("yunbr0", "10.77.0.0/24"), "yunbr0", "10.77.0.0/24")


def test_listing_with_drift_does_not_match() -> None:
    good = _listing("yunbr0", "10.77.0.0/24")
    # Another subnet
    assert not nft.table_matches(good, "yunbr0", "10.78.0.0/24")
    # A rule removed by hand
    missing = copy.deepcopy(good)
    missing["nftables"] = [i for i in missing["nftables"]
                           if not ("rule" in i and i["rule"]["chain"] == "postrouting")]
    assert not nft.table_matches(missing, "yunbr0", "10.77.0.0/24")
    # A chain policy changed
    policy = copy.deepcopy(good)
    for item in policy["nftables"]:
        if "chain" in item and item["chain"]["name"] == "forward":
            item["chain"]["policy"] = "drop"
    assert not nft.table_matches(policy, "yunbr0", "10.77.0.0/24")
    # An empty table
    assert not nft.table_matches({"nftables": good["nftables"][:2]}, "yunbr0", "10.77.0.0/24")


def test_delete_document_cannot_fail_on_a_missing_table() -> None:
    cmds = _commands(nft.delete_document("yunbr0"))
    table = {"family": "inet", "name": "yun_nat_yunbr0"}
    assert cmds[1:] == [{"add": {"table": table}}, {"delete": {"table": table}}]
