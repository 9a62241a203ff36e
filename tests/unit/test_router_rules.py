"""The routers' rule set as a pure function of rows, and the nft documents built from it."""

from __future__ import annotations

from yun.control.db.models import NodeRow, PublicIpRow
from yun.control.network.router_rules import node_lan_address, rule_set
from yun.proto.network import MonoMapping, NodeRoute, PortMapping, RouterRuleSet
from yun.router.nft import (
    MARK_IN,
    desired_state,
    diff_document,
    elements,
    live_state,
    table_document,
)


def pub(ip: str, vm: str | None, *, port: int = 0, kind: str = "vm", vm_port: int | None = None,
        protocol: str = "") -> PublicIpRow:
    return PublicIpRow(uuid=f"{ip}-{port}", name="x", address_pool_uuid="p", project_uuid="j",
                       kind=kind, ip=ip, port=port, protocol=protocol, vm_uuid=vm,
                       vm_port=vm_port)


def node(uuid: str, url: str, subnet: str | None) -> NodeRow:
    return NodeRow(uuid=uuid, name=uuid, url=url, hypervisor="sim", accel="tcg",
                   sandbox_subnet=subnet)


def test_rule_set_maps_bound_addresses_and_ports_of_addressed_vms() -> None:
    rows = [
        pub("203.0.113.10", "vm-a"),                              # mono, bound
        pub("203.0.113.11", "vm-b", kind="eip"),                  # eip bound to vm-b
        pub("203.0.113.12", None, kind="eip"),                    # eip not bound: nothing
        pub("203.0.113.13", "vm-c"),                              # vm without an address
        pub("203.0.113.20", "vm-d", port=10080, vm_port=80, protocol="tcp"),
        pub("203.0.113.20", "vm-d", port=10053, vm_port=53, protocol="udp"),
        pub("203.0.113.14", "vm-a", kind="other"),                # unknown kind: ignored
    ]
    ips = {"vm-a": "10.64.0.10", "vm-b": "10.64.1.5", "vm-c": None, "vm-d": "10.64.0.11"}
    nodes = [node("n2", "https://172.31.0.12:7720", "10.64.1.0/24"),
             node("n1", "https://172.31.0.11:7720", "10.64.0.0/24"),
             node("n3", "https://node3.lan:7720", "10.64.2.0/24"),     # not an IPv4 host
             node("n4", "https://172.31.0.14:7720", None)]            # no subnet yet
    got = rule_set(7, rows, ips, nodes)
    assert got == RouterRuleSet(
        generation=7,
        mono=[MonoMapping(public_ip="203.0.113.10", vm_ip="10.64.0.10", vm_uuid="vm-a"),
              MonoMapping(public_ip="203.0.113.11", vm_ip="10.64.1.5", vm_uuid="vm-b")],
        ports=[PortMapping(protocol="tcp", public_ip="203.0.113.20", public_port=10080,
                           vm_ip="10.64.0.11", vm_port=80, vm_uuid="vm-d"),
               PortMapping(protocol="udp", public_ip="203.0.113.20", public_port=10053,
                           vm_ip="10.64.0.11", vm_port=53, vm_uuid="vm-d")],
        routes=[NodeRoute(node_uuid="n1", subnet="10.64.0.0/24", via="172.31.0.11"),
                NodeRoute(node_uuid="n2", subnet="10.64.1.0/24", via="172.31.0.12")])


def test_an_eip_bound_to_a_mono_vm_stands_in_for_its_own_address() -> None:
    """A mono VM keeps its own public address when an EIP is bound to it; the routers
    translate its address to ONE public address (the EIP), or the outbound map would get
    two entries for one key and nft would refuse the whole table."""
    rows = [pub("203.0.113.10", "vm-a"), pub("203.0.113.15", "vm-a", kind="eip"),
            pub("203.0.113.14", "vm-a", kind="eip"), pub("203.0.113.11", "vm-b")]
    ips = {"vm-a": "10.64.0.10", "vm-b": "10.64.0.11"}
    got = rule_set(3, rows, ips, [])
    assert got.mono == [
        MonoMapping(public_ip="203.0.113.11", vm_ip="10.64.0.11", vm_uuid="vm-b"),
        MonoMapping(public_ip="203.0.113.14", vm_ip="10.64.0.10", vm_uuid="vm-a")]
    snat = sorted(elements(got)["mono_snat"])
    assert len({vm_ip for vm_ip, _ in snat}) == len(snat) == 2
    # Unbound again, the VM's own address is translated again.
    got = rule_set(4, [rows[0], rows[3]], ips, [])
    assert [m.public_ip for m in got.mono] == ["203.0.113.10", "203.0.113.11"]


def test_rule_set_is_the_same_for_rows_in_any_order() -> None:
    rows = [pub(f"203.0.113.{i}", f"vm-{i}") for i in range(1, 40)]
    ips = {f"vm-{i}": f"10.64.0.{i}" for i in range(1, 40)}
    assert rule_set(1, rows, ips, []) == rule_set(1, list(reversed(rows)), ips, [])
    assert rule_set(0, [], {}, []) == RouterRuleSet(generation=0)


def test_node_lan_address_takes_only_ipv4_hosts() -> None:
    assert node_lan_address("https://10.0.0.5:7720") == "10.0.0.5"
    assert node_lan_address("https://[fd00::1]:7720") is None
    assert node_lan_address("https://node.example:7720") is None
    assert node_lan_address("") is None


