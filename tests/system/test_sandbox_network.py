"""The routed sandbox network with real guests (F-NET-SANDBOX, F-SB-PRIVATE).

One data centre with one node host and two guests booted in parallel under TCG, shared
by the module. What the guests send is typed on their serial console (a root shell in
the test guest, busybox tools) and the answer read back through the API's console log;
what the node drops is read from the named counters of its table ``inet yun_sandbox``.
"""

from __future__ import annotations

import ipaddress
import json
import re
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.system.conftest import need_root
from yun.testing.console import guest_sh
from yun.testing.datacenter import DataCenter, deployed
from yun.testing.netns import Host, Topology, http_get_in

pytestmark = pytest.mark.system

AGENT_PORT = 7720
NODE_PORT = 40001


@dataclass
class Sandbox:
    dc: DataCenter
    a: dict[str, Any]
    b: dict[str, Any]

    @property
    def node(self) -> Host:
        return self.dc.node_of(self.a)

    @property
    def state(self) -> Path:
        return self.dc.node_hosts[self.node.name].root / "yun" / "node" / "network"

    def settings(self) -> dict[str, Any]:
        return json.loads((self.state / "settings.json").read_text())  # type: ignore[no-any-return]

    def tap_of(self, vm: dict[str, Any]) -> str:
        """The ys* tap holding the VM's /32 route."""
        out = self.node.run(["ip", "-j", "-4", "route", "show", f"{vm['ip']}/32"]).stdout
        (route,) = json.loads(out)
        return str(route["dev"])

    def counters(self) -> dict[str, int]:
        """Packets counted by each named counter of the node's sandbox table."""
        return sandbox_counters(self.node)


def sandbox_counters(node: Host) -> dict[str, int]:
    """Packets counted by each named counter of the node's table ``inet yun_sandbox``."""
    out = node.run(["nft", "-j", "list", "counters", "table", "inet", "yun_sandbox"]).stdout
    return {item["counter"]["name"]: int(item["counter"]["packets"])
            for item in json.loads(out)["nftables"] if "counter" in item}




@pytest.fixture(scope="module")
def sandbox() -> Iterator[Sandbox]:
    """One node, two guests on it booted in parallel; all of it removed after."""
    need_root("nft", "dnsmasq")
    with Topology() as topo, deployed(topo) as dc:
        started = time.monotonic()
        with ThreadPoolExecutor(2) as pool:
            a, b = pool.map(dc.create_vm, ("a", "b"))
            list(pool.map(lambda vm: dc.wait_console(vm["uuid"], "YUN-GUEST-READY",
                                                     timeout=300), (a, b)))
        print(f"\n2 guests booted in parallel under TCG in "
              f"{time.monotonic() - started:.0f} s")
        yield Sandbox(dc, a, b)


def wait_counter(sb: Sandbox, name: str, above: int, timeout: float = 20) -> int:
    deadline = time.monotonic() + timeout
    value = sb.counters()[name]
    while value <= above and time.monotonic() < deadline:
        time.sleep(0.5)
        value = sb.counters()[name]
    return value


def test_each_guest_has_its_lease_and_serves_http_from_the_node(sandbox: Sandbox) -> None:
    settings = sandbox.settings()
    subnet = ipaddress.IPv4Network(settings["subnet"])
    leases = (sandbox.state / "dnsmasq.leases").read_text()
    for vm in (sandbox.a, sandbox.b):
        assert vm["node_name"] == sandbox.node.name
        assert ipaddress.IPv4Address(vm["ip"]) in subnet
        assert any(line.split()[2] == vm["ip"] for line in leases.splitlines()), leases
        page = sandbox.dc.guest_http(vm)
        assert page["hostname"] == vm["name"]
    assert sandbox.tap_of(sandbox.a) != sandbox.tap_of(sandbox.b)
    # The guest sees the node's gateway as its router and its address from DHCP.
    assert guest_sh(sandbox.dc, sandbox.a, last="ip -4 route show default").startswith(
        f"default via {settings['gateway']}")


