"""The router's incremental path: which elements change between two rule sets, the
document applying them, and the pulled rule set validated only where it changed."""

from __future__ import annotations

import json
import random

import pytest
from pydantic import ValidationError

from yun.proto.network import MonoMapping, NodeRoute, PortMapping, RouterRuleSet
from yun.router.decode import RuleSetDecoder
from yun.router.libnft import Libnftables, LibnftablesError
from yun.router.nft import (
    MARK_IN,
    MARK_OUT,
    ElementCounts,
    NftTable,
    changes_document,
    diff_document,
    element_changes,
    elements,
    mappings,
    table_document,
)

OLD = RouterRuleSet(
    generation=1,
    mono=[MonoMapping(public_ip="203.0.113.10", vm_ip="10.64.0.10", vm_uuid="a"),
          MonoMapping(public_ip="203.0.113.11", vm_ip="10.64.0.11", vm_uuid="b")],
    ports=[PortMapping(public_ip="203.0.113.20", public_port=10080, vm_ip="10.64.0.12",
                       vm_port=80, vm_uuid="c"),
           PortMapping(public_ip="203.0.113.20", public_port=10081, vm_ip="10.64.0.13",
                       vm_port=80, vm_uuid="d")])


def test_moving_a_mono_address_changes_its_two_map_entries_and_the_vm_set() -> None:
    new = OLD.model_copy(update={"generation": 2, "mono": [
        OLD.mono[0], MonoMapping(public_ip="203.0.113.11", vm_ip="10.64.0.99", vm_uuid="e")]})
    got = element_changes(elements(OLD), elements(new))
    assert got == {
        "vm_addrs": ({("10.64.0.11",)}, {("10.64.0.99",)}),
        "mono_dnat": ({("203.0.113.11", "10.64.0.11")}, {("203.0.113.11", "10.64.0.99")}),
        "mono_snat": ({("10.64.0.11", "203.0.113.11")}, {("10.64.0.99", "203.0.113.11")}),
    }  # the public address stays: public_addrs is untouched


def test_a_public_address_shared_by_ports_stays_until_its_last_port_goes() -> None:
    one_gone = OLD.model_copy(update={"ports": OLD.ports[:1]})
    got = element_changes(elements(OLD), elements(one_gone))
    assert "public_addrs" not in got  # 203.0.113.20 still carries port 10080
    assert got["vm_addrs"] == ({("10.64.0.13",)}, set())
    assert got["share_tcp_daddr"] == ({("203.0.113.20", 10081, "10.64.0.13")}, set())
    all_gone = OLD.model_copy(update={"ports": []})
    assert element_changes(elements(OLD), elements(all_gone))["public_addrs"] == (
        {("203.0.113.20",)}, set())


def test_no_change_gives_no_document_and_deletions_come_first() -> None:
    assert element_changes(elements(OLD), elements(OLD)) == {}
    assert changes_document({}) is None
    assert diff_document(OLD, OLD.model_copy(update={"generation": 9})) is None
    new = OLD.model_copy(update={"mono": [
        MonoMapping(public_ip="203.0.113.10", vm_ip="10.64.0.50", vm_uuid="a"), OLD.mono[1]]})
    doc = changes_document(element_changes(elements(OLD), elements(new)))
    assert doc is not None
    verbs = [next(iter(cmd)) for cmd in doc["nftables"]]
    assert verbs == sorted(verbs, key=lambda v: v != "delete") and "add" in verbs
    dnat = [cmd for cmd in doc["nftables"]
            if next(iter(cmd.values()))["element"]["name"] == "mono_dnat"]
    assert dnat == [
        {"delete": {"element": {"family": "ip", "table": "yun_router", "name": "mono_dnat",
                                "elem": [["203.0.113.10", "10.64.0.10"]]}}},
        {"add": {"element": {"family": "ip", "table": "yun_router", "name": "mono_dnat",
                             "elem": [["203.0.113.10", "10.64.0.50"]]}}}]
    assert doc == diff_document(OLD, new)


def raw(rules: RouterRuleSet) -> dict[str, object]:
    return json.loads(rules.model_dump_json())  # what the control server sends


def test_decoder_gives_the_model_of_the_pull_and_validates_only_what_changed() -> None:
    rules = OLD.model_copy(update={"routes": [
        NodeRoute(node_uuid="n1", subnet="10.64.0.0/24", via="172.31.0.11")]})
    dec = RuleSetDecoder()
    assert dec.decode(raw(rules)) == rules
    assert (dec.validated, dec.reused) == (5, 0)
    assert dec.decode(raw(rules)) == rules
    assert (dec.validated, dec.reused) == (0, 5)
    data = raw(rules)
    data["mono"][1]["vm_ip"] = "10.64.0.99"  # type: ignore[index]
    got = dec.decode(data)
    assert got.mono[1].vm_ip == "10.64.0.99" and got == RouterRuleSet.model_validate(data)
    assert (dec.validated, dec.reused) == (1, 4)