RULES = RouterRuleSet(
    generation=3,
    mono=[MonoMapping(public_ip="203.0.113.10", vm_ip="10.64.0.10", vm_uuid="a")],
    ports=[PortMapping(public_ip="203.0.113.20", public_port=10080, vm_ip="10.64.0.11",
                       vm_port=80, vm_uuid="b")])


def test_elements_give_both_directions_of_every_mapping() -> None:
    e = elements(RULES)
    assert e["mono_dnat"] == {("203.0.113.10", "10.64.0.10")}
    assert e["mono_snat"] == {("10.64.0.10", "203.0.113.10")}
    assert e["share_tcp_daddr"] == {("203.0.113.20", 10080, "10.64.0.11")}
    assert e["share_tcp_dport"] == {("10.64.0.11", 10080, 80)}
    assert e["share_tcp_sport"] == {("10.64.0.11", 80, 10080)}
    assert e["share_tcp_saddr"] == {("10.64.0.11", 10080, "203.0.113.20")}
    assert e["public_addrs"] == {("203.0.113.10",), ("203.0.113.20",)}
    assert e["share_udp_daddr"] == set()


def test_table_document_replaces_the_table_in_one_transaction() -> None:
    cmds = table_document(RULES)["nftables"]
    table = {"family": "ip", "name": "yun_router"}
    # add-delete-add: the delete never fails for a missing table, and it all is one
    # document, so one nft transaction.
    assert cmds[:3] == [{"add": {"table": table}}, {"delete": {"table": table}},
                        {"add": {"table": table}}]
    cmds = cmds[3:]
    maps = {c["add"]["map"]["name"]: c["add"]["map"] for c in cmds if "map" in c["add"]}
    assert maps["share_tcp_dport"]["elem"] == [[{"concat": ["10.64.0.11", 10080]}, 80]]
    assert maps["mono_dnat"]["elem"] == [["203.0.113.10", "10.64.0.10"]]
    assert "elem" not in maps["share_udp_daddr"]  # an empty map has no elem list
    chains = {c["add"]["chain"]["name"]: c["add"]["chain"] for c in cmds if "chain" in c["add"]}
    assert chains["prerouting"]["prio"] == -300 and chains["forward"]["policy"] == "drop"
    pre = [c["add"]["rule"] for c in cmds if "rule" in c["add"]
           and c["add"]["rule"]["chain"] == "prerouting"]
    assert {"notrack": None} in pre[0]["expr"]
    assert pre[0]["expr"][-1]["mangle"]["value"] == MARK_IN
    wan = table_document(RULES, wan=["eth1"])["nftables"]
    first = next(c["add"]["rule"] for c in wan if "rule" in c.get("add", {}))
    assert first["expr"][0]["match"]["right"] == {"set": ["eth1"]}


def test_diff_adds_and_deletes_only_what_changed() -> None:
    assert diff_document(RULES, RULES.model_copy(update={"generation": 9})) is None
    moved = RULES.model_copy(update={"mono": [
        MonoMapping(public_ip="203.0.113.10", vm_ip="10.64.0.99", vm_uuid="c")]})
    cmds = diff_document(RULES, moved)["nftables"]  # type: ignore[index]
    deletes = {c["delete"]["element"]["name"]: c["delete"]["element"]["elem"]
               for c in cmds if "delete" in c}
    adds = {c["add"]["element"]["name"]: c["add"]["element"]["elem"] for c in cmds if "add" in c}
    assert deletes == {"vm_addrs": ["10.64.0.10"],
                       "mono_dnat": [["203.0.113.10", "10.64.0.10"]],
                       "mono_snat": [["10.64.0.10", "203.0.113.10"]]}
    assert adds == {"vm_addrs": ["10.64.0.99"],
                    "mono_dnat": [["203.0.113.10", "10.64.0.99"]],
                    "mono_snat": [["10.64.0.99", "203.0.113.10"]]}
    # deletes come first: a key whose data changes is deleted, then added again
    assert "delete" in cmds[0] and "add" in cmds[-1]
    # the public address stays while another mapping (share) still uses it
    shared = RULES.model_copy(update={"ports": [], "mono": [
        MonoMapping(public_ip="203.0.113.20", vm_ip="10.64.0.12", vm_uuid="d"),
        *RULES.mono]})
    cmds = diff_document(RULES, shared)["nftables"]  # type: ignore[index]
    names = {c.get("delete", c.get("add"))["element"]["name"] for c in cmds}
    assert "public_addrs" not in names


def test_live_state_of_the_listing_equals_the_desired_state() -> None:
    # The listing nft prints for the table of RULES (as nft -j list table does: handles,
    # concat elements, rule comments).
    doc = table_document(RULES)["nftables"][3:]
    listing = {"nftables": [{"metainfo": {"version": "1.0.6"}},
                            {"table": {"family": "ip", "name": "yun_router", "handle": 2}}]}
    for cmd in doc:
        (kind, body), = cmd["add"].items()
        listing["nftables"].append({kind: {**body, "handle": 1}})
    assert live_state(listing) == desired_state(RULES)
    # a rule removed by hand, or an element, is drift
    cut = {"nftables": [e for e in listing["nftables"]
                        if e.get("rule", {}).get("comment") != "yun:forward:0"]}
    assert live_state(cut) != desired_state(RULES)
    assert live_state({"nftables": []}) != desired_state(RULES)
