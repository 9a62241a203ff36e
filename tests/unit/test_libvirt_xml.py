"""Libvirt driver, pure parts: domain XML, state and event mapping; and the driver
itself against libvirt's in-memory ``test:///default`` hypervisor (no QEMU)."""

from __future__ import annotations

import uuid as uuidlib
import xml.etree.ElementTree as ET
from pathlib import Path

import libvirt
import pytest

from yun.node.hypervisor.base import DomainNotFound, HypervisorError, ResolvedDisk, ResolvedNic
from yun.node.hypervisor.libvirt.driver import LibvirtDriver, canonical_uuid, map_state
from yun.node.hypervisor.libvirt.events import event_reason, lifecycle_event
from yun.node.hypervisor.libvirt.shaping import (
    ifb_name,
    in_netns,
    shape_commands,
    unshape_commands,
)
from yun.node.hypervisor.libvirt.xml import (
    YUN_NS,
    apply_qos,
    build_domain_xml,
    cpu_level,
    disk_targets,
    domain_name,
    has_nic,
    interface_xml,
    iotune_params,
    nic_mac,
    parse_domain_xml,
    scheduler_params,
    target_dev,
    with_nic,
    without_nic,
)
from yun.proto.messages import CpuQos, DomainSpec, DomainState, QosSpec

UUID = "6b1f0b2a-3c4d-4e5f-8a9b-0c1d2e3f4a5b"
Y = f"{{{YUN_NS}}}"


def spec(**kw: object) -> DomainSpec:
    fields: dict[str, object] = {"uuid": UUID, "name": "web-1", "vcpus": 2, "memory_mb": 512}
    fields.update(kw)
    return DomainSpec(**fields)  # type: ignore[arg-type]


DISKS = [
    ResolvedDisk("root", Path("/srv/disks/root.qcow2"), "qcow2"),
    ResolvedDisk("data", Path("/srv/disks/data.raw"), "raw"),
]
NICS = [ResolvedNic("n1", "52:54:00:12:34:56", "yunbr0", "yt-6b1f0b2a")]


def build(s: DomainSpec | None = None, accel: str = "tcg", **kw: object) -> ET.Element:
    xml = build_domain_xml(s or spec(), kw.pop("disks", DISKS), kw.pop("nics", NICS),  # type: ignore[arg-type]
                           accel=accel, console_log=Path("/var/lib/yun/node/console/x.log"),
                           **kw)  # type: ignore[arg-type]
    return ET.fromstring(xml)


def test_identity_and_size() -> None:
    dom = build()
    assert dom.findtext("name") == f"yun-{UUID}" == domain_name(UUID)
    assert dom.findtext("uuid") == UUID
    assert dom.findtext("title") == "web-1"
    assert dom.find("memory").text == "512" and dom.find("memory").get("unit") == "MiB"  # type: ignore[union-attr]
    assert dom.findtext("vcpu") == "2"
    assert dom.find(f"metadata/{Y}instance/{Y}uuid").text == UUID  # type: ignore[union-attr]
    assert dom.find(f"metadata/{Y}instance/{Y}name").text == "web-1"  # type: ignore[union-attr]


def test_domain_type_and_cpu_follow_accel() -> None:
    tcg = build(accel="tcg")
    assert tcg.get("type") == "qemu"
    assert tcg.findtext("cpu/model") == "qemu64"
    kvm = build(accel="kvm")
    assert kvm.get("type") == "kvm"
    assert kvm.find("cpu").get("mode") == "host-model"  # type: ignore[union-attr]
    with pytest.raises(ValueError):
        build(accel="xen")


def test_boot_power_and_features() -> None:
    dom = build()
    t = dom.find("os/type")
    assert t is not None and t.text == "hvm" and t.get("machine") == "pc"
    assert t.get("arch") == "x86_64"
    assert dom.find("os/boot").get("dev") == "hd"  # type: ignore[union-attr]
    assert dom.find("features/acpi") is not None and dom.find("features/apic") is not None
    assert dom.findtext("on_poweroff") == "destroy"
    assert dom.findtext("on_reboot") == "restart"
    assert dom.findtext("on_crash") == "destroy"


def test_disks() -> None:
    disks = build(cache_modes={"data": "writeback"}).findall("devices/disk")
    assert [d.find("target").get("dev") for d in disks] == ["vda", "vdb"]  # type: ignore[union-attr]
    assert all(d.find("target").get("bus") == "virtio" for d in disks)  # type: ignore[union-attr]
    assert [d.find("driver").get("type") for d in disks] == ["qcow2", "raw"]  # type: ignore[union-attr]
    assert [d.find("driver").get("cache") for d in disks] == ["none", "writeback"]  # type: ignore[union-attr]
    assert disks[0].find("source").get("file") == "/srv/disks/root.qcow2"  # type: ignore[union-attr]
    with pytest.raises(ValueError, match="format"):
        build(disks=[ResolvedDisk("x", Path("/x"), "vmdk")])


