"""One contract suite for both direct network backends: the simulated twin and the real
one (bridge, taps, nftables, DHCP snooping) in a fresh network namespace whose uplink is
a veth to a second namespace, the LAN.

As in the sandbox suite (whose :class:`NetnsBackend` runs here too), each call of the
real backend is a short Python process under ``ip netns exec``: every call is also an
agent restart, which shows that its state is all on disk.
"""

from __future__ import annotations

import ipaddress
import json
import os
import shutil
import sys
import tempfile
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from tests.unit.test_direct_dhcp import dhcp_frame
from tests.unit.test_sandbox_contract import NetnsBackend, step_script
from yun.node.hypervisor.base import ResolvedNic
from yun.node.network.base import NetworkError
from yun.node.network.direct import TAP_PREFIX, tap_mac
from yun.node.network.ports import tap_name
from yun.node.network.sim_direct import SimDirectBackend
from yun.proto.messages import NicSpec
from yun.proto.network import LearnedAddress, NicNetwork, SandboxSettings
from yun.util.run import run

LAN = ipaddress.IPv4Network("192.168.50.0/24")
NODE_IP = "192.168.50.2"
LAN_HOST = "192.168.50.1"
MGMT = "192.168.50.10/32"
VM_A = "aaaaaaaa-0000-4000-8000-000000000001"
VM_B = "bbbbbbbb-0000-4000-8000-000000000002"
NIC_A = "1a2b3c4d-5e6f-4a1b-8c2d-3e4f5a6b7c8d"
NIC_B = "9f8e7d6c-5b4a-4f3e-8d2c-1b0a9f8e7d6c"
MAC_A = "52:54:00:00:05:0a"
MAC_B = "52:54:00:00:05:0b"


def nic(nic_id: str = NIC_A, mac: str = MAC_A, **kw: Any) -> NicSpec:
    return NicSpec(nic_id=nic_id, mac=mac, network=NicNetwork.DIRECT, **kw)


_STEP = step_script('DirectNetworkBackend(Path(state), "up0", "yunbr0", blocked=["MGMT"])', """\
    if op == "learned":
        return [a.model_dump() for a in await b.learned()]
    if op == "snoop":
        # The agent runs (snooping); the LAN's DHCP server sends an ACK to the VM.
        await b.ensure_network()
        lan_ns, frame = arg
        send = ("import socket,sys; s=socket.socket(socket.AF_PACKET,socket.SOCK_RAW);"
                "s.bind(('lan0',0)); s.send(bytes.fromhex(sys.argv[1]))")
        subprocess.run(["ip", "netns", "exec", lan_ns, sys.executable, "-c", send, frame],
                       check=True)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not await b.learned():
            time.sleep(0.2)
        return [a.model_dump() for a in await b.learned()]
""").replace("MGMT", MGMT)


class RealDirect(NetnsBackend):
    """The real direct backend in namespace ``ns``, its uplink ``up0`` a veth to the
    LAN namespace ``lan_ns`` (``lan0``, the LAN host 192.168.50.1)."""

    def __init__(self, ns: str, lan_ns: str, state: Path) -> None:
        super().__init__(ns, state, step=_STEP)
        self.lan_ns = lan_ns

    async def learned(self) -> list[LearnedAddress]:
        return [LearnedAddress(**a) for a in self._call("learned")]

    async def lan_dhcp(self, mac: str) -> str:
        """The LAN's DHCP server acks ``mac`` an address; the one it gave."""
        ip = "192.168.50.77"
        self._call("snoop", [self.lan_ns, dhcp_frame(mac, ip, dst_mac=mac).hex()])
        return ip


class SimDirect(SimDirectBackend):
    async def lan_dhcp(self, mac: str) -> str:
        """The simulated LAN's DHCP server gave the port its lease at ensure_port."""
        return self.leases[mac]


@pytest.fixture(params=["sim", "real"])
async def backend(request: pytest.FixtureRequest) -> AsyncIterator[Any]:
    if request.param == "sim":
        b = SimDirect(str(LAN))
        await b.ensure_network()
        yield b
        return
    async for nb in _real_backend():
        yield nb


