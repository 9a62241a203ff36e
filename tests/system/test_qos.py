"""QoS measured inside real guests (QEMU under TCG here): CPU levels, disk IOPS, bandwidth.

One node host (its own libvirtd in a namespace of a fresh test topology) holds four
guests booted in parallel and shared by the module:

* ``cpu-high``, ``cpu-medium``, ``cpu-low``: a shell busy loop started by their NoCloud
  user-data; paused whenever a test does not measure them, so they load nothing else;
* ``io``: a data disk written with ``dd oflag=direct bs=4k`` in a loop, and a NIC on a
  bridge of the node's namespace, over which it sends zeros with ``nc`` to a sink on the
  bridge's address (traffic never leaves the test's namespace).

Figures are read from the host side, where the limits act: libvirt's CPU accounting of
each domain (its cgroup), QEMU's block statistics of the data disk (write requests), and
the bytes the bridge received from the guest after the tap's policer. Each test prints
what it measured. Everything (guests, libvirtd, namespace, files) is removed afterwards,
also when a test fails: the node host and the topology are context managers.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import sys
import time
import uuid as uuidlib
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import libvirt
import pytest

from yun.node.hypervisor.base import ResolvedDisk, ResolvedNic
from yun.node.hypervisor.libvirt.driver import LibvirtDriver
from yun.proto.messages import CpuQos, DomainSpec, QosSpec
from yun.testing.guest import READY_MARKER, ensure_guest_image
from yun.testing.netns import Namespace, Topology
from yun.testing.nodehost import NodeHost
from yun.util.run import run

pytestmark = pytest.mark.system

BOOT_TIMEOUT = 240.0  # four TCG guests booting at once on two loaded cores
BRIDGE = "yqosbr0"
NODE_IP = "10.98.0.1"  # the bridge's address inside the node host's namespace
GUEST_IP = "10.98.0.2"
SINK_PORT = 5001
DATA_DISK_MIB = 64

# The busy loop of the CPU guests: one shell spinning on the guest's only vCPU.
CPU_USER_DATA = "#!/bin/sh\n(while :; do :; done) </dev/null >/dev/null 2>&1 &\n"
# The I/O guest: no DHCP on this bridge, so a static address (udhcpc stopped so that it
# cannot deconfigure it); 4 KiB O_DIRECT writes to the data disk (vdb) and a TCP stream
# to the sink on the node, each restarted in a loop.
IO_USER_DATA = f"""#!/bin/sh
killall udhcpc 2>/dev/null
ifconfig eth0 {GUEST_IP} netmask 255.255.255.0 up
(while :; do dd if=/dev/zero of=/dev/vdb bs=4k count=4096 oflag=direct 2>/dev/null; done) \
  </dev/null >/dev/null 2>&1 &
(while :; do nc {NODE_IP} {SINK_PORT} </dev/zero; sleep 1; done) </dev/null >/dev/null 2>&1 &
"""

# Runs in the node's namespace: accepts connections and throws the bytes away.
SINK = r"""
import socket, sys, threading
srv = socket.socket()
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind((sys.argv[1], int(sys.argv[2])))
srv.listen(8)
def drain(conn):
    with conn:
        while conn.recv(1 << 16):
            pass
while True:
    conn, _ = srv.accept()
    threading.Thread(target=drain, args=(conn,), daemon=True).start()