def test_guest_cannot_reach_another_guest(sandbox: Sandbox) -> None:
    a, b = sandbox.a, sandbox.b
    # The same request from the node gets B's page: B is up and listening.
    assert sandbox.dc.guest_http(b)["hostname"] == "b"
    before = sandbox.counters()["vm_to_vm"]
    answer = guest_sh(sandbox.dc, a, last=f"echo GET /|nc -w3 {b['ip']} 80")
    assert "hostname=" not in answer, answer
    assert wait_counter(sandbox, "vm_to_vm", before) > before


def test_guest_cannot_reach_the_node_agent(sandbox: Sandbox) -> None:
    gateway = sandbox.settings()["gateway"]
    before = sandbox.counters()["to_host"]
    for target in (sandbox.node.ip, gateway):
        # What shows the drop is nc's exit status (0 once connected, TLS or not) and
        # the counter. (With stdin at EOF busybox nc gives up before sending a SYN.)
        answer = guest_sh(sandbox.dc, sandbox.a,
                          last=f"echo x|nc -w3 {target} {AGENT_PORT};echo rc=$?")
        assert answer.endswith("rc=1"), answer
    assert wait_counter(sandbox, "to_host", before) >= before + 2


def test_spoofed_source_is_dropped(sandbox: Sandbox) -> None:
    subnet = ipaddress.IPv4Network(sandbox.settings()["subnet"])
    spoofed = str(subnet.network_address + 250)
    gateway = sandbox.settings()["gateway"]
    # From A's own address the pings pass the guard and meet the input chain (the
    # node answers no ping of a VM): to_host counts them, spoofed does not.
    before = sandbox.counters()
    guest_sh(sandbox.dc, sandbox.a, last=f"ping -c2 -W2 {gateway}")
    after = {name: wait_counter(sandbox, name, before[name], timeout=5)
             for name in ("to_host", "spoofed")}
    assert after["to_host"] >= before["to_host"] + 2 and after["spoofed"] == before["spoofed"]
    answer = guest_sh(sandbox.dc, sandbox.a, f"ip addr add {spoofed}/32 dev eth0",
                      last=f"ping -c2 -W2 -I {spoofed} {gateway}")
    guest_sh(sandbox.dc, sandbox.a, last=f"ip addr del {spoofed}/32 dev eth0")
    assert "0 packets received" in answer, answer
    assert wait_counter(sandbox, "spoofed", after["spoofed"]) >= after["spoofed"] + 2
    assert sandbox.counters()["to_host"] == after["to_host"]  # they never got that far


# A DHCPDISCOVER (broadcast flag set) from a made-up client, as a frame written into a
# tap from the node's side: the guest receives it as if a client on its link asked.
_DISCOVER = r"""
import socket, struct, sys
tap = sys.argv[1]
mac = bytes.fromhex("02000000aa01")
bootp = struct.pack("!BBBBIHH4s4s4s4s16s64s128s", 1, 1, 6, 0, 0x5EED0001, 0, 0x8000,
                    bytes(4), bytes(4), bytes(4), bytes(4), mac + bytes(10), b"", b"")
bootp += bytes.fromhex("63825363") + bytes([53, 1, 1, 255])
udp = struct.pack("!HHHH", 68, 67, 8 + len(bootp), 0) + bootp
def csum(h):
    s = sum(struct.unpack("!10H", h))
    s = (s >> 16) + (s & 0xFFFF)
    return ~(s + (s >> 16)) & 0xFFFF
ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 1, 0, 64, 17, 0,
                 bytes(4), b"\xff" * 4)
ip = ip[:10] + struct.pack("!H", csum(ip)) + ip[12:]
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
s.bind((tap, 0))
for _ in range(3):
    s.send(b"\xff" * 6 + mac + b"\x08\x00" + ip + udp)
"""