def test_disk_names() -> None:
    assert [target_dev("vd", i) for i in (0, 1, 25, 26, 27, 701, 702)] == [
        "vda", "vdb", "vdz", "vdaa", "vdab", "vdzz", "vdaaa"]
    disks = [ResolvedDisk("a", Path("/a"), "raw"), ResolvedDisk("b", Path("/b"), "raw", "sata"),
             ResolvedDisk("c", Path("/c"), "raw")]
    assert disk_targets(disks) == [("vda", "virtio"), ("sda", "sata"), ("vdb", "virtio")]


def test_nics() -> None:
    (nic,) = build().findall("devices/interface")
    assert nic.get("type") == "bridge"
    assert nic.find("source").get("bridge") == "yunbr0"  # type: ignore[union-attr]
    assert nic.find("mac").get("address") == "52:54:00:12:34:56"  # type: ignore[union-attr]
    assert nic.find("target").get("dev") == "yt-6b1f0b2a"  # type: ignore[union-attr]
    assert nic.find("model").get("type") == "virtio"  # type: ignore[union-attr]


def test_serial_console_and_vnc() -> None:
    dom = build(vnc_listen="127.0.0.1")
    serial = dom.find("devices/serial")
    assert serial is not None and serial.get("type") == "pty"
    log = serial.find("log")
    assert log is not None and log.get("file") == "/var/lib/yun/node/console/x.log"
    assert log.get("append") == "on"
    assert dom.find("devices/console").get("type") == "pty"  # type: ignore[union-attr]
    g = dom.find("devices/graphics")
    assert g is not None and g.get("type") == "vnc" and g.get("port") == "-1"
    assert g.get("autoport") == "yes" and g.get("listen") == "127.0.0.1"
    assert dom.find("devices/video/model").get("type") == "vga"  # type: ignore[union-attr]
    no_vnc = build(spec(vnc=False))
    assert no_vnc.find("devices/graphics") is None


def test_user_strings_are_escaped() -> None:
    # The API validates names; the XML must be safe even for a spec that escaped it.
    evil = "</title><devices><disk/></devices><title>"
    s = DomainSpec.model_construct(uuid=UUID, name=evil, vcpus=1, memory_mb=64, disks=[],
                                   nics=[], vnc=True)
    nic = ResolvedNic("n'1", "52:54:00:00:00:01", "br\"0", "tap&<>")
    xml = build_domain_xml(s, [ResolvedDisk("d", Path("/a b/<c>&'.qcow2"), "qcow2")], [nic],
                           accel="tcg", console_log=Path("/x.log"))
    dom = ET.fromstring(xml)  # still well-formed
    assert dom.findtext("title") == evil
    assert len(dom.findall("devices/disk")) == 1
    assert dom.find("devices/disk/source").get("file") == "/a b/<c>&'.qcow2"  # type: ignore[union-attr]
    assert dom.find("devices/interface/source").get("bridge") == 'br"0'  # type: ignore[union-attr]
    assert dom.find("devices/interface/target").get("dev") == "tap&<>"  # type: ignore[union-attr]
    parsed = parse_domain_xml(xml)
    assert parsed is not None and parsed.name == evil


def test_parse_roundtrip_and_foreign_domains() -> None:
    parsed = parse_domain_xml(build_domain_xml(spec(), DISKS, NICS, accel="tcg",
                                               console_log=Path("/c/x.log")))
    assert parsed is not None
    assert (parsed.uuid, parsed.name, parsed.vcpus, parsed.memory_mb) == (UUID, "web-1", 2, 512)
    assert parsed.vnc_port is None  # autoport, not running
    assert parsed.console_log == Path("/c/x.log")
    assert parsed.disks == {"root": "vda", "data": "vdb"}
    live = ET.fromstring(build_domain_xml(spec(), [], [], accel="tcg", console_log=Path("/c")))
    live.find("devices/graphics").set("port", "5901")  # type: ignore[union-attr]
    live.find("memory").set("unit", "KiB")  # type: ignore[union-attr]
    live.find("memory").text = "524288"  # type: ignore[union-attr]
    live.remove(live.find("currentMemory"))  # type: ignore[arg-type]
    reparsed = parse_domain_xml(ET.tostring(live, encoding="unicode"))
    assert reparsed is not None and reparsed.vnc_port == 5901 and reparsed.memory_mb == 512
    foreign = "<domain type='kvm'><name>db</name><uuid>" + UUID + "</uuid></domain>"
    assert parse_domain_xml(foreign) is None