"""


@dataclass
class Guest:
    name: str
    uuid: str
    qos: QosSpec


@dataclass
class Deployment:
    nodehost: NodeHost
    ns: Namespace
    guests: dict[str, Guest]

    def conn(self) -> libvirt.virConnect:
        return libvirt.open(self.nodehost.libvirt_uri)


def _need_tools() -> None:
    if os.geteuid() != 0:
        pytest.skip("system tests need root")
    for tool in ("ip", "libvirtd", "virtlogd", "qemu-system-x86_64", "qemu-img", "genisoimage",
                 "tc"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed")
    if (os.cpu_count() or 1) < 2:
        pytest.skip("the CPU test pins guests to one core and needs a second for the rest")


def _seed(path: Path, name: str, user_data: str) -> Path:
    """A NoCloud seed (ISO 9660 labelled cidata) whose user-data the guest runs once."""
    work = path.with_suffix(".d")
    work.mkdir()
    (work / "meta-data").write_text(f"instance-id: iid-{name}\nlocal-hostname: {name}\n")
    (work / "user-data").write_text(user_data)
    run(["genisoimage", "-quiet", "-o", str(path), "-V", "cidata", "-R", "-J",
         str(work / "meta-data"), str(work / "user-data")])
    return path


def _disks(nodehost: NodeHost, vm: str, name: str, user_data: str,
           data_disk: bool) -> list[ResolvedDisk]:
    base = ensure_guest_image()
    root = nodehost.disk_dir / f"{vm}.qcow2"
    run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(base), str(root)])
    disks = [ResolvedDisk("root", root, "qcow2")]
    if data_disk:
        data = nodehost.disk_dir / f"{vm}-data.raw"
        run(["qemu-img", "create", "-q", "-f", "raw", str(data), f"{DATA_DISK_MIB}M"])
        disks.append(ResolvedDisk("data", data, "raw"))
    seed = _seed(nodehost.disk_dir / f"{vm}-seed.iso", name, user_data)
    disks.append(ResolvedDisk("seed", seed, "raw"))
    for path in nodehost.disk_dir.iterdir():
        path.chmod(0o666 if path.is_file() else 0o777)  # QEMU runs as libvirt-qemu
    return disks


async def _wait_ready(driver: LibvirtDriver, vm: str) -> None:
    deadline = time.monotonic() + BOOT_TIMEOUT
    while time.monotonic() < deadline:
        log = await driver.console_log(vm, 1 << 20)
        if READY_MARKER in log and "YUN-GUEST-USERDATA" in log:
            return
        await asyncio.sleep(1.0)
    tail = (await driver.console_log(vm, 3000))[-3000:]
    raise AssertionError(f"guest {vm} not ready within {BOOT_TIMEOUT:.0f} s:\n{tail}")


@pytest.fixture(scope="module")
def deployment() -> Iterator[Deployment]:
    """The node host, the bridge and sink, and four running guests (CPU ones paused)."""
    _need_tools()
    with Topology() as topo:
        ns = topo.add_namespace("qos")
        ns.run(["ip", "link", "add", BRIDGE, "type", "bridge"])
        ns.run(["ip", "addr", "add", f"{NODE_IP}/24", "dev", BRIDGE])
        ns.run(["ip", "link", "set", BRIDGE, "up"])
        sink = ns.popen([sys.executable, "-c", SINK, NODE_IP, str(SINK_PORT)])
        try:
            with NodeHost(ns.name, name="qos") as nodehost:
                yield asyncio.run(_boot(nodehost, ns))
        finally:
            sink.kill()
            sink.wait(10)


async def _boot(nodehost: NodeHost, ns: Namespace) -> Deployment:
    driver = LibvirtDriver(**nodehost.driver_options(  # type: ignore[arg-type]
        accel="tcg", netns=ns.name))
    await driver.open()
    try:
        guests: dict[str, Guest] = {}
        for level in (CpuQos.HIGH, CpuQos.MEDIUM, CpuQos.LOW):
            name, vm = f"cpu-{level.value}", str(uuidlib.uuid4())
            qos = QosSpec(cpu=level)
            await driver.ensure_defined(
                DomainSpec(uuid=vm, name=name, vcpus=1, memory_mb=128, vnc=False, qos=qos),
                _disks(nodehost, vm, name, CPU_USER_DATA, data_disk=False), [])
            guests[name] = Guest(name, vm, qos)
        vm = str(uuidlib.uuid4())
        qos = QosSpec(cpu=CpuQos.HIGH, write_iops_sec=50, bandwidth_kbit=10_000)
        await driver.ensure_defined(
            DomainSpec(uuid=vm, name="io", vcpus=1, memory_mb=128, vnc=False, qos=qos),
            _disks(nodehost, vm, "io", IO_USER_DATA, data_disk=True),
            [ResolvedNic("n1", "52:54:00:98:00:02", BRIDGE, f"yq{vm[:8]}")])
        guests["io"] = Guest("io", vm, qos)
        started = time.monotonic()
        for guest in guests.values():
            await driver.start(guest.uuid)
        await asyncio.gather(*(_wait_ready(driver, g.uuid) for g in guests.values()))
        print(f"\n{len(guests)} guests booted in parallel under TCG in "
              f"{time.monotonic() - started:.0f} s")
        dep = Deployment(nodehost, ns, guests)
        pause(dep, "cpu-high", "cpu-medium", "cpu-low")
        return dep
    finally:
        await driver.close()


@pytest.fixture
async def driver(deployment: Deployment) -> AsyncIterator[LibvirtDriver]:
    async with deployment.nodehost.libvirt_driver(accel="tcg",
                                                  netns=deployment.ns.name) as drv:
        yield drv


def _domains(dep: Deployment, names: tuple[str, ...]) -> Iterator[libvirt.virDomain]:
    conn = dep.conn()
    try:
        for name in names:
            yield conn.lookupByUUIDString(dep.guests[name].uuid)
    finally:
        conn.close()


def pause(dep: Deployment, *names: str) -> None:
    """Suspend guests (their vCPUs stop: they load nothing while others are measured)."""
    for dom in _domains(dep, names):
        if dom.state()[0] != libvirt.VIR_DOMAIN_PAUSED:
            dom.suspend()


def resume(dep: Deployment, *names: str) -> None:
    for dom in _domains(dep, names):
        if dom.state()[0] == libvirt.VIR_DOMAIN_PAUSED:
            dom.resume()


def pin_to_one_core(dep: Deployment, *names: str) -> int:
    """Pin the vCPU and QEMU's own threads of each guest to the host's last core."""
    ncpu = os.cpu_count() or 1
    core = ncpu - 1
    cpumap = tuple(i == core for i in range(ncpu))
    for dom in _domains(dep, names):
        dom.pinVcpuFlags(0, cpumap, libvirt.VIR_DOMAIN_AFFECT_LIVE)
        dom.pinEmulator(cpumap, libvirt.VIR_DOMAIN_AFFECT_LIVE)
    return core


def cpu_times(dep: Deployment, *names: str) -> dict[str, tuple[float, float]]:
    """(vCPU seconds, whole-domain seconds) of each guest: the vCPU thread's time as
    libvirt reports it, and the domain's cgroup (vCPU + QEMU's own threads)."""
    out = {}
    for name, dom in zip(names, _domains(dep, names), strict=True):
        vcpu_ns = sum(v[2] for v in dom.vcpus()[0])
        total_ns = dom.getCPUStats(True)[0]["cpu_time"]
        out[name] = (vcpu_ns / 1e9, total_ns / 1e9)
    return out


async def measure_cpu(dep: Deployment, window: float,
                      *names: str) -> dict[str, tuple[float, float]]:
    """Fraction of one core each guest used over ``window`` s: (vCPU, whole domain)."""
    before, t0 = cpu_times(dep, *names), time.monotonic()
    await asyncio.sleep(window)
    after, elapsed = cpu_times(dep, *names), time.monotonic() - t0
    return {n: ((after[n][0] - before[n][0]) / elapsed, (after[n][1] - before[n][1]) / elapsed)
            for n in names}


def write_requests(dep: Deployment) -> int:
    """Write requests QEMU completed on the I/O guest's data disk (vdb)."""
    (dom,) = _domains(dep, ("io",))
    return int(dom.blockStats("vdb")[2])


