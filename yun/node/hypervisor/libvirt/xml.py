"""Libvirt domain XML for a Yun VM: built from the spec, parsed back from libvirt.

Pure functions, no libvirt connection, so they are unit-tested on their own. The XML
is built with ElementTree, never by string formatting, so that no name chosen by a
user can change the document's structure.

Yun marks the domains it manages with a ``<metadata>`` element in its own
namespace; everything else on the host (an operator's own VMs) is left alone::

    <metadata>
      <yun:instance xmlns:yun="https://yun.dev/xmlns/1">
        <yun:uuid>…</yun:uuid><yun:name>web-1</yun:name>
        <yun:disk id="root" target="vda"/><yun:nic id="n1" mac="52:54:00:…"/>
      </yun:instance>
    </metadata>
"""

from __future__ import annotations

import math
import xml.etree.ElementTree as ET
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from yun.node.hypervisor.base import ResolvedDisk, ResolvedNic
from yun.proto.messages import CpuQos, DomainSpec, QosSpec

YUN_NS = "https://yun.dev/xmlns/1"
DOMAIN_NAME_PREFIX = "yun-"
_Y = f"{{{YUN_NS}}}"

# ElementTree picks namespace prefixes from a global registry; "yun" keeps the
# stored XML readable for an operator running ``virsh dumpxml``.
ET.register_namespace("yun", YUN_NS)

#: bus -> (target device prefix, libvirt bus name)
_BUS_TARGETS = {"virtio": ("vd", "virtio"), "sata": ("sd", "sata"), "ide": ("hd", "ide")}
_ACCEL_DOMAIN_TYPE = {"kvm": "kvm", "tcg": "qemu"}


def domain_name(uuid: str) -> str:
    """The libvirt name of VM ``uuid``: unique on the host, whatever the VM is called."""
    return f"{DOMAIN_NAME_PREFIX}{uuid}"


def domain_type(accel: str) -> str:
    """Libvirt's domain type for an accelerator: ``kvm`` or ``qemu`` (TCG)."""
    try:
        return _ACCEL_DOMAIN_TYPE[accel]
    except KeyError:
        raise ValueError(f"accel must be 'kvm' or 'tcg', not {accel!r}") from None


def target_dev(prefix: str, index: int) -> str:
    """``vda``, ``vdb`` … ``vdz``, ``vdaa`` …: the kernel's naming of the ``index``-th disk."""
    if index < 0:
        raise ValueError("disk index must be >= 0")
    letters = ""
    n = index + 1
    while n > 0:  # bijective base 26: a..z, aa..az, ...
        n, rem = divmod(n - 1, 26)
        letters = chr(ord("a") + rem) + letters
    return prefix + letters


def disk_targets(disks: Sequence[ResolvedDisk]) -> list[tuple[str, str]]:
    """(target dev, libvirt bus) of each disk, numbered per bus in the given order."""
    counters: dict[str, int] = {}
    out = []
    for disk in disks:
        if disk.bus not in _BUS_TARGETS:
            raise ValueError(f"disk {disk.disk_id!r}: unknown bus {disk.bus!r}")
        prefix, bus = _BUS_TARGETS[disk.bus]
        index = counters.get(prefix, 0)
        counters[prefix] = index + 1
        out.append((target_dev(prefix, index), bus))
    return out


def _sub(parent: ET.Element, tag: str, text: str | None = None, **attrs: str) -> ET.Element:
    el = ET.SubElement(parent, tag, attrs)
    if text is not None:
        el.text = text
    return el


# --------------------------------------------------------------------------- QoS
#
# CPU (F-QOS-CPU): <cputune> maps onto the QEMU process's cgroup, on cgroup v1 (cpu.shares,
# cpu.cfs_period_us/cfs_quota_us) and v2 (cpu.weight, cpu.max) alike; libvirt does the
# translation. <shares> sit on the domain's cgroup, so under contention domains share a
# core in proportion 4:2:1. <period>/<quota> are per vCPU (libvirt's vcpu_period/
# vcpu_quota, one cgroup per vCPU thread), unlike <global_quota> (the whole domain) and
# <emulator_quota> (QEMU's own threads, left unlimited: their work is I/O, which the disk
# and network limits bound). Disk (F-QOS-DISK): <iotune> on every disk, QEMU's block
# throttling. Network (F-QOS-NET): see .shaping.

