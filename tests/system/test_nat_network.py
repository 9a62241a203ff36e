"""The real NAT network backend inside a fresh namespace: bridge, nft, dnsmasq, DHCP, NAT.

The backend acts on the network namespace it runs in, and nft and dnsmasq must run in
that namespace too, so each step runs the backend in a short Python process under
``ip netns exec`` (which also shows that its state survives an agent restart: every
step is a new process). The "VM" is another namespace whose ``eth0`` is cabled to the
node's bridge; busybox ``udhcpc`` asks for its lease.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from yun.testing.netns import Host, Namespace, Topology, http_get_in, wait_http_in
from yun.util.run import run

pytestmark = pytest.mark.system

BRIDGE = "yunbr0"
SUBNET = "10.77.0.0/24"
VM1 = "11111111-2222-3333-4444-555555555555"
VM2 = "66666666-7777-8888-9999-000000000000"
NIC1 = {"nic_id": "aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee", "mac": "52:54:00:aa:00:01",
        "ip": "10.77.0.50"}
NIC2 = {"nic_id": "bbbbbbbb-bbbb-cccc-dddd-eeeeeeeeeeee", "mac": "52:54:00:aa:00:02",
        "ip": "10.77.0.50"}

# Runs inside the node namespace: one backend operation, its result as JSON.
_STEP = r"""
import asyncio, dataclasses, json, sys
from pathlib import Path
from yun.node.network.nat import NatNetworkBackend
from yun.proto.messages import NicSpec

state, bridge, subnet, op, arg = sys.argv[1:6]
b = NatNetworkBackend(Path(state), bridge, subnet)

async def main():
    if op == "ensure":
        return dataclasses.asdict(await b.ensure_network())
    if op == "port":
        vm, nic = json.loads(arg)
        return dataclasses.asdict(await b.ensure_port(vm, NicSpec(**nic)))
    if op == "release":
        return await b.release_ports(arg)
    if op == "ports":
        return await b.vm_ports()
    if op == "teardown":
        return await b.teardown()
    raise SystemExit(f"unknown op {op}")

print(json.dumps(asyncio.run(main())))
"""

# The udhcpc script: print what was offered, configure nothing.
_UDHCPC_SCRIPT = '#!/bin/sh\n[ "$1" = bound ] && echo "BOUND ip=$ip router=$router mask=$mask"\n' \
                 'exit 0\n'

# Answers every GET with the address the request came from.
_WHOAMI = r"""
import http.server, sys
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = self.client_address[0].encode()
        self.send_response(200); self.send_header("Content-Length", str(len(body)))
        self.end_headers(); self.wfile.write(body)
    def log_message(self, *a): pass