def test_state_mapping() -> None:
    assert map_state(libvirt.VIR_DOMAIN_RUNNING, 1) is DomainState.RUNNING
    assert map_state(libvirt.VIR_DOMAIN_BLOCKED, 0) is DomainState.RUNNING
    assert map_state(libvirt.VIR_DOMAIN_PAUSED, 0) is DomainState.PAUSED
    assert map_state(libvirt.VIR_DOMAIN_SHUTOFF, libvirt.VIR_DOMAIN_SHUTOFF_SHUTDOWN) \
        is DomainState.SHUTOFF
    assert map_state(libvirt.VIR_DOMAIN_SHUTOFF, libvirt.VIR_DOMAIN_SHUTOFF_CRASHED) \
        is DomainState.CRASHED
    assert map_state(libvirt.VIR_DOMAIN_CRASHED, 0) is DomainState.CRASHED


def test_lifecycle_events() -> None:
    started = lifecycle_event(UUID, libvirt.VIR_DOMAIN_EVENT_STARTED,
                              libvirt.VIR_DOMAIN_EVENT_STARTED_BOOTED)
    assert started is not None and started.state is DomainState.RUNNING
    assert started.reason == "started/booted"
    stopped = lifecycle_event(UUID, libvirt.VIR_DOMAIN_EVENT_STOPPED,
                              libvirt.VIR_DOMAIN_EVENT_STOPPED_SHUTDOWN)
    assert stopped is not None and stopped.state is DomainState.SHUTOFF
    crashed = lifecycle_event(UUID, libvirt.VIR_DOMAIN_EVENT_STOPPED,
                              libvirt.VIR_DOMAIN_EVENT_STOPPED_CRASHED)
    assert crashed is not None and crashed.state is DomainState.CRASHED
    gone = lifecycle_event(UUID, libvirt.VIR_DOMAIN_EVENT_UNDEFINED, 0)
    assert gone is not None and gone.state is DomainState.ABSENT
    assert lifecycle_event(UUID, libvirt.VIR_DOMAIN_EVENT_DEFINED, 0) is None
    assert lifecycle_event(UUID, libvirt.VIR_DOMAIN_EVENT_SHUTDOWN, 0) is None
    assert event_reason(libvirt.VIR_DOMAIN_EVENT_STOPPED,
                        libvirt.VIR_DOMAIN_EVENT_STOPPED_DESTROYED) == "stopped/destroyed"


def test_canonical_uuid() -> None:
    assert canonical_uuid(UUID.upper()) == UUID
    with pytest.raises(HypervisorError, match="not a UUID"):
        canonical_uuid("web-1")


# ----------------------------------------------------------------- against test:///default


async def test_driver_on_libvirt_test_hypervisor(tmp_path: Path) -> None:
    """The driver's libvirt calls, events and filtering, with no QEMU behind them."""
    vm = str(uuidlib.uuid4())
    driver = LibvirtDriver(uri="test:///default", accel="tcg", state_dir=tmp_path)
    await driver.open()
    try:
        events = driver.events()
        assert await driver.get_domain(vm) is None
        await driver.ensure_defined(spec(uuid=vm, name="t1"), [], [])
        await driver.ensure_defined(spec(uuid=vm, name="t1", vcpus=1), [], [])  # update
        info = await driver.get_domain(vm)
        assert info is not None and info.state is DomainState.SHUTOFF and info.vcpus == 1
        # test:///default ships a domain called "test": not Yun's, so never listed.
        listed = await driver.list_domains()
        assert [d.uuid for d in listed] == [vm]
        await driver.start(vm)
        await driver.start(vm)  # already running: no error
        ev = await anext(events)
        assert ev.uuid == vm and ev.state is DomainState.RUNNING
        assert (await driver.get_domain(vm)).state is DomainState.RUNNING  # type: ignore[union-attr]
        await driver.destroy(vm)
        await driver.destroy(vm)  # already off: no error
        assert (await driver.get_domain(vm)).state is DomainState.SHUTOFF  # type: ignore[union-attr]
        await driver.undefine(vm)
        await driver.undefine(vm)  # absent: no error
        assert await driver.get_domain(vm) is None
        with pytest.raises(DomainNotFound, match=vm):
            await driver.start(vm)
        info_host = await driver.host_info()
        assert info_host.accel == "tcg" and info_host.vcpus > 0
    finally:
        await driver.close()


# ----------------------------------------------------------------- QoS (F-QOS-*)