CPU_PERIOD_US = 100_000
#: level -> (shares, per-vCPU quota in µs of each CPU_PERIOD_US)
CPU_LEVELS: dict[CpuQos, tuple[int, int]] = {
    CpuQos.HIGH: (4096, 100_000),  # at most one whole core per vCPU
    CpuQos.MEDIUM: (2048, 50_000),
    CpuQos.LOW: (1024, 30_000),
}
#: iotune element names, in the order QosSpec names them (read/write, IOPS and bytes/s).
IOTUNE_FIELDS = ("read_iops_sec", "write_iops_sec", "read_bytes_sec", "write_bytes_sec")
def cpu_tune(level: CpuQos) -> tuple[int, int, int]:
    """(shares, period µs, per-vCPU quota µs) of a CPU QoS level."""
    shares, quota = CPU_LEVELS[CpuQos(level)]
    return shares, CPU_PERIOD_US, quota


def cpu_level(shares: int) -> CpuQos:
    """The level whose shares are closest (by ratio) to ``shares`` read back from libvirt."""
    value = max(1, shares)
    return min(CPU_LEVELS, key=lambda lvl: abs(math.log(value / CPU_LEVELS[lvl][0])))


def scheduler_params(qos: QosSpec) -> dict[str, int]:
    """``virDomainSetSchedulerParameters`` typed parameters for ``qos.cpu``."""
    shares, period, quota = cpu_tune(qos.cpu)
    return {"cpu_shares": shares, "vcpu_period": period, "vcpu_quota": quota}


def iotune_params(qos: QosSpec) -> dict[str, int]:
    """``virDomainSetBlockIoTune`` parameters for a disk; 0 is libvirt's "unlimited".

    The total_* limits are cleared explicitly: libvirt keeps what is not named, and
    refuses a total together with a read or write limit.
    """
    params = {"total_iops_sec": 0, "total_bytes_sec": 0}
    for name in IOTUNE_FIELDS:
        params[name] = int(getattr(qos, name) or 0)
    return params


def _cputune(dom: ET.Element, qos: QosSpec) -> ET.Element:
    shares, period, quota = cpu_tune(qos.cpu)
    tune = _sub(dom, "cputune")
    _sub(tune, "shares", str(shares))
    _sub(tune, "period", str(period))
    _sub(tune, "quota", str(quota))
    return tune


def _iotune(disk: ET.Element, qos: QosSpec) -> None:
    limits = {name: getattr(qos, name) for name in IOTUNE_FIELDS
              if getattr(qos, name) is not None}
    if limits:
        tune = _sub(disk, "iotune")
        for name, value in limits.items():
            _sub(tune, name, str(value))


def _net_qos(inst: ET.Element, qos: QosSpec) -> None:
    """The NIC limit, kept in Yun's metadata: libvirt's <bandwidth> is not used (see
    :mod:`.shaping`), the driver shapes the taps from this after each start."""
    for el in inst.findall(f"{_Y}qos"):
        inst.remove(el)
    if qos.bandwidth_kbit is not None:
        _sub(inst, f"{_Y}qos", bandwidth_kbit=str(qos.bandwidth_kbit))


def apply_qos(xml: str, qos: QosSpec) -> str:
    """``xml`` (a domain definition as libvirt returns it) with ``qos`` in place of its
    CPU tuning, every disk's iotune and every NIC's bandwidth; everything else kept."""
    dom = ET.fromstring(xml)
    old = dom.find("cputune")
    kept: list[ET.Element] = []
    if old is not None:
        # Pinning and other tuning an operator set stay; only what QoS owns is replaced.
        kept = [el for el in old if el.tag not in ("shares", "period", "quota")]
        dom.remove(old)
    _cputune(dom, qos).extend(kept)
    for disk in dom.findall("devices/disk"):
        if disk.get("device", "disk") != "disk":
            continue
        for el in disk.findall("iotune"):
            disk.remove(el)
        _iotune(disk, qos)
    inst = dom.find(f"metadata/{_Y}instance")
    if inst is None:
        raise ValueError("not a Yun domain: no Yun metadata")
    _net_qos(inst, qos)
    ET.indent(dom)
    return ET.tostring(dom, encoding="unicode")