@pytest.fixture
async def real() -> AsyncIterator[RealDirect]:
    """The real backend alone, for what only a real host shows."""
    async for nb in _real_backend():
        yield nb


def _ns(ns: str, *argv: str) -> str:
    return run(["ip", "netns", "exec", ns, *argv], timeout=30).stdout


async def _real_backend() -> AsyncIterator[RealDirect]:
    if os.geteuid() != 0:
        pytest.skip("the real backend needs root")
    for tool in ("nft", "ip"):
        if shutil.which(tool) is None:
            pytest.skip(f"needs {tool}")
    tag = uuid.uuid4().hex[:8]
    ns, lan_ns = f"yun-dir-{tag}", f"yun-dlan-{tag}"
    root = Path(tempfile.mkdtemp(prefix="yun-dir-", dir="/tmp"))
    run(["ip", "netns", "add", ns])
    run(["ip", "netns", "add", lan_ns])
    try:
        _ns(ns, "ip", "link", "set", "lo", "up")
        _ns(ns, "ip", "link", "add", "up0", "type", "veth", "peer", "name", "lan0",
            "netns", lan_ns)
        _ns(ns, "ip", "addr", "add", f"{NODE_IP}/24", "dev", "up0")
        _ns(ns, "ip", "link", "set", "up0", "up")
        _ns(ns, "ip", "route", "add", "default", "via", LAN_HOST)
        _ns(ns, "ip", "route", "add", "198.51.100.0/24", "dev", "up0")  # static, on-link
        _ns(lan_ns, "ip", "addr", "add", f"{LAN_HOST}/24", "dev", "lan0")
        _ns(lan_ns, "ip", "link", "set", "lan0", "up")
        nb = RealDirect(ns, lan_ns, root / "direct")
        await nb.ensure_network()
        yield nb
        await nb.teardown()
        # No tap, no table, no state left; the bridge keeps the node's address.
        assert TAP_PREFIX not in nb.sh("ip", "-o", "link")
        assert "yun_direct" not in nb.sh("nft", "list", "tables")
        assert not (root / "direct" / "ports").exists()
        assert f"{NODE_IP}/24" in nb.sh("ip", "-4", "addr", "show", "dev", "yunbr0")
    finally:
        run(["ip", "netns", "del", ns], check=False)
        run(["ip", "netns", "del", lan_ns], check=False)
        shutil.rmtree(root, ignore_errors=True)


# --------------------------------------------------------------------------- contract


async def test_port_is_a_tap_and_idempotent(backend: Any) -> None:
    resolved = await backend.ensure_port(VM_A, nic())
    # bridge None: the tap is made (and joined to the bridge) by the backend; libvirt
    # only opens it (<interface type='ethernet'>, managed='no').
    assert resolved == ResolvedNic(nic_id=NIC_A, mac=MAC_A, bridge=None,
                                   tap=tap_name(NIC_A, TAP_PREFIX))
    assert resolved.tap == "yd1a2b3c4d5e"
    assert await backend.ensure_port(VM_A, nic()) == resolved
    assert await backend.vm_ports() == {VM_A: [MAC_A]}


async def test_bad_ports_are_refused(backend: Any) -> None:
    with pytest.raises(NetworkError, match="takes its address from the LAN's DHCP") as err:
        await backend.ensure_port(VM_A, nic(ip="192.168.50.20"))
    assert NIC_A in str(err.value) and VM_A in str(err.value)
    with pytest.raises(NetworkError, match="in the sandbox network, not the direct one"):
        await backend.ensure_port(VM_A, NicSpec(nic_id=NIC_A, mac=MAC_A, ip="10.64.0.5"))
    with pytest.raises(NetworkError, match="bad VM uuid"):
        await backend.ensure_port("../etc", nic())
    await backend.ensure_port(VM_A, nic())
    with pytest.raises(NetworkError, match=f"MAC {MAC_A} is already used by NIC {NIC_A}"):
        await backend.ensure_port(VM_B, nic(NIC_B))
    assert await backend.vm_ports() == {VM_A: [MAC_A]}