http.server.HTTPServer((sys.argv[1], int(sys.argv[2])), H).serve_forever()
"""


@dataclass
class Node:
    host: Host
    state: Path
    vm: Namespace
    topo: Topology

    @property
    def ns(self) -> Namespace:
        return self.host.ns

    def step(self, op: str, arg: Any = "") -> Any:
        arg_text = arg if isinstance(arg, str) else json.dumps(arg)
        res = self.ns.run([sys.executable, "-c", _STEP, str(self.state), BRIDGE, SUBNET,
                           op, arg_text], timeout=60)
        return json.loads(res.stdout.strip().splitlines()[-1])

    def dnsmasq_pid(self) -> int | None:
        try:
            pid = int((self.state / "dnsmasq.pid").read_text())
        except (OSError, ValueError):
            return None
        return pid if Path(f"/proc/{pid}").exists() else None

    def table(self) -> dict[str, Any] | None:
        ruleset = json.loads(self.ns.run(["nft", "-j", "list", "ruleset"]).stdout)
        for item in ruleset["nftables"]:
            if item.get("table", {}).get("name") == f"yun_nat_{BRIDGE}":
                return dict(item["table"])
        return None

    def ruleset(self) -> list[dict[str, Any]]:
        return list(json.loads(self.ns.run(["nft", "-j", "list", "ruleset"]).stdout)["nftables"])

    def dhcp(self, tries: int = 3) -> str | None:
        """Ask for a lease from the VM namespace; the offered address or None."""
        script = self.state.parent / f"{self.state.name}-udhcpc.sh"
        script.write_text(_UDHCPC_SCRIPT)
        script.chmod(0o755)
        try:
            res = self.vm.run(["busybox", "udhcpc", "-i", "eth0", "-n", "-q", "-f",
                               "-t", str(tries), "-T", "1", "-s", str(script)],
                              timeout=30, check=False)
        finally:
            script.unlink(missing_ok=True)
        for line in res.stdout.splitlines():
            if line.startswith("BOUND "):
                fields = dict(kv.split("=", 1) for kv in line.split()[1:])
                assert fields["router"] == "10.77.0.1"
                return fields["ip"]
        return None


@pytest.fixture
def node() -> Iterator[Node]:
    if os.geteuid() != 0:
        pytest.skip("needs root")
    for tool in ("nft", "dnsmasq", "busybox"):
        if shutil.which(tool) is None:
            pytest.skip(f"needs {tool}")
    # dnsmasq drops root: its state directory must be reachable by "nobody", which
    # pytest's tmp_path (under a 0700 directory) is not.
    state_root = Path(tempfile.mkdtemp(prefix="yun-nat-", dir="/tmp"))
    state_root.chmod(0o755)
    try:
        with Topology(root_link=False) as topo:
            host = topo.add_host("node")
            vm = topo.add_namespace("vm")
            # The VM's cable: one end a port of the node's bridge (plugged in once the
            # bridge exists), the other end eth0 in the VM namespace.
            n = Node(host=host, state=state_root / "net", vm=vm, topo=topo)
            try:
                yield n
            finally:
                # Teardown inside the namespace, in case the test stopped early.
                n.ns.run([sys.executable, "-c", _STEP, str(n.state), BRIDGE, SUBNET,
                          "teardown", ""], timeout=60, check=False)
    finally:
        shutil.rmtree(state_root, ignore_errors=True)


def _plug_vm(node: Node, mac: str) -> None:
    node.ns.run(["ip", "link", "add", "vmcable", "type", "veth",
                 "peer", "name", "eth0", "netns", node.vm.name])
    node.ns.run(["ip", "link", "set", "vmcable", "master", BRIDGE])
    node.ns.run(["ip", "link", "set", "vmcable", "up"])
    node.vm.run(["ip", "link", "set", "eth0", "address", mac])
    node.vm.run(["ip", "link", "set", "eth0", "up"])


def test_nat_network_lifecycle(node: Node) -> None:
    # -- ensure_network: bridge with the gateway address, dnsmasq, the NAT table.
    net = node.step("ensure")
    assert net == {"bridge": BRIDGE, "subnet": SUBNET, "gateway": "10.77.0.1"}
    link = json.loads(node.ns.run(["ip", "-j", "-d", "addr", "show", "dev", BRIDGE]).stdout)[0]
    assert link["linkinfo"]["info_kind"] == "bridge"
    assert "UP" in link["flags"]
    assert {"10.77.0.1/24"} <= {f"{a['local']}/{a['prefixlen']}" for a in link["addr_info"]}
    assert node.ns.run(["cat", "/proc/sys/net/ipv4/ip_forward"]).stdout.strip() == "1"
    pid = node.dnsmasq_pid()
    assert pid is not None
    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    assert f"--interface={BRIDGE}".encode() in cmdline
    table = node.table()
    assert table is not None
    rules = [i["rule"] for i in node.ruleset() if "rule" in i]
    masq = [r for r in rules if any("masquerade" in e for e in r["expr"])]
    assert len(masq) == 1 and masq[0]["chain"] == "postrouting"

    # -- a second ensure_network changes nothing: same daemon, same table (same handle).
    assert node.step("ensure") == net
    assert node.dnsmasq_pid() == pid
    assert node.table() == table

    # -- a port: the static lease is served to that MAC.
    _plug_vm(node, NIC1["mac"])
    nic = node.step("port", [VM1, NIC1])
    assert nic["bridge"] == BRIDGE and nic["mac"] == NIC1["mac"]
    assert nic["tap"].startswith("yv") and len(nic["tap"]) <= 15
    assert node.step("port", [VM1, NIC1]) == nic  # idempotent
    assert node.step("ports") == {VM1: [NIC1["mac"]]}
    assert node.dhcp() == NIC1["ip"]
    leases = (node.state / "dnsmasq.leases").read_text()
    assert NIC1["mac"] in leases

    # -- release_ports: the lease, the record and a leftover tap go.
    node.ns.run(["ip", "tuntap", "add", "mode", "tap", "name", nic["tap"]])
    node.step("release", VM1)
    assert node.step("ports") == {}
    assert NIC1["mac"] not in (node.state / "dnsmasq.leases").read_text()
    assert node.ns.run(["ip", "link", "show", "dev", nic["tap"]], check=False).returncode != 0
    assert node.dnsmasq_pid() is not None
    assert node.dhcp(tries=2) is None  # an unknown MAC gets nothing (static mode)
    node.step("release", VM1)  # idempotent

    # -- the same address for another VM (another MAC) right away: it really was freed.
    node.vm.run(["ip", "link", "set", "eth0", "address", NIC2["mac"]])
    node.step("port", [VM2, NIC2])
    assert node.dhcp() == NIC2["ip"]

    # -- teardown: no bridge, no table, no dnsmasq.
    node.step("teardown")
    assert node.ns.run(["ip", "link", "show", "dev", BRIDGE], check=False).returncode != 0
    assert node.table() is None
    assert node.dnsmasq_pid() is None
    assert not Path(f"/proc/{pid}").exists() or b"dnsmasq" not in Path(
        f"/proc/{pid}/cmdline").read_bytes()


def test_vm_traffic_is_masqueraded(node: Node) -> None:
    """A VM behind the NAT reaches a LAN host, which sees the node's LAN address."""
    ext = node.topo.add_host("ext")
    server = ext.popen([sys.executable, "-c", _WHOAMI, ext.ip, "8080"],
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        node.step("ensure")
        _plug_vm(node, NIC1["mac"])
        node.step("port", [VM1, NIC1])
        assert node.dhcp() == NIC1["ip"]
        # Configure what udhcpc offered; the default route leads only into the node
        # namespace, which has no default route: nothing can leave the test LAN.
        node.vm.run(["ip", "addr", "add", f"{NIC1['ip']}/24", "dev", "eth0"])
        node.vm.run(["ip", "route", "add", "default", "via", "10.77.0.1"])
        res = wait_http_in(node.vm.name, f"http://{ext.ip}:8080/", deadline=20)
        assert res.status == 200, res
        assert res.body == node.host.ip  # masqueraded as the node
        # Without NAT (table gone) the LAN host has no route back to 10.77.0.0/24.
        run(["ip", "netns", "exec", node.ns.name, "nft", "delete", "table", "inet",
             f"yun_nat_{BRIDGE}"])
        assert http_get_in(node.vm.name, f"http://{ext.ip}:8080/", timeout=2).status == 0
        # ensure_network repairs the drift.
        node.step("ensure")
        assert http_get_in(node.vm.name, f"http://{ext.ip}:8080/", timeout=5).body == \
            node.host.ip
    finally:
        server.terminate()
        server.wait(timeout=10)