async def measure_iops(dep: Deployment, window: float) -> float:
    before, t0 = write_requests(dep), time.monotonic()
    await asyncio.sleep(window)
    return (write_requests(dep) - before) / (time.monotonic() - t0)


def bridge_rx_bytes(dep: Deployment) -> int:
    """Bytes the node's bridge took in for itself: what got past the tap's policer."""
    (link,) = json.loads(dep.ns.run(["ip", "-j", "-s", "link", "show", "dev", BRIDGE]).stdout)
    return int(link["stats64"]["rx"]["bytes"])


async def measure_kbit(dep: Deployment, window: float) -> float:
    before, t0 = bridge_rx_bytes(dep), time.monotonic()
    await asyncio.sleep(window)
    return (bridge_rx_bytes(dep) - before) * 8 / 1000 / (time.monotonic() - t0)


def tc_state(dep: Deployment, tap: str) -> str:
    from yun.node.hypervisor.libvirt.shaping import ifb_name

    return "\n".join(
        dep.ns.run(["tc", "qdisc", "show", "dev", dev]).stdout.strip()
        for dev in (tap, ifb_name(tap)))


# ------------------------------------------------------------------------------------ CPU

CPU_WINDOW = 15.0  # seconds of contention measured
async def assert_in_force(driver: LibvirtDriver, guest: Guest, **limits: object) -> None:
    """The driver reads ``limits`` back from the guest's live definition."""
    info = await driver.get_domain(guest.uuid)
    assert info is not None and info.qos is not None
    assert {k: getattr(info.qos, k) for k in limits} == limits


@contextlib.asynccontextmanager
async def limits_changed(driver: LibvirtDriver, guest: Guest,
                         **limits: object) -> AsyncIterator[None]:
    """The guest's QoS changed on the running domain (and in force), its own restored
    after, whatever happens inside."""
    try:
        await driver.set_qos(guest.uuid, guest.qos.model_copy(update=limits))
        await assert_in_force(driver, guest, **limits)
        yield
    finally:
        await driver.set_qos(guest.uuid, guest.qos)


RATIO_TOLERANCE = 0.15  # relative, on high/low and medium/low
CAP_TOLERANCE = 0.03  # absolute, over the 30% cap of a low guest