async def test_release_one_port_then_all(backend: Any) -> None:
    await backend.ensure_port(VM_A, nic())
    await backend.ensure_port(VM_A, nic(NIC_B, MAC_B))
    await backend.release_port(VM_A, NIC_B)
    await backend.release_port(VM_A, NIC_B)  # idempotent
    assert await backend.vm_ports() == {VM_A: [MAC_A]}
    await backend.release_ports(VM_A)
    await backend.release_ports(VM_A)  # idempotent
    assert await backend.vm_ports() == {}
    # The MAC is free again.
    await backend.ensure_port(VM_B, nic(NIC_B, MAC_A))


async def test_the_lan_dhcp_address_is_learned_and_forgotten(backend: Any) -> None:
    await backend.ensure_port(VM_A, nic())
    ip = await backend.lan_dhcp(MAC_A)
    assert ipaddress.IPv4Address(ip) in LAN and ip != LAN_HOST
    assert await backend.learned() == [LearnedAddress(mac=MAC_A, ip=ip)]
    await backend.release_ports(VM_A)
    assert await backend.learned() == []


# --------------------------------------------------------------------------- real only


async def test_real_bridge_takes_the_uplink_and_keeps_the_node_connected(
        real: RealDirect) -> None:
    links = {link["ifname"]: link for link in json.loads(real.sh("ip", "-j", "link"))}
    assert links["up0"].get("master") == "yunbr0"
    assert links["yunbr0"]["address"] == links["up0"]["address"]
    assert f"{NODE_IP}/24" in real.sh("ip", "-4", "addr", "show", "dev", "yunbr0")
    assert "inet " not in real.sh("ip", "-4", "addr", "show", "dev", "up0")
    routes = real.sh("ip", "-4", "route")
    assert f"default via {LAN_HOST} dev yunbr0" in routes
    assert "198.51.100.0/24 dev yunbr0" in routes and "dev up0" not in routes
    real.sh("ping", "-c", "1", "-W", "5", LAN_HOST)  # the node still reaches its LAN
    # Again: nothing changes, the table (and its counters) stay.
    table = real.sh("nft", "-a", "list", "table", "bridge", "yun_direct")
    await real.ensure_network()
    assert real.sh("nft", "-a", "list", "table", "bridge", "yun_direct") == table
    assert real.sh("ip", "-4", "route") .count("default") == 1


async def test_real_blocked_networks_spare_the_lan(real: RealDirect) -> None:
    await real.ensure_network(SandboxSettings(subnet="10.64.3.0/24", gateway="10.64.3.1",
                                              blocked=["10.64.0.0/10", "192.168.0.0/16"]))

    def blocked(ip: str) -> bool:
        res = run(["ip", "netns", "exec", real.ns, "nft", "get", "element", "bridge",
                   "yun_direct", "blocked", f"{{ {ip} }}"], check=False, timeout=30)
        return res.returncode == 0

    assert blocked(NODE_IP) and blocked(MGMT.split("/")[0])  # the node, [node] direct_blocked
    assert blocked("10.64.9.9") and blocked("192.168.51.1")
    assert not blocked("192.168.50.77") and not blocked(LAN_HOST)


# What a guest sends, written into its tap from the guest side (opened through
# /dev/net/tun as QEMU does): each frame given in hex; then it waits for an ARP reply to
# the guest's MAC (asking again with the last frame) and prints "arp-reply" when one
# comes back through the bridge.
_GUEST = r"""
import fcntl, os, select, struct, sys, time
tap, mac = sys.argv[1], bytes.fromhex(sys.argv[2].replace(":", ""))
fd = os.open("/dev/net/tun", os.O_RDWR)
fcntl.ioctl(fd, 0x400454CA, struct.pack("16sH", tap.encode(), 0x0002 | 0x1000))
frames = [bytes.fromhex(f) for f in sys.argv[3:]]
time.sleep(0.5)  # the bridge port comes up with the tap's carrier (opening it)
for frame in frames:
    os.write(fd, frame)
deadline = time.monotonic() + 10
while time.monotonic() < deadline:
    if not select.select([fd], [], [], 1)[0]:
        os.write(fd, frames[-1])  # ask the LAN again
        continue
    if True:
        got = os.read(fd, 2048)
        if got[12:14] == b"\x08\x06" and got[20:22] == b"\x00\x02" and got[:6] == mac:
            print("arp-reply")
            sys.exit(0)
print("none")
"""


