"""One contract suite for both sandbox network backends: the simulated twin and the real
one (netlink, nftables, dnsmasq) inside a fresh network namespace.

The real backend acts on the namespace it runs in, so each of its calls runs in a short
Python process under ``ip netns exec``: every call is also an agent restart, which
shows that its state (hosts files, forwards, settings) is all on disk.
"""

from __future__ import annotations

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

from yun.node.hypervisor.base import ResolvedNic
from yun.node.network.base import NetworkError
from yun.node.network.ports import tap_name
from yun.node.network.sim import SimSandboxBackend
from yun.proto.messages import NicSpec
from yun.proto.network import Exposure, NodeForward, SandboxSettings
from yun.util.run import run

SETTINGS = SandboxSettings(subnet="10.64.3.0/24", gateway="10.64.3.1",
                           blocked=["192.168.0.0/16"])
VM_A = "aaaaaaaa-0000-4000-8000-000000000001"
VM_B = "bbbbbbbb-0000-4000-8000-000000000002"
NIC_A = "1a2b3c4d-5e6f-4a1b-8c2d-3e4f5a6b7c8d"
NIC_B = "9f8e7d6c-5b4a-4f3e-8d2c-1b0a9f8e7d6c"


def nic(nic_id: str = NIC_A, mac: str = "52:54:00:00:03:0a", ip: str = "10.64.3.10",
        **kw: Any) -> NicSpec:
    return NicSpec(nic_id=nic_id, mac=mac, ip=ip, **kw)


_STEP = r"""
import asyncio, json, subprocess, sys, time
from pathlib import Path
from yun.node.network.base import NetworkError
from yun.node.network.direct import DirectNetworkBackend
from yun.node.network.sandbox import SandboxNetworkBackend
from yun.proto.messages import NicSpec
from yun.proto.network import NodeForward, SandboxSettings

state, op, arg = sys.argv[1:4]
arg = json.loads(arg)
b = BACKEND

async def extra():
EXTRA
    raise SystemExit(f"unknown op {op}")

async def main():
    if op == "ensure_network":
        return await b.ensure_network(SandboxSettings(**arg) if arg else None)
    if op == "ensure_port":
        r = await b.ensure_port(arg[0], NicSpec(**arg[1]))
        return {"nic_id": r.nic_id, "mac": r.mac, "bridge": r.bridge, "tap": r.tap}
    if op == "release_port":
        return await b.release_port(*arg)
    if op == "release_ports":
        return await b.release_ports(arg)
    if op == "vm_ports":
        return await b.vm_ports()
    if op == "teardown":
        return await b.teardown()
    return await extra()

try:
    print(json.dumps({"ok": asyncio.run(main())}))
except NetworkError as exc:
    print(json.dumps({"error": str(exc)}))
"""


def step_script(backend: str, extra_ops: str) -> str:
    """The script that runs one call of the contract against a real backend in its own
    process: ``backend`` is the expression making it (from ``state``), ``extra_ops`` the
    body (indented 4) of the calls only that backend has (``op``, ``arg``, ``b``)."""
    return _STEP.replace("BACKEND", backend).replace("EXTRA", extra_ops)


_SANDBOX_STEP = step_script("SandboxNetworkBackend(Path(state))", """\
    if op == "set_forwards":
        return await b.set_forwards(arg[0], [NodeForward(**f) for f in arg[1]])
""")


class NetnsBackend:
    """The real backend, one process per call, in network namespace ``ns``; ``step`` is
    the script running one call (the direct backend's contract suite gives its own)."""

    def __init__(self, ns: str, state: Path, step: str = _SANDBOX_STEP) -> None:
        self.ns, self.state, self.step = ns, state, step

    def _call(self, op: str, arg: Any = None) -> Any:
        res = run(["ip", "netns", "exec", self.ns, sys.executable, "-c", self.step,
                   str(self.state), op, json.dumps(arg)], timeout=60,
                  env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])})
        out = json.loads(res.stdout.strip().splitlines()[-1])
        if "error" in out:
            raise NetworkError(out["error"])
        return out["ok"]

    def sh(self, *argv: str) -> str:
        return run(["ip", "netns", "exec", self.ns, *argv], timeout=30).stdout

    async def ensure_network(self, settings: SandboxSettings | None = None) -> None:
        self._call("ensure_network", settings.model_dump(mode="json") if settings else None)

    async def ensure_port(self, vm: str, spec: NicSpec) -> ResolvedNic:
        return ResolvedNic(**self._call("ensure_port", [vm, spec.model_dump(mode="json")]))

    async def release_port(self, vm: str, nic_id: str) -> None:
        self._call("release_port", [vm, nic_id])

    async def release_ports(self, vm: str) -> None:
        self._call("release_ports", vm)

    async def vm_ports(self) -> dict[str, list[str]]:
        return dict(self._call("vm_ports"))

    async def set_forwards(self, vm: str, forwards: list[NodeForward]) -> None:
        self._call("set_forwards", [vm, [f.model_dump(mode="json") for f in forwards]])

    async def teardown(self) -> None:
        self._call("teardown")


