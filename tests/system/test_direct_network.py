"""Direct mode with a real guest (F-NET-DIRECT): the VM sits on the LAN like a server.

One data centre whose node has ``[node] direct_uplink = "eth0"`` (its LAN cable): the
node bridges it (``yunbr0``) and the guest's tap joins the bridge. A LAN host runs
dnsmasq, the LAN's own DHCP server: the guest takes its address from it, the node
learns it from the DHCPACK and the API shows it; another LAN host reaches the guest's
HTTP server; the guest cannot reach the node agent's port, and the node's
``bridge yun_direct`` table counts the drops.
"""

from __future__ import annotations

import ipaddress
import json
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.system.conftest import need_root
from tests.system.test_sandbox_network import AGENT_PORT
from yun.testing.console import guest_sh
from yun.testing.datacenter import DataCenter, deployed
from yun.testing.netns import Host, Topology, http_get_in

pytestmark = pytest.mark.system

#: The LAN DHCP server's range: far from the hosts' static .11, .12, ...
RANGE = (100, 150)


@dataclass
class Direct:
    dc: DataCenter
    vm: dict[str, Any]
    lan_host: Host
    leases: Path

    @property
    def node(self) -> Host:
        return self.dc.node_of(self.vm)

    def counters(self) -> dict[str, int]:
        out = self.node.run(["nft", "-j", "list", "counters", "table", "bridge",
                             "yun_direct"]).stdout
        return {item["counter"]["name"]: int(item["counter"]["packets"])
                for item in json.loads(out)["nftables"] if "counter" in item}


def _dnsmasq(host: Host, workdir: Path) -> subprocess.Popen[bytes]:
    """The LAN's own DHCP server, on ``host`` (no DNS: port 0)."""
    net = ipaddress.IPv4Network(host.cidr, strict=False)
    first, last = (str(net.network_address + n) for n in RANGE)
    return host.popen(["dnsmasq", "--keep-in-foreground", "--conf-file=/dev/null",
                       "--port=0", "--user=root", "--interface=eth0", "--bind-interfaces",
                       f"--dhcp-range={first},{last},{net.netmask},10m",
                       f"--dhcp-leasefile={workdir / 'leases'}", "--pid-file=",
                       "--dhcp-authoritative", "--log-dhcp",
                       f"--log-facility={workdir / 'dnsmasq.log'}"],
                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


@pytest.fixture(scope="module")
def direct() -> Iterator[Direct]:
    """A direct pool, its node bridging its uplink, one guest booted; all removed after."""
    need_root("nft", "dnsmasq")
    workdir = Path(tempfile.mkdtemp(prefix="yun-direct-lan-"))
    with Topology() as topo:
        dhcp_host = topo.add_host("landhcp")
        lan_host = topo.add_host("lanhost")
        server = _dnsmasq(dhcp_host, workdir)
        try:
            with deployed(topo, node_options={"direct_uplink": "eth0"}) as dc:
                assert dc.api is not None
                resp = dc.api.patch("/api/v1/pools/default", json={"network_mode": "direct"})
                assert resp.status_code == 200, resp.text
                started = time.monotonic()
                vm = dc.create_vm("lan1")
                dc.wait_console(vm["uuid"], "YUN-GUEST-READY", timeout=300)
                print(f"\nguest booted under TCG in {time.monotonic() - started:.0f} s")
                yield Direct(dc, vm, lan_host, workdir / "leases")
        finally:
            server.terminate()
            server.wait(10)
            shutil.rmtree(workdir, ignore_errors=True)


def _shown_ip(d: Direct, timeout: float = 60) -> str:
    """The VM's address as the API shows it, once the node has reported one."""
    assert d.dc.api is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ip = d.dc.api.get(f"/api/v1/vms/{d.vm['uuid']}").json().get("ip")
        if ip:
            return str(ip)
        time.sleep(1)
    raise TimeoutError(f"the API never showed an address of {d.vm['name']}")


def test_guest_takes_its_address_from_the_lan_and_the_api_shows_it(direct: Direct) -> None:
    ip = _shown_ip(direct)
    # dnsmasq's lease file: "<expiry> <mac> <ip> <hostname> <client id>".
    leases = {line.split()[1]: line.split()[2]
              for line in direct.leases.read_text().splitlines() if line.strip()}
    assert leases.get(direct.vm["mac"]) == ip, (leases, direct.vm["mac"], ip)
    net = ipaddress.IPv4Network(direct.lan_host.cidr, strict=False)
    assert net.network_address + RANGE[0] <= ipaddress.IPv4Address(ip) <= (
        net.network_address + RANGE[1])
    # The node bridged its uplink and kept its address on the bridge.
    node = direct.node
    assert f"{node.ip}/" in node.run(["ip", "-4", "addr", "show", "dev", "yunbr0"]).stdout
    links = json.loads(node.run(["ip", "-j", "link"]).stdout)
    assert {link["ifname"]: link.get("master") for link in links}["eth0"] == "yunbr0"


def test_a_lan_host_reaches_the_guests_http_server(direct: Direct) -> None:
    ip = _shown_ip(direct)
    deadline = time.monotonic() + 60
    answer = http_get_in(direct.lan_host.ns.name, f"http://{ip}/", 5)
    while not answer.ok and time.monotonic() < deadline:
        time.sleep(1)
        answer = http_get_in(direct.lan_host.ns.name, f"http://{ip}/", 5)
    assert answer.ok, answer
    facts = dict(line.split("=", 1) for line in answer.body.splitlines() if "=" in line)
    print(f"LAN host -> guest {ip}: {facts}")
    assert facts, answer.body


def test_guest_cannot_reach_the_node_agent(direct: Direct) -> None:
    node = direct.node
    before = direct.counters()
    answer = guest_sh(direct.dc, direct.vm,
                      last=f"echo x|nc -w3 {node.ip} {AGENT_PORT};echo rc=$?")
    assert answer.endswith("rc=1"), answer
    deadline = time.monotonic() + 20
    after = direct.counters()
    while after["to_host"] <= before["to_host"]:  # its ARP for the node, dropped
        assert time.monotonic() < deadline, (before, after)
        time.sleep(1)
        after = direct.counters()
    print(f"drops while the guest tried {node.ip}:{AGENT_PORT}: {before} -> {after}")
    # The LAN is still there for it: the LAN host answers its ping.
    answer = guest_sh(direct.dc, direct.vm, last=f"ping -c2 -W2 {direct.lan_host.ip}")
    assert " 0% packet loss" in answer, answer


def test_delete_leaves_no_tap_and_no_rule(direct: Direct) -> None:
    """Last in the module: the VM goes, its tap and its element of the table with it."""
    assert direct.dc.api is not None
    node = direct.node
    tap_list = node.run(["nft", "list", "set", "bridge", "yun_direct", "allowed"]).stdout
    assert direct.vm["mac"] in tap_list
    resp = direct.dc.api.delete(f"/api/v1/vms/{direct.vm['uuid']}")
    assert resp.status_code == 202, resp.text
    assert direct.dc.wait_task(resp.json()["task"]["uuid"])["state"] == "succeeded"
    links = [link["ifname"] for link in json.loads(node.run(["ip", "-j", "link"]).stdout)]
    assert not [name for name in links if name.startswith("yd")], links
    tap_list = node.run(["nft", "list", "set", "bridge", "yun_direct", "allowed"]).stdout
    assert direct.vm["mac"] not in tap_list