def _arp_request(src_mac: str, src_ip: str, target_ip: str) -> bytes:
    mac = bytes.fromhex(src_mac.replace(":", ""))
    arp = (bytes.fromhex("0001080006040001") + mac + ipaddress.IPv4Address(src_ip).packed
           + bytes(6) + ipaddress.IPv4Address(target_ip).packed)
    return b"\xff" * 6 + mac + b"\x08\x06" + arp


def _tcp_syn(src_mac: str, dst_mac: str, src_ip: str, dst_ip: str, dport: int) -> bytes:
    tcp = bytes.fromhex(f"c350{dport:04x}000000010000000050022000") + bytes(4)
    ip = (bytes.fromhex("45000028000140004006") + bytes(2)
          + ipaddress.IPv4Address(src_ip).packed + ipaddress.IPv4Address(dst_ip).packed)
    return (bytes.fromhex(dst_mac.replace(":", "")) + bytes.fromhex(src_mac.replace(":", ""))
            + b"\x08\x00" + ip + tcp)


def _from(mac: str, frame: bytes) -> bytes:
    """``frame`` with its source MAC replaced."""
    return frame[:6] + bytes.fromhex(mac.replace(":", "")) + frame[12:]


def _counters(real: RealDirect) -> dict[str, int]:
    out = real.sh("nft", "-j", "list", "counters", "table", "bridge", "yun_direct")
    return {i["counter"]["name"]: int(i["counter"]["packets"])
            for i in json.loads(out)["nftables"] if "counter" in i}


async def test_real_tap_filters_and_reaches_the_lan(real: RealDirect) -> None:
    tap = tap_name(NIC_A, TAP_PREFIX)
    await real.ensure_port(VM_A, nic())
    link = json.loads(real.sh("ip", "-j", "link", "show", "dev", tap))[0]
    assert link.get("master") == "yunbr0" and link["address"] == tap_mac(MAC_A)
    assert f'"{tap}" . {MAC_A}' in real.sh("nft", "list", "set", "bridge", "yun_direct",
                                           "allowed")
    bridge_mac = json.loads(real.sh("ip", "-j", "link", "show", "dev", "yunbr0"))[0]["address"]
    vm_ip = "192.168.50.77"
    before = _counters(real)
    frames = [
        _arp_request("52:54:00:99:99:99", vm_ip, LAN_HOST),  # not its MAC: spoofed
        _from(MAC_A, dhcp_frame("52:54:00:00:05:ff", "192.168.50.88", 2,
                                dst_mac="ff:ff:ff:ff:ff:ff")),  # its own DHCP server
        _tcp_syn(MAC_A, bridge_mac, vm_ip, NODE_IP, 7720),  # the agent port: blocked
        _arp_request(MAC_A, vm_ip, NODE_IP),  # the host itself (its copy): to_host
        _arp_request(MAC_A, vm_ip, LAN_HOST),  # the LAN: answered
    ]
    out = real.sh(sys.executable, "-c", _GUEST, tap, MAC_A, *(f.hex() for f in frames))
    assert out.strip() == "arp-reply", out
    after = _counters(real)
    for name in ("spoofed", "rogue_dhcp", "blocked", "to_host"):
        assert after[name] > before.get(name, 0), (name, before, after)
    await real.release_ports(VM_A)
    assert tap not in real.sh("ip", "-o", "link")
    assert tap not in real.sh("nft", "list", "set", "bridge", "yun_direct", "allowed")