def _int(text: str | None) -> int | None:
    text = (text or "").strip()
    return int(text) if text.isdigit() else None


def parse_qos(dom: ET.Element) -> QosSpec:
    """The QoS limits a domain XML holds (the live XML: the limits in force).

    Disks all get the same limits from Yun; the first one's are reported. The NIC
    limit is read from Yun's metadata (see :func:`_net_qos`).
    A domain without <cputune><shares> (defined before QoS existed) reads as medium,
    libvirt's and the kernel's default weight being the same for every domain.
    """
    shares = _int(dom.findtext("cputune/shares"))
    fields: dict[str, object] = {"cpu": cpu_level(shares) if shares else CpuQos.MEDIUM}
    disk = dom.find("devices/disk[@device='disk']/iotune")
    if disk is not None:
        for name in IOTUNE_FIELDS:
            value = _int(disk.findtext(name))
            if value:  # libvirt may print 0 for "unlimited"
                fields[name] = value
    net = dom.find(f"metadata/{_Y}instance/{_Y}qos")
    kbit = _int(net.get("bandwidth_kbit")) if net is not None else None
    if kbit:
        fields["bandwidth_kbit"] = kbit
    return QosSpec.model_validate(fields)


def _interface(devices: ET.Element, nic: ResolvedNic) -> ET.Element:
    """The ``<interface>`` of ``nic`` under ``devices``."""
    # The bandwidth limit is put on the tap by the driver (see .shaping), not by
    # <bandwidth>.
    if nic.bridge is not None:
        # type='bridge' (direct mode): libvirt creates the tap (named by <target>) and
        # joins it to the bridge.
        el = _sub(devices, "interface", type="bridge")
        _sub(el, "source", bridge=nic.bridge)
        _sub(el, "mac", address=nic.mac)
        _sub(el, "target", dev=nic.tap)
    else:
        # type='ethernet' (sandbox mode): the routed tap was made by the network
        # backend; libvirt only opens it (managed='no') and leaves it when the domain
        # stops.
        el = _sub(devices, "interface", type="ethernet")
        _sub(el, "mac", address=nic.mac)
        _sub(el, "target", dev=nic.tap, managed="no")
    _sub(el, "model", type="virtio")
    return el


def interface_xml(nic: ResolvedNic) -> str:
    """The ``<interface>`` device of ``nic`` alone, as libvirt attaches it to a running
    domain (the same element the domain's definition holds)."""
    holder = ET.Element("devices")
    return ET.tostring(_interface(holder, nic), encoding="unicode")


def _mac_of(interface: ET.Element) -> str:
    mac = interface.find("mac")
    return (mac.get("address", "") if mac is not None else "").lower()


def has_nic(xml: str, mac: str) -> bool:
    """Whether the domain ``xml`` has an interface with MAC ``mac``."""
    return any(_mac_of(i) == mac.lower() for i in ET.fromstring(xml).findall("devices/interface"))


def with_nic(xml: str, nic: ResolvedNic) -> str:
    """The domain definition ``xml`` with ``nic`` plugged in (interface and Yun metadata);
    unchanged if it has it already."""
    dom = ET.fromstring(xml)
    inst = dom.find(f"metadata/{_Y}instance")
    devices = dom.find("devices")
    if inst is None or devices is None:
        raise ValueError("not a Yun domain: no Yun metadata or devices")
    if not any(_mac_of(i) == nic.mac.lower() for i in devices.findall("interface")):
        _interface(devices, nic)
    if not any(n.get("id") == nic.nic_id for n in inst.findall(f"{_Y}nic")):
        _sub(inst, f"{_Y}nic", id=nic.nic_id, mac=nic.mac)
    ET.indent(dom)
    return ET.tostring(dom, encoding="unicode")