@pytest.fixture(params=["sim", "real"])
async def backend(request: pytest.FixtureRequest) -> AsyncIterator[Any]:
    if request.param == "sim":
        b = SimSandboxBackend()
        await b.ensure_network(SETTINGS)
        yield b
        return
    async for nb in _real_backend():
        yield nb


@pytest.fixture
async def real() -> AsyncIterator[Any]:
    """The real backend alone, for what only a real host shows (taps, routes, DHCP)."""
    async for nb in _real_backend():
        yield nb


async def _real_backend() -> AsyncIterator[Any]:
    if os.geteuid() != 0:
        pytest.skip("the real backend needs root")
    for tool in ("nft", "dnsmasq", "ip"):
        if shutil.which(tool) is None:
            pytest.skip(f"needs {tool}")
    ns = f"yun-sbx-{uuid.uuid4().hex[:8]}"
    # dnsmasq drops root: its state directory must be reachable by "nobody".
    root = Path(tempfile.mkdtemp(prefix="yun-sbx-", dir="/tmp"))
    os.chmod(root, 0o755)
    run(["ip", "netns", "add", ns])
    try:
        run(["ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up"])
        nb = NetnsBackend(ns, root / "net")
        await nb.ensure_network(SETTINGS)
        yield nb
        await nb.teardown()
        # Nothing left: no tap, no table, no rule, no dnsmasq.
        assert "ys" not in nb.sh("ip", "-o", "link")
        assert "yun_sandbox" not in nb.sh("nft", "list", "tables")
        assert "7077" not in nb.sh("ip", "rule")
    finally:
        pid_file = root / "net" / "dnsmasq.pid"
        if pid_file.exists():
            run(["kill", pid_file.read_text().strip()], check=False)
        run(["ip", "netns", "del", ns], check=False)
        shutil.rmtree(root, ignore_errors=True)


async def test_port_is_a_routed_tap_and_idempotent(backend: Any) -> None:
    resolved = await backend.ensure_port(VM_A, nic())
    assert resolved == ResolvedNic(nic_id=NIC_A, mac="52:54:00:00:03:0a", bridge=None,
                                   tap=tap_name(NIC_A))
    assert resolved.tap == "ys1a2b3c4d5e"
    assert await backend.ensure_port(VM_A, nic()) == resolved
    assert await backend.vm_ports() == {VM_A: ["52:54:00:00:03:0a"]}


@pytest.mark.parametrize(("ip", "why"), [
    ("10.64.4.5", "not a VM address of the node's sandbox subnet 10.64.3.0/24"),
    ("10.64.3.1", "not a VM address"),  # the gateway
    ("10.64.3.0", "not a VM address"),
    ("10.64.3.255", "not a VM address"),
    # The sim used to raise a bare ValueError here (an answer 500, not a clear error).
    ("10.64.3.300", "'10.64.3.300' is not an IPv4 address"),
])
async def test_bad_addresses_are_refused(backend: Any, ip: str, why: str) -> None:
    with pytest.raises(NetworkError, match=why) as err:
        await backend.ensure_port(VM_A, nic(ip=ip))
    assert NIC_A in str(err.value) and VM_A in str(err.value)
    assert await backend.vm_ports() == {}


async def test_address_and_mac_held_by_another_vm_are_refused(backend: Any) -> None:
    await backend.ensure_port(VM_A, nic(extra_ips=["10.64.3.11"]))
    with pytest.raises(NetworkError, match=f"10.64.3.11 is already held by NIC {NIC_A}"):
        await backend.ensure_port(VM_B, nic(NIC_B, "52:54:00:00:03:0b", "10.64.3.11"))
    with pytest.raises(NetworkError, match="MAC 52:54:00:00:03:0a is already used"):
        await backend.ensure_port(VM_B, nic(NIC_B, ip="10.64.3.20"))
    with pytest.raises(NetworkError, match="bad VM uuid"):
        await backend.ensure_port("../etc", nic(NIC_B, "52:54:00:00:03:0b", "10.64.3.20"))