def test_decoder_refuses_bad_input_even_after_a_good_pull() -> None:
    dec = RuleSetDecoder()
    dec.decode(raw(OLD))
    bad = raw(OLD)
    bad["mono"][0]["vm_ip"] = "10.64.0.300"  # type: ignore[index]
    with pytest.raises(ValidationError, match="not an IPv4 address"):
        dec.decode(bad)
    nested = raw(OLD)
    nested["ports"][0]["vm_port"] = [80]  # type: ignore[index]
    with pytest.raises(ValidationError, match="vm_port"):
        dec.decode(nested)
    with pytest.raises(ValidationError, match="extra"):
        dec.decode({**raw(OLD), "surprise": 1})
    with pytest.raises(ValidationError):
        dec.decode([1, 2])
    # A refused pull leaves the previous cache usable.
    assert dec.decode(raw(OLD)) == OLD and dec.validated == 0


def test_libnftables_missing_is_a_clear_error_and_the_table_falls_back_to_nft() -> None:
    with pytest.raises(LibnftablesError, match=r"libnope\.so\.9.*libnftables1"):
        Libnftables("libnope.so.9")
    assert NftTable(library=False).backend == "nft"


def random_rules(rnd: random.Random, generation: int) -> RouterRuleSet:
    """Small address and port spaces, so that mappings share public addresses and VMs."""
    mono = {f"203.0.113.{rnd.randint(1, 12)}": f"10.64.0.{rnd.randint(1, 8)}"
            for _ in range(rnd.randint(0, 8))}
    ports = {(rnd.choice(["tcp", "udp"]), f"203.0.113.{rnd.randint(10, 14)}",
              rnd.randint(10000, 10006)): (f"10.64.0.{rnd.randint(1, 8)}",
                                           rnd.choice([22, 80, 443]))
             for _ in range(rnd.randint(0, 10))}
    return RouterRuleSet(
        generation=generation,
        mono=[MonoMapping(public_ip=p, vm_ip=v, vm_uuid=v) for p, v in mono.items()],
        ports=[PortMapping(protocol=proto, public_ip=p, public_port=pp, vm_ip=v, vm_port=vp,
                           vm_uuid=v) for (proto, p, pp), (v, vp) in ports.items()])


def test_counted_changes_equal_the_full_diff_over_a_chain_of_random_rule_sets() -> None:
    rnd = random.Random(8)
    old = random_rules(rnd, 0)
    counts = ElementCounts(mappings(old))
    assert counts.elements() == elements(old)
    for generation in range(1, 300):
        new = random_rules(rnd, generation) if generation % 3 else old.model_copy(
            update={"mono": old.mono[1:]})  # a small change as well as big ones
        expected = element_changes(elements(old), elements(new))
        assert counts.change_to(mappings(new)) == expected, generation
        assert counts.elements() == elements(new)
        old = new


def test_an_element_two_mappings_share_stays_when_one_of_them_moves() -> None:
    counts = ElementCounts(mappings(OLD))
    # 203.0.113.20:10081 moves from VM d to VM c: c now carries both ports, d none.
    new = OLD.model_copy(update={"ports": [OLD.ports[0], OLD.ports[1].model_copy(
        update={"vm_ip": "10.64.0.12"})]})
    got = counts.change_to(mappings(new))
    assert got["vm_addrs"] == ({("10.64.0.13",)}, set())  # c's address was there already
    assert "public_addrs" not in got


def test_decoder_reuses_objects_that_moved_in_the_list() -> None:
    dec = RuleSetDecoder()
    dec.decode(raw(OLD))
    shifted = raw(OLD)
    first = {"public_ip": "203.0.113.9", "vm_ip": "10.64.0.9", "vm_uuid": "z"}
    shifted["mono"] = [first, *shifted["mono"]]  # type: ignore[misc]
    got = dec.decode(shifted)
    assert got == RouterRuleSet.model_validate(shifted)
    assert (dec.validated, dec.reused) == (1, 4)
    dropped = raw(OLD)
    dropped["mono"] = dropped["mono"][1:]  # type: ignore[index]
    assert dec.decode(dropped) == RouterRuleSet.model_validate(dropped)
    assert dec.validated == 0


def test_packets_leave_the_chains_early() -> None:
    # The hot path: a packet not marked for a chain's direction leaves it at the third
    # rule of prerouting (after the two that mark) and the first of postrouting, and the
    # last translation of a packet ends its chain.
    cmds = table_document(OLD)["nftables"]
    rules: dict[str, list[list[dict[str, object]]]] = {}
    for c in cmds:
        if "rule" in c.get("add", {}):
            rules.setdefault(c["add"]["rule"]["chain"], []).append(c["add"]["rule"]["expr"])
    not_in = {"match": {"op": "!=", "left": {"meta": {"key": "mark"}}, "right": MARK_IN}}
    not_out = {"match": {"op": "!=", "left": {"meta": {"key": "mark"}}, "right": MARK_OUT}}
    assert rules["prerouting"][2] == [not_in, {"accept": None}]
    assert rules["postrouting"][0] == [not_out, {"accept": None}]
    ends = [r for chain in ("prerouting", "postrouting") for r in rules[chain]
            if r[-1] == {"accept": None} and any("mangle" in e for e in r)]
    targets = sorted(e["mangle"]["value"]["map"]["data"] for r in ends  # type: ignore[index]
                     for e in r if "mangle" in e)
    assert targets == ["@mono_dnat", "@mono_snat", "@share_tcp_dport", "@share_tcp_saddr",
                       "@share_udp_dport", "@share_udp_saddr"]
    assert rules["postrouting"][-1][-1] == {"drop": None}  # untranslated VM source
