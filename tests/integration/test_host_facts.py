"""What a node reports of its host: real memory, reserves apart from totals, capabilities,
configured pool, network load (issue 7, first defect).

The libvirt figures are read from this machine's libvirtd (``qemu:///system``, queries
only: no guest is defined or started) and from libvirt's ``test:///default``.
"""

from __future__ import annotations

import os
from pathlib import Path

import libvirt
import pytest

from yun.config import NodeSettings
from yun.node.agent import NodeAgent
from yun.node.hypervisor.base import Capabilities, node_capabilities
from yun.node.hypervisor.libvirt.driver import LibvirtDriver
from yun.node.netload import UplinkMeter, default_route_interface, read_counters
from yun.node.service import build_agent
from yun.proto.messages import NodeCapability


def meminfo_total_mb() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) // 1024
    raise AssertionError("no MemTotal in /proc/meminfo")


def system_libvirt_reachable() -> bool:
    try:
        libvirt.open("qemu:///system").close()
    except libvirt.libvirtError:
        return False
    return True


@pytest.mark.skipif(not system_libvirt_reachable(), reason="no libvirtd on qemu:///system")
async def test_libvirt_node_reports_the_hosts_real_memory(tmp_path: Path) -> None:
    """Before the fix the driver reported libvirt's NUMA cell figure (6,234 MiB on a
    24,105 MiB machine here); it must be the kernel's MemTotal."""
    driver = LibvirtDriver(uri="qemu:///system", accel="tcg", state_dir=tmp_path)
    await driver.open()
    try:
        first = await driver.host_info()
        second = await driver.host_info()
    finally:
        await driver.close()
    real = meminfo_total_mb()
    # The same kernel counter, read twice: equal but for a balloon or hot-plug between.
    assert abs(first.memory_mb - real) <= real * 0.01, (first.memory_mb, real)
    assert first.memory_mb == second.memory_mb  # stable, not a different figure each time
    assert 0 < first.memory_used_mb < first.memory_mb
    assert first.vcpus == os.cpu_count()


async def test_libvirt_driver_without_memory_stats_falls_back(tmp_path: Path) -> None:
    """libvirt's test hypervisor has no node memory stats: its getInfo figure is used."""
    driver = LibvirtDriver(uri="test:///default", accel="tcg", state_dir=tmp_path)
    await driver.open()
    try:
        host = await driver.host_info()
    finally:
        await driver.close()
    conn = libvirt.open("test:///default")
    try:
        assert host.memory_mb == conn.getInfo()[1] > 0
    finally:
        conn.close()


def sim_agent(tmp_path: Path, **settings: object) -> NodeAgent:
    """A sim node agent built from settings the way ``yun serve node`` builds it."""
    config = NodeSettings(name="n1", state_dir=tmp_path, hypervisor="sim", sim_vcpus=8,
                          sim_memory_mb=16384, sim_disk_gb=200,
                          **settings)  # type: ignore[arg-type]
    return build_agent(config, "n1")


async def test_sim_node_reports_totals_and_reserves_apart(tmp_path: Path) -> None:
    host = await sim_agent(tmp_path, memory_reserve_mb=2048, vcpus_reserve=1,
                           disk_reserve_gb=20, pool="p1").host_info()
    # Totals are the host's; the reserve travels apart, for the control server to subtract.
    assert (host.vcpus, host.memory_mb, host.disk_gb) == (8, 16384, 200)
    assert (host.vcpus_reserved, host.memory_reserved_mb, host.disk_reserved_gb) == (1, 2048, 20)
    assert host.pool == "p1"
    assert host.net_load == 0.0
    assert host.capabilities == [NodeCapability.CONSOLE, NodeCapability.HOTPLUG_DISK,
                                 NodeCapability.HOTPLUG_NIC,
                                 NodeCapability.QOS_CPU, NodeCapability.QOS_DISK,
                                 NodeCapability.QOS_NET]


async def test_default_reserve_and_unassigned_pool(tmp_path: Path) -> None:
    host = await sim_agent(tmp_path).host_info()
    assert host.memory_reserved_mb == 1024 and host.vcpus_reserved == 0
    assert host.disk_reserved_gb == 0 and host.pool is None