def without_nic(xml: str, nic_id: str, mac: str) -> str:
    """The domain definition ``xml`` with the NIC ``nic_id`` (MAC ``mac``) taken out."""
    dom = ET.fromstring(xml)
    devices = dom.find("devices")
    for iface in devices.findall("interface") if devices is not None else []:
        if _mac_of(iface) == mac.lower() and devices is not None:
            devices.remove(iface)
    inst = dom.find(f"metadata/{_Y}instance")
    for el in inst.findall(f"{_Y}nic") if inst is not None else []:
        if el.get("id") == nic_id and inst is not None:
            inst.remove(el)
    ET.indent(dom)
    return ET.tostring(dom, encoding="unicode")


def nic_mac(xml: str, nic_id: str) -> str | None:
    """The MAC of NIC ``nic_id`` as Yun's metadata in ``xml`` records it (None: none)."""
    for el in ET.fromstring(xml).findall(f"metadata/{_Y}instance/{_Y}nic"):
        if el.get("id") == nic_id:
            return el.get("mac", "").lower() or None
    return None


def build_domain_xml(
    spec: DomainSpec,
    disks: Sequence[ResolvedDisk],
    nics: Sequence[ResolvedNic],
    *,
    accel: str,
    console_log: Path,
    vnc_listen: str = "0.0.0.0",
    cache_modes: Mapping[str, str] | None = None,
) -> str:
    """The persistent domain XML of ``spec`` with its resolved disks and NICs.

    ``accel`` ("kvm" or "tcg") picks the domain type and CPU model; ``console_log`` is
    where virtlogd appends the serial console; ``cache_modes`` maps a disk id to its
    cache mode ("none" by default: O_DIRECT, safe for migration and host crashes;
    callers pass "writeback" for files on file systems without O_DIRECT, e.g. tmpfs).
    """
    cache_modes = cache_modes or {}
    dom = ET.Element("domain", {"type": domain_type(accel)})
    _sub(dom, "name", domain_name(spec.uuid))
    _sub(dom, "uuid", spec.uuid)
    _sub(dom, "title", spec.name)
    _sub(dom, "description", f"Yun VM {spec.name}")

    meta = _sub(dom, "metadata")
    inst = _sub(meta, f"{_Y}instance")
    _sub(inst, f"{_Y}uuid", spec.uuid)
    _sub(inst, f"{_Y}name", spec.name)
    targets = disk_targets(disks)
    for disk, (dev, _bus) in zip(disks, targets, strict=True):
        _sub(inst, f"{_Y}disk", id=disk.disk_id, target=dev)
    for nic in nics:
        _sub(inst, f"{_Y}nic", id=nic.nic_id, mac=nic.mac)
    _net_qos(inst, spec.qos)

    _sub(dom, "memory", str(spec.memory_mb), unit="MiB")
    _sub(dom, "currentMemory", str(spec.memory_mb), unit="MiB")
    _sub(dom, "vcpu", str(spec.vcpus), placement="static")
    _cputune(dom, spec.qos)

    os_el = _sub(dom, "os")
    _sub(os_el, "type", "hvm", arch="x86_64", machine="pc")
    _sub(os_el, "boot", dev="hd")
    features = _sub(dom, "features")
    _sub(features, "acpi")  # the ACPI power button is how shutdown() asks the guest
    _sub(features, "apic")
    if accel == "kvm":
        # host-model: the host's features, but a named model libvirt can migrate.
        _sub(dom, "cpu", mode="host-model", check="partial")
    else:
        # TCG emulates qemu64 well; host-model would ask for features TCG lacks.
        cpu = _sub(dom, "cpu", mode="custom", match="exact", check="none")
        _sub(cpu, "model", "qemu64", fallback="forbid")
    _sub(dom, "clock", offset="utc")
    _sub(dom, "on_poweroff", "destroy")
    _sub(dom, "on_reboot", "restart")
    _sub(dom, "on_crash", "destroy")

    devices = _sub(dom, "devices")
    for disk, (dev, bus) in zip(disks, targets, strict=True):
        if disk.format not in ("qcow2", "raw"):
            raise ValueError(f"disk {disk.disk_id!r}: unknown format {disk.format!r}")
        el = _sub(devices, "disk", type="file", device="disk")
        _sub(el, "driver", name="qemu", type=disk.format,
             cache=cache_modes.get(disk.disk_id, "none"))
        _sub(el, "source", file=str(disk.path))
        _sub(el, "target", dev=dev, bus=bus)
        _iotune(el, spec.qos)
    for nic in nics:
        _interface(devices, nic)
    serial = _sub(devices, "serial", type="pty")
    _sub(serial, "log", file=str(console_log), append="on")
    _sub(serial, "target", port="0")
    console = _sub(devices, "console", type="pty")
    _sub(console, "target", type="serial", port="0")
    if spec.vnc:
        _sub(devices, "input", type="tablet", bus="usb")  # absolute pointer for VNC
        _sub(devices, "graphics", type="vnc", port="-1", autoport="yes", listen=vnc_listen)
        video = _sub(devices, "video")
        _sub(video, "model", type="vga")
    _sub(devices, "memballoon", model="virtio")
    ET.indent(dom)
    return ET.tostring(dom, encoding="unicode")