async def test_forwards_are_checked_and_released_with_the_vm(backend: Any) -> None:
    await backend.ensure_port(VM_A, nic())
    await backend.ensure_port(VM_B, nic(NIC_B, "52:54:00:00:03:0b", "10.64.3.20",
                                        exposure=Exposure.MONO))
    web = NodeForward(node_port=40001, vm_ip="10.64.3.10", vm_port=80)
    await backend.set_forwards(VM_A, [web])
    await backend.set_forwards(VM_A, [web])  # idempotent
    with pytest.raises(NetworkError, match="not an address of VM"):
        await backend.set_forwards(VM_B, [web.model_copy(update={"vm_ip": "10.64.3.10"})])
    with pytest.raises(NetworkError, match=f"already forwards to VM {VM_A}"):
        await backend.set_forwards(VM_B, [web.model_copy(update={"vm_ip": "10.64.3.20"})])
    await backend.release_ports(VM_A)
    await backend.release_ports(VM_A)  # idempotent
    assert await backend.vm_ports() == {VM_B: ["52:54:00:00:03:0b"]}
    # The node port and the address are free again.
    await backend.set_forwards(VM_B, [web.model_copy(update={"vm_ip": "10.64.3.20"})])
    await backend.ensure_port(VM_A, nic(NIC_A, "52:54:00:00:03:0c", "10.64.3.10"))


async def test_release_one_port_keeps_the_others(backend: Any) -> None:
    await backend.ensure_port(VM_A, nic())
    await backend.ensure_port(VM_A, nic(NIC_B, "52:54:00:00:03:0b", "10.64.3.20"))
    await backend.release_port(VM_A, NIC_B)
    await backend.release_port(VM_A, NIC_B)  # idempotent
    assert await backend.vm_ports() == {VM_A: ["52:54:00:00:03:0a"]}


# --------------------------------------------------------------------------- real only


async def test_real_tap_routes_rules_and_cleanup(real: NetnsBackend) -> None:
    tap = tap_name(NIC_A)
    await real.ensure_port(VM_A, nic(extra_ips=["10.64.3.11"], exposure=Exposure.SHARE))
    addr = json.loads(real.sh("ip", "-j", "addr", "show", "dev", tap))[0]
    assert "UP" in addr["flags"]
    (a,) = [a for a in addr["addr_info"] if a["family"] == "inet"]
    assert (a["local"], a["prefixlen"], a.get("noprefixroute")) == ("10.64.3.1", 24, True)
    routes = real.sh("ip", "-4", "route", "show", "dev", tap)
    assert "10.64.3.10 " in routes and "10.64.3.11 " in routes
    assert "10.64.3.0/24" not in real.sh("ip", "-4", "route")  # no prefix route
    assert real.sh("cat", f"/proc/sys/net/ipv4/conf/{tap}/proxy_arp").strip() == "1"
    assert real.sh("cat", "/proc/sys/net/ipv4/ip_forward").strip() == "1"
    table = real.sh("nft", "list", "table", "inet", "yun_sandbox")
    assert f'"{tap}" . 10.64.3.11' in table and "counter name \"vm_to_vm\" drop" in table
    assert "192.168.0.0/16" in table
    pid = int((real.state / "dnsmasq.pid").read_text())
    assert "--interface=ys*" in real.sh("cat", f"/proc/{pid}/cmdline")
    assert "from 10.64.3.0/24 lookup 7077" in real.sh("ip", "rule")
    await real.set_forwards(VM_A, [NodeForward(node_port=40001, vm_ip="10.64.3.10",
                                               vm_port=80)])
    assert "tcp dport 40001 dnat ip to 10.64.3.10:80" in real.sh(
        "nft", "list", "chain", "inet", "yun_sandbox", "node_ports")
    # A repeated ensure_network keeps the table (and its counters): no rewrite.
    handle = real.sh("nft", "-a", "list", "chain", "inet", "yun_sandbox", "forward")
    await real.ensure_network(SETTINGS)
    assert real.sh("nft", "-a", "list", "chain", "inet", "yun_sandbox", "forward") == handle
    # Routers come: the VMs' default route is ECMP over them.
    run(["ip", "netns", "exec", real.ns, "ip", "link", "add", "lan0", "type", "veth",
         "peer", "name", "lan1"])
    run(["ip", "netns", "exec", real.ns, "ip", "addr", "add", "172.30.0.2/24", "dev", "lan0"])
    run(["ip", "netns", "exec", real.ns, "ip", "link", "set", "lan0", "up"])
    await real.ensure_network(SETTINGS.model_copy(update={"routers": ["172.30.0.8",
                                                                      "172.30.0.9"]}))
    table7077 = real.sh("ip", "-4", "route", "show", "table", "7077")
    assert "172.30.0.8" in table7077 and "172.30.0.9" in table7077
    # The node's own address is blocked for VMs.
    assert "172.30.0.2" in real.sh("nft", "list", "set", "inet", "yun_sandbox", "blocked")
    await real.release_ports(VM_A)
    assert tap not in real.sh("ip", "-o", "link")
    assert "10.64.3.10" not in real.sh("ip", "-4", "route")
    table = real.sh("nft", "list", "table", "inet", "yun_sandbox")
    assert tap not in table and "40001" not in table
    assert not (real.state / "hosts" / VM_A).exists()