def test_dhcp_answer_from_a_guest_is_dropped(sandbox: Sandbox) -> None:
    subnet = ipaddress.IPv4Network(sandbox.settings()["subnet"])
    a = sandbox.a
    # A runs a DHCP server of its own (busybox udhcpd) on its link.
    pid = guest_sh(sandbox.dc, a,
                   "echo interface eth0 >/tmp/u",
                   f"echo start {subnet.network_address + 200} >>/tmp/u",
                   f"echo end {subnet.network_address + 210} >>/tmp/u",
                   "echo lease_file /tmp/l >>/tmp/u",
                   "echo pidfile /tmp/p >>/tmp/u",
                   "touch /tmp/l; udhcpd /tmp/u",
                   last="pidof udhcpd")
    assert pid.isdigit(), pid
    before = sandbox.counters()["rogue_dhcp"]
    for _ in range(5):  # the slow guest may answer late: ask again until it does
        sandbox.node.run([sys.executable, "-c", _DISCOVER, sandbox.tap_of(a)])
        if wait_counter(sandbox, "rogue_dhcp", before, timeout=10) > before:
            break
    assert sandbox.counters()["rogue_dhcp"] > before
    # The node's dnsmasq never leased the made-up client anything, A's server offered
    # and its offer went nowhere: A's own lease file is all it knows.
    assert "02:00:00:00:aa:01" not in (sandbox.state / "dnsmasq.leases").read_text()
    guest_sh(sandbox.dc, a, last="kill $(cat /tmp/p);echo done")


_SET_FORWARDS = r"""
import json, sys
from pathlib import Path
from yun.node.network.sandbox import SandboxNetworkBackend
from yun.proto.network import NodeForward
state, vm, forwards = sys.argv[1:4]
SandboxNetworkBackend(Path(state)).set_forwards_sync(
    vm, [NodeForward(**f) for f in json.loads(forwards)])
"""


def set_forwards(sb: Sandbox, vm: dict[str, Any], forwards: list[dict[str, Any]]) -> None:
    """The node-level path of a node forward: the agent's sandbox backend, in the node's
    namespace, on the agent's state (what PUT /internal/v1/vms/{uuid}/forwards runs)."""
    sb.node.run([sys.executable, "-c", _SET_FORWARDS, str(sb.state), vm["uuid"],
                 json.dumps(forwards)])


def test_node_forward_reaches_only_the_forwarded_port(sandbox: Sandbox) -> None:
    a, node = sandbox.a, sandbox.node
    ctl = sandbox.dc.ctl
    assert ctl is not None
    url = f"http://{node.ip}:{NODE_PORT}/"
    with pytest.raises(httpx.HTTPError):  # no forward yet: nothing there
        httpx.get(url, timeout=5)
    set_forwards(sandbox, a, [{"protocol": "tcp", "node_port": NODE_PORT,
                               "vm_ip": a["ip"], "vm_port": 80}])
    try:
        # From the test process (another LAN host) and from the control host.
        page = httpx.get(url, timeout=30).text
        assert "hostname=a" in page, page
        assert "hostname=a" in http_get_in(ctl.ns.name, url, 30).body
        # Another node port leads nowhere.
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"http://{node.ip}:{NODE_PORT + 1}/", timeout=5)
        # Nor does the guest's own address, even for a LAN host routing it via the node.
        before = sandbox.counters()["to_vm"]
        ctl.run(["ip", "route", "add", f"{a['ip']}/32", "via", node.ip])
        try:
            assert not http_get_in(ctl.ns.name, f"http://{a['ip']}/", 5).ok
        finally:
            ctl.run(["ip", "route", "del", f"{a['ip']}/32", "via", node.ip])
        assert wait_counter(sandbox, "to_vm", before) > before
    finally:
        set_forwards(sandbox, a, [])
    with pytest.raises(httpx.HTTPError):
        httpx.get(url, timeout=5)