async def test_cpu_levels_share_one_core_4_2_1_and_cap_a_lone_low_guest(
    deployment: Deployment, driver: LibvirtDriver
) -> None:
    dep = deployment
    names = ("cpu-high", "cpu-medium", "cpu-low")
    for name in names:
        await assert_in_force(driver, dep.guests[name], cpu=dep.guests[name].qos.cpu)
    core = pin_to_one_core(dep, *names)
    try:
        resume(dep, *names)
        await asyncio.sleep(2.0)  # let the scheduler settle on the new placement
        shares = await measure_cpu(dep, CPU_WINDOW, *names)
        high, medium, low = (shares[n][1] for n in names)
        print(f"\nthree busy guests on core {core} over {CPU_WINDOW:.0f} s "
              "(fraction of the core, whole domain / vCPU only):")
        for n in names:
            print(f"  {n:<11} {shares[n][1]:.3f} / {shares[n][0]:.3f}")
        print(f"  ratio high:medium:low = {high / low:.2f} : {medium / low:.2f} : 1")
        assert high / low == pytest.approx(4.0, rel=RATIO_TOLERANCE)
        assert medium / low == pytest.approx(2.0, rel=RATIO_TOLERANCE)

        # The low guest alone on the core: capped at 30% although the core is free.
        pause(dep, "cpu-high", "cpu-medium")
        await asyncio.sleep(1.0)
        alone = (await measure_cpu(dep, 10.0, "cpu-low"))["cpu-low"]
        print(f"  cpu-low alone: {alone[1]:.3f} of the core (vCPU {alone[0]:.3f})")
        assert alone[0] <= 0.30 + CAP_TOLERANCE
        assert alone[1] <= 0.30 + CAP_TOLERANCE
        assert alone[0] >= 0.20, "the low guest is not busy: the cap was not measured"

        # Raised to high on the running VM, the same guest takes what the core offers.
        async with limits_changed(driver, dep.guests["cpu-low"], cpu=CpuQos.HIGH):
            raised = (await measure_cpu(dep, 8.0, "cpu-low"))["cpu-low"]
            print(f"  cpu-low set to high while running: {raised[1]:.3f} of the core")
            assert raised[0] >= 0.30 + 2 * CAP_TOLERANCE
    finally:
        pause(dep, *names)


# ----------------------------------------------------------------------------------- disk

IO_WINDOW = 10.0


async def test_write_iops_limit_holds_and_changes_on_the_running_vm(
    deployment: Deployment, driver: LibvirtDriver
) -> None:
    dep = deployment
    guest = dep.guests["io"]
    await assert_in_force(driver, guest, write_iops_sec=50)
    await asyncio.sleep(2.0)
    iops = await measure_iops(dep, IO_WINDOW)
    print(f"\nO_DIRECT 4 KiB writes under a 50 IOPS limit: {iops:.1f} IOPS")
    assert iops == pytest.approx(50, rel=0.10)

    async with limits_changed(driver, guest, write_iops_sec=200):
        await asyncio.sleep(1.0)
        iops = await measure_iops(dep, IO_WINDOW)
        print(f"  limit raised to 200 on the running VM: {iops:.1f} IOPS")
        assert iops == pytest.approx(200, rel=0.10)
    # The persistent definition holds the limit too (the next boot keeps it).
    (dom,) = _domains(dep, ("io",))
    assert "<write_iops_sec>50</write_iops_sec>" in dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)


# -------------------------------------------------------------------------------- network

NET_WINDOW = 10.0


async def test_bandwidth_limit_holds_and_changes_on_the_running_vm(
    deployment: Deployment, driver: LibvirtDriver
) -> None:
    dep = deployment
    guest = dep.guests["io"]
    tap = f"yq{guest.uuid[:8]}"
    await assert_in_force(driver, guest, bandwidth_kbit=10_000)
    await asyncio.sleep(3.0)  # TCP past its start, the policer's bucket spent
    kbit = await measure_kbit(dep, NET_WINDOW)
    print(f"\nguest -> node under a 10 Mbit/s limit: {kbit / 1000:.2f} Mbit/s")
    print(tc_state(dep, tap))
    assert kbit == pytest.approx(10_000, rel=0.10)

    async with limits_changed(driver, guest, bandwidth_kbit=5_000):
        await asyncio.sleep(3.0)
        kbit = await measure_kbit(dep, NET_WINDOW)
        print(f"  limit set to 5 Mbit/s on the running VM: {kbit / 1000:.2f} Mbit/s")
        assert kbit == pytest.approx(5_000, rel=0.10)