def test_bad_reserve_or_pool_is_refused_naming_the_field() -> None:
    from pydantic import ValidationError

    for field, value in (("memory_reserve_mb", -1), ("vcpus_reserve", -2),
                         ("pool", "no spaces"), ("net_capacity_mbit", -5)):
        with pytest.raises(ValidationError, match=field):
            NodeSettings(name="n1", **{field: value})  # type: ignore[arg-type]


def test_capabilities_map_driver_flags_and_kvm() -> None:
    caps = Capabilities(console=True, hotplug_disk=True, qos_cpu=True)
    assert node_capabilities(caps, "tcg") == [
        NodeCapability.HOTPLUG_DISK, NodeCapability.CONSOLE, NodeCapability.QOS_CPU]
    assert node_capabilities(Capabilities(), "kvm") == [NodeCapability.KVM]


async def test_libvirt_node_is_wired_with_reserve_pool_and_uplink(tmp_path: Path) -> None:
    """The libvirt node is built like the sim one, plus an uplink meter (on lo here)."""
    settings = NodeSettings(name="n1", state_dir=tmp_path, libvirt_uri="test:///default",
                            accel="tcg", memory_reserve_mb=4096, pool="p2", uplink="lo",
                            net_capacity_mbit=100)
    agent = build_agent(settings, "n1")
    assert agent.uplink is not None and agent.uplink.interface == "lo"
    await agent.driver.open()
    try:
        host = await agent.host_info()
    finally:
        await agent.driver.close()
    assert host.hypervisor == "libvirt" and host.memory_reserved_mb == 4096
    assert host.pool == "p2" and 0.0 <= host.net_load <= 1.0
    assert NodeCapability.CONSOLE in host.capabilities
    assert NodeCapability.KVM not in host.capabilities  # TCG


# --- network load ----------------------------------------------------------------------

DEV = """Inter-|   Receive                                                |  Transmit
 face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs ...
    lo: {lo} 10 0 0 0 0 0 0 {lo} 10 0 0 0 0 0 0
  eth0: {rx} 40929 0 0 0 0 0 0 {tx} 22077 0 0 0 0 0 0
"""
ROUTE = """Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT
eth0\t0000A8C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0
eth0\t00000000\t0100A8C0\t0003\t0\t0\t0\t00000000\t0\t0\t0
"""


def test_uplink_load_from_byte_counters(tmp_path: Path) -> None:
    dev, route = tmp_path / "dev", tmp_path / "route"
    route.write_text(ROUTE)
    now = [100.0]
    meter = UplinkMeter(None, 100, dev_file=dev, route_file=route, clock=lambda: now[0])
    dev.write_text(DEV.format(lo=5, rx=1_000_000, tx=2_000))
    assert default_route_interface(route) == "eth0"
    assert read_counters("eth0", dev) == (1_000_000, 2_000)
    assert meter.sample() == 0.0  # first sample: no interval yet
    # 2 s later, 5 MB received (20 Mbit/s) and 1.25 MB sent: the busier way, 20% of 100.
    now[0] += 2
    dev.write_text(DEV.format(lo=5, rx=6_000_000, tx=1_252_000))
    assert meter.sample() == pytest.approx(0.2)
    now[0] += 1  # saturated beyond the link's rating: 1.0, not more
    dev.write_text(DEV.format(lo=5, rx=66_000_000, tx=1_252_000))
    assert meter.sample() == 1.0
    now[0] += 1  # counters reset (interface recreated): 0, not a negative load
    dev.write_text(DEV.format(lo=5, rx=10, tx=10))
    assert meter.sample() == 0.0
    assert UplinkMeter("eth9", 100, dev_file=dev).sample() == 0.0  # unknown interface
    assert UplinkMeter("eth0", 0, dev_file=dev).sample() == 0.0  # not measured


def test_uplink_meter_reads_this_machines_counters() -> None:
    assert read_counters("lo") is not None
    meter = UplinkMeter("lo", 1000)
    assert meter.sample() == 0.0
    assert 0.0 <= meter.sample() <= 1.0