# A guest's DHCPDISCOVER, written into the tap from its guest side (the tap is opened
# through /dev/net/tun as QEMU does); prints the first DHCP answer's yiaddr and type.
_DHCP_CLIENT = r"""
import fcntl, os, select, struct, sys, time
tap, mac = sys.argv[1], bytes.fromhex(sys.argv[2].replace(":", ""))
fd = os.open("/dev/net/tun", os.O_RDWR)
fcntl.ioctl(fd, 0x400454CA, struct.pack("16sH", tap.encode(), 0x0002 | 0x1000))  # TAP, NO_PI
xid = 0x5EED0003
bootp = struct.pack("!BBBBIHH4s4s4s4s16s64s128s", 1, 1, 6, 0, xid, 0, 0x8000, bytes(4),
                    bytes(4), bytes(4), bytes(4), mac + bytes(10), b"", b"")
bootp += bytes.fromhex("63825363") + bytes([53, 1, 1, 255])
udp = struct.pack("!HHHH", 68, 67, 8 + len(bootp), 0) + bootp
ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 1, 0, 64, 17, 0, bytes(4),
                 b"\xff" * 4)
s = sum(struct.unpack("!10H", ip)); s = (s >> 16) + (s & 0xFFFF); s += s >> 16
ip = ip[:10] + struct.pack("!H", ~s & 0xFFFF) + ip[12:]
frame = b"\xff" * 6 + mac + b"\x08\x00" + ip + udp
deadline = time.monotonic() + 20
sent = 0.0
while time.monotonic() < deadline:
    if time.monotonic() - sent > 2:  # dnsmasq may still be binding the new tap
        os.write(fd, frame)
        sent = time.monotonic()
    if not select.select([fd], [], [], 0.5)[0]:
        continue
    got = os.read(fd, 2048)
    if got[12:14] != b"\x08\x00" or got[23] != 17:
        continue
    ihl = (got[14] & 0x0F) * 4
    udp_at = 14 + ihl
    if struct.unpack("!H", got[udp_at:udp_at + 2])[0] != 67:
        continue
    b = got[udp_at + 8:]
    if struct.unpack("!I", b[4:8])[0] != xid:
        continue
    opts, msg_type, i = b[240:], None, 0
    while i < len(opts) and opts[i] != 255:
        if opts[i] == 0:
            i += 1
            continue
        if opts[i] == 53:
            msg_type = opts[i + 2]
        i += 2 + opts[i + 1]
    print(".".join(str(x) for x in b[16:20]), msg_type)
    sys.exit(0)
print("none")
"""


async def test_real_guest_side_discover_gets_an_offer(real: NetnsBackend) -> None:
    """dnsmasq (one daemon for every ys* tap) answers a DISCOVER that enters the tap
    from the guest side with an OFFER of the VM's static lease, through the table's
    guard and input chains."""
    await real.ensure_port(VM_A, nic())
    out = real.sh(sys.executable, "-c", _DHCP_CLIENT, tap_name(NIC_A), "52:54:00:00:03:0a")
    assert out.split() == ["10.64.3.10", "2"], out  # yiaddr, DHCPOFFER
    # An unknown MAC gets nothing: the leases are static.
    out = real.sh(sys.executable, "-c", _DHCP_CLIENT.replace("deadline = time.monotonic() + 20",
                                                             "deadline = time.monotonic() + 6"),
                  tap_name(NIC_A), "52:54:00:00:03:ff")
    assert out.strip() == "none", out