def test_cputune_for_each_level() -> None:
    """Shares 4:2:1 and a per-vCPU cap of 100/50/30% of one core (period 100 ms)."""
    expected = {CpuQos.HIGH: ("4096", "100000"), CpuQos.MEDIUM: ("2048", "50000"),
                CpuQos.LOW: ("1024", "30000")}
    for level, (shares, quota) in expected.items():
        tune = build(spec(qos=QosSpec(cpu=level))).find("cputune")
        assert tune is not None
        assert tune.findtext("shares") == shares
        assert tune.findtext("period") == "100000"
        assert tune.findtext("quota") == quota  # <quota> is per vCPU, not global_quota
        assert tune.find("global_quota") is None and tune.find("emulator_quota") is None
        assert scheduler_params(QosSpec(cpu=level)) == {
            "cpu_shares": int(shares), "vcpu_period": 100000, "vcpu_quota": int(quota)}
    # The default spec is medium.
    assert build().findtext("cputune/shares") == "2048"


def test_iotune_on_every_disk_only_for_the_limits_given() -> None:
    qos = QosSpec(read_iops_sec=500, write_iops_sec=50, write_bytes_sec=10 << 20)
    disks = build(spec(qos=qos)).findall("devices/disk")
    assert len(disks) == 2
    for disk in disks:
        tune = disk.find("iotune")
        assert tune is not None
        assert {el.tag: el.text for el in tune} == {
            "read_iops_sec": "500", "write_iops_sec": "50", "write_bytes_sec": str(10 << 20)}
    assert all(d.find("iotune") is None for d in build().findall("devices/disk"))
    # Live parameters name every limit, 0 (unlimited) for those not given and the totals.
    assert iotune_params(qos) == {
        "total_iops_sec": 0, "total_bytes_sec": 0, "read_iops_sec": 500,
        "write_iops_sec": 50, "read_bytes_sec": 0, "write_bytes_sec": 10 << 20}


def test_nic_limit_is_kept_in_yun_metadata_not_in_libvirt_bandwidth() -> None:
    dom = build(spec(qos=QosSpec(bandwidth_kbit=10_000)))
    assert dom.find(f"metadata/{Y}instance/{Y}qos").get("bandwidth_kbit") == "10000"  # type: ignore[union-attr]
    # libvirt's <bandwidth> needs sch_sfq and act_police; the driver shapes with tc.
    assert dom.find("devices/interface/bandwidth") is None
    assert build().find(f"metadata/{Y}instance/{Y}qos") is None


def test_qos_parse_roundtrip_and_apply_on_existing_xml() -> None:
    qos = QosSpec(cpu=CpuQos.LOW, read_iops_sec=100, write_iops_sec=50,
                  read_bytes_sec=1 << 20, write_bytes_sec=2 << 20, bandwidth_kbit=5000)
    xml = build_domain_xml(spec(qos=qos), DISKS, NICS, accel="tcg", console_log=Path("/c"))
    parsed = parse_domain_xml(xml)
    assert parsed is not None and parsed.qos == qos
    assert parsed.disk_targets == ("vda", "vdb") and parsed.nic_taps == ("yt-6b1f0b2a",)
    # A definition from before QoS existed reads as medium, unlimited.
    old = ET.fromstring(xml)
    old.remove(old.find("cputune"))  # type: ignore[arg-type]
    for disk in old.findall("devices/disk"):
        disk.remove(disk.find("iotune"))  # type: ignore[arg-type]
    inst = old.find(f"metadata/{Y}instance")
    inst.remove(inst.find(f"{Y}qos"))  # type: ignore[union-attr, arg-type]
    bare = ET.tostring(old, encoding="unicode")
    assert parse_domain_xml(bare).qos == QosSpec()  # type: ignore[union-attr]
    # apply_qos replaces what QoS owns and keeps the rest (pinning an operator set).
    pinned = ET.fromstring(bare)
    tune = ET.SubElement(pinned, "cputune")
    ET.SubElement(tune, "shares").text = "777"
    ET.SubElement(tune, "emulatorpin", cpuset="1")
    updated = apply_qos(ET.tostring(pinned, encoding="unicode"), qos)
    again = parse_domain_xml(updated)
    assert again is not None and again.qos == qos and again.name == "web-1"
    root = ET.fromstring(updated)
    assert len(root.findall("cputune")) == 1
    assert root.find("cputune/emulatorpin").get("cpuset") == "1"  # type: ignore[union-attr]
    assert root.findtext("cputune/shares") == "1024"
    # And back to unlimited: every limit element goes.
    cleared = parse_domain_xml(apply_qos(updated, QosSpec(cpu=CpuQos.HIGH)))
    assert cleared is not None and cleared.qos == QosSpec(cpu=CpuQos.HIGH)