def test_bandwidth_limit_on_a_routed_tap(sandbox: Sandbox) -> None:
    """The NIC limit (tc on the tap, ingress redirected to an ifb) works on the
    persistent routed tap: the guest still answers through the filter, and lifting the
    limit leaves no qdisc or ifb behind."""
    api, b, node = sandbox.dc.api, sandbox.b, sandbox.node
    assert api is not None
    tap = sandbox.tap_of(b)
    resp = api.post(f"/api/v1/vms/{b['uuid']}/qos", json={"bandwidth_kbit": 2000})
    assert resp.status_code == 202, resp.text
    assert sandbox.dc.wait_task(resp.json()["task"]["uuid"])["state"] == "succeeded"
    qdiscs = node.run(["tc", "qdisc", "show", "dev", tap]).stdout
    assert "tbf" in qdiscs and "rate 2Mbit" in qdiscs and "ingress" in qdiscs, qdiscs
    ifb = "yi" + tap[2:]
    assert "rate 2Mbit" in node.run(["tc", "qdisc", "show", "dev", ifb]).stdout
    # What B sends comes back from the ifb as received on its tap: the table still
    # lets its answers to the node through, and still knows where it came from.
    assert sandbox.dc.guest_http(b)["hostname"] == "b"
    resp = api.post(f"/api/v1/vms/{b['uuid']}/qos", json={"clear": ["bandwidth_kbit"]})
    assert sandbox.dc.wait_task(resp.json()["task"]["uuid"])["state"] == "succeeded"
    qdiscs = node.run(["tc", "qdisc", "show", "dev", tap]).stdout
    assert "tbf" not in qdiscs and "ingress" not in qdiscs, qdiscs
    assert node.run(["ip", "link", "show", ifb], check=False).returncode != 0
    assert sandbox.dc.guest_http(b)["hostname"] == "b"


def test_nic_hot_plugged_into_a_running_guest_and_unplugged(sandbox: Sandbox) -> None:
    """U-HOTPLUG: a NIC added to the running guest appears in it as a new interface,
    which takes its address from the node's dnsmasq; removed, the interface is gone
    from the guest and its tap, route and lease from the node."""
    api, b, node = sandbox.dc.api, sandbox.b, sandbox.node
    assert api is not None
    resp = api.post(f"/api/v1/vms/{b['uuid']}/nics")
    assert resp.status_code == 201, resp.text
    nic = resp.json()
    assert nic["index"] == 1 and nic["ip"] != b["ip"]
    tap = sandbox.tap_of({"ip": nic["ip"]})  # its own routed tap, its own /32 route
    assert tap != sandbox.tap_of(b)
    # The guest finds the new interface by its MAC; its DHCP client (started for every
    # NIC that appears) gets the NIC's address from the node's dnsmasq.
    found = guest_sh(sandbox.dc, b, last=f"grep -l {nic['mac']} /sys/class/net/*/address")
    match = re.fullmatch(r"/sys/class/net/(\w+)/address", found)
    assert match is not None and match.group(1) != "eth0", found
    ifname = match.group(1)
    ip = guest_sh(sandbox.dc, b, "w(){ for i in $(seq 60);do [ -s /run/yun-guest/ip.$1 ]"
                              "&&break;sleep 1;done;}",
                  last=f"w {ifname};cat /run/yun-guest/ip.{ifname}")
    assert ip == nic["ip"], ip
    leases = (sandbox.state / "dnsmasq.leases").read_text()
    assert any(line.split()[1:3] == [nic["mac"], nic["ip"]] for line in leases.splitlines())
    listed = api.get(f"/api/v1/vms/{b['uuid']}/nics").json()
    assert [n["mac"] for n in listed] == [b["mac"], nic["mac"]]

    resp = api.delete(f"/api/v1/vms/{b['uuid']}/nics/1")
    assert resp.status_code == 204, resp.text
    ifaces = guest_sh(sandbox.dc, b, last="ls /sys/class/net").split()
    assert ifname not in ifaces and "eth0" in ifaces, ifaces
    assert node.run(["ip", "link", "show", tap], check=False).returncode != 0
    assert node.run(["ip", "-4", "route", "show", f"{nic['ip']}/32"]).stdout.strip() == ""
    assert nic["mac"] not in (sandbox.state / "dnsmasq.leases").read_text()
    # The guest still answers on its primary NIC.
    assert sandbox.dc.guest_http(b)["hostname"] == "b"