@dataclass(frozen=True)
class ParsedDomain:
    """What Yun reads back from a domain's XML (live or persistent)."""

    uuid: str
    domain_name: str
    name: str  # the VM's name from the Yun metadata
    vcpus: int
    memory_mb: int
    vnc_port: int | None
    console_log: Path | None
    disks: dict[str, str] = field(default_factory=dict)  # disk id -> target dev
    qos: QosSpec = field(default_factory=QosSpec)
    disk_targets: tuple[str, ...] = ()  # target dev of every disk (device='disk')
    nic_taps: tuple[str, ...] = ()  # host-side device (tap) of every interface
    nic_macs: tuple[str, ...] = ()  # MAC of every interface


def _memory_mb(el: ET.Element | None) -> int:
    if el is None or not (el.text or "").strip():
        return 0
    value = int((el.text or "0").strip())
    unit = el.get("unit", "KiB")
    scale = {"b": 1, "bytes": 1, "KiB": 1024, "k": 1024, "MiB": 1024**2, "M": 1024**2,
             "GiB": 1024**3, "G": 1024**3, "KB": 1000, "MB": 1000**2, "GB": 1000**3}
    return value * scale.get(unit, 1024) // (1024 * 1024)


def parse_domain_xml(xml: str) -> ParsedDomain | None:
    """The Yun view of a libvirt domain XML, or None if Yun does not manage it."""
    root = ET.fromstring(xml)
    inst = root.find(f"metadata/{_Y}instance")
    if inst is None:
        return None
    uuid = (root.findtext("uuid") or "").strip()
    port: int | None = None
    graphics = root.find("devices/graphics[@type='vnc']")
    if graphics is not None:
        raw = graphics.get("port", "-1")
        port = int(raw) if raw.lstrip("-").isdigit() and int(raw) > 0 else None
    log_el = root.find("devices/serial/log")
    log_file = log_el.get("file") if log_el is not None else None
    vcpu_text = (root.findtext("vcpu") or "0").strip()
    # An Element with no children is falsy, so "find(a) or find(b)" would be wrong.
    memory = root.find("currentMemory")
    if memory is None:
        memory = root.find("memory")
    return ParsedDomain(
        uuid=uuid,
        domain_name=(root.findtext("name") or "").strip(),
        name=(inst.findtext(f"{_Y}name") or "").strip(),
        vcpus=int(vcpu_text) if vcpu_text.isdigit() else 0,
        memory_mb=_memory_mb(memory),
        vnc_port=port,
        console_log=Path(log_file) if log_file else None,
        disks={d.get("id", ""): d.get("target", "") for d in inst.findall(f"{_Y}disk")},
        qos=parse_qos(root),
        disk_targets=tuple(
            t.get("dev", "") for t in root.findall("devices/disk[@device='disk']/target")),
        nic_taps=tuple(t.get("dev", "") for t in root.findall("devices/interface/target")),
        nic_macs=tuple(_mac_of(i) for i in root.findall("devices/interface")),
    )