def test_cpu_level_read_back_from_foreign_shares() -> None:
    """Shares another tool set are reported as the nearest level, not as an error."""
    assert cpu_level(4096) is CpuQos.HIGH and cpu_level(1024) is CpuQos.LOW
    assert cpu_level(3000) is CpuQos.HIGH and cpu_level(1500) is CpuQos.MEDIUM
    assert cpu_level(100) is CpuQos.LOW  # cgroup v2's default weight


def test_tap_shaping_commands() -> None:
    cmds = shape_commands("yt-6b1f0b2a", 10_000, ifb_exists=False)
    assert cmds[0] == ["ip", "link", "add", "yi-6b1f0b2a", "type", "ifb"]
    tbf = [c for c in cmds if c[:3] == ["tc", "qdisc", "replace"] and "tbf" in c]
    assert {c[4] for c in tbf} == {"yt-6b1f0b2a", "yi-6b1f0b2a"}  # both directions
    for c in tbf:
        assert c[c.index("rate") + 1] == "10000kbit"
        assert c[c.index("burst") + 1] == str(10_000 * 1000 // 8 // 20)  # 50 ms of traffic
    redirect = cmds[-1]
    assert redirect[redirect.index("redirect") + 2] == "yi-6b1f0b2a"
    assert ["ip", "link", "add", "yi-6b1f0b2a", "type", "ifb"] not in shape_commands(
        "yt-6b1f0b2a", 10_000, ifb_exists=True)
    assert all(len(ifb_name(t)) <= 15 for t in ("yt-6b1f0b2a", "x", "yq0123456789abc"))
    assert unshape_commands("yt-6b1f0b2a", tap_exists=False) == [
        ["ip", "link", "del", "yi-6b1f0b2a"]]
    assert in_netns("ns1", ["tc", "x"]) == ["ip", "netns", "exec", "ns1", "tc", "x"]
    assert in_netns(None, ["tc", "x"]) == ["tc", "x"]


async def test_set_qos_on_a_stopped_domain_of_the_test_hypervisor(tmp_path: Path) -> None:
    """A stopped domain: the new limits go into its definition and are read back."""
    vm = str(uuidlib.uuid4())
    driver = LibvirtDriver(uri="test:///default", accel="tcg", state_dir=tmp_path)
    await driver.open()
    try:
        await driver.ensure_defined(spec(uuid=vm, name="q1"), DISKS, [])
        info = await driver.get_domain(vm)
        assert info is not None and info.qos == QosSpec()
        qos = QosSpec(cpu=CpuQos.LOW, write_iops_sec=50, bandwidth_kbit=10_000)
        await driver.set_qos(vm, qos)
        info = await driver.get_domain(vm)
        assert info is not None and info.qos == qos
        await driver.set_qos(vm, QosSpec())  # back to unlimited
        assert (await driver.get_domain(vm)).qos == QosSpec()  # type: ignore[union-attr]
        with pytest.raises(DomainNotFound):
            await driver.set_qos(str(uuidlib.uuid4()), qos)
        await driver.undefine(vm)
    finally:
        await driver.close()


def test_nic_plugged_into_and_out_of_a_definition() -> None:
    """A plugged NIC is the same <interface> the definition would have had, and Yun's
    metadata names it, so the driver finds its MAC by NIC id to unplug it."""
    plugged = ResolvedNic("n2", "52:54:00:ab:cd:ef", None, "ys-plugged")
    xml = ET.tostring(build(), encoding="unicode")
    assert not has_nic(xml, plugged.mac) and nic_mac(xml, "n2") is None
    added = with_nic(xml, plugged)
    assert with_nic(added, plugged).count("52:54:00:ab:cd:ef") == 2  # interface + metadata
    assert has_nic(added, plugged.mac.upper()) and nic_mac(added, "n2") == plugged.mac
    parsed = parse_domain_xml(added)
    assert parsed is not None
    assert parsed.nic_macs == (NICS[0].mac, plugged.mac)
    assert parsed.nic_taps == (NICS[0].tap, "ys-plugged")
    device = ET.fromstring(interface_xml(plugged))
    assert (device.get("type"), device.find("target").get("managed")) == ("ethernet", "no")  # type: ignore[union-attr]
    removed = without_nic(added, "n2", plugged.mac)
    assert not has_nic(removed, plugged.mac) and nic_mac(removed, "n2") is None
    assert has_nic(removed, NICS[0].mac) and nic_mac(removed, "n1") == NICS[0].mac
