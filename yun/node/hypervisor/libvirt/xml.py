"""Libvirt domain XML for a Yun VM: built from the spec, parsed back from libvirt.

Pure functions, no libvirt connection, so they are unit-tested on their own. The XML
is built with ElementTree, never by string formatting, so that no name chosen by a
user can change the document's structure.

Yun marks the domains it manages with a ``<metadata>`` element in its own
namespace; everything else on the host (an operator's own VMs) is left alone::

    <metadata>
      <yun:instance xmlns:yun="https://yun.dev/xmlns/1">
        <yun:uuid>…</yun:uuid><yun:name>web-1</yun:name>
        <yun:disk id="root" target="vda"/><yun:disk id="cdrom" target="hdc" device="cdrom"/>
        <yun:nic id="n1" mac="52:54:00:…"/>
      </yun:instance>
    </metadata>

Disks are virtio (``vda``, ``vdb`` …; data volumes plugged later take the next free
letter); CD drives (an installation ISO, the cloud-init seed) are IDE, the bus the
``pc`` machine type has built in (SATA would need an AHCI controller added), on the
secondary channel first (``hdc``, ``hdd``) so that IDE disks keep ``hda``/``hdb``.
"""

from __future__ import annotations

import math
import xml.etree.ElementTree as ET
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from yun.node.hypervisor.base import SEED_DISK_ID, ResolvedDisk, ResolvedNic
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


#: IDE targets for CD drives, in the order they are taken: the secondary channel first.
_CDROM_TARGETS = ("hdc", "hdd", "hda", "hdb")
DEVICES = ("disk", "cdrom")


def disk_targets(disks: Sequence[ResolvedDisk]) -> list[tuple[str, str]]:
    """(target dev, libvirt bus) of each disk, numbered per bus in the given order; CD
    drives on the IDE bus, on the IDE targets the disks left free (hdc first)."""
    counters: dict[str, int] = {}
    out: list[tuple[str, str]] = []
    for disk in disks:
        if disk.device not in DEVICES:
            raise ValueError(f"disk {disk.disk_id!r}: unknown device {disk.device!r}")
        if disk.device == "cdrom":
            out.append(("", "ide"))  # numbered below, once the IDE disks are known
            continue
        if disk.bus not in _BUS_TARGETS:
            raise ValueError(f"disk {disk.disk_id!r}: unknown bus {disk.bus!r}")
        prefix, bus = _BUS_TARGETS[disk.bus]
        index = counters.get(prefix, 0)
        counters[prefix] = index + 1
        out.append((target_dev(prefix, index), bus))
    free = [t for t in _CDROM_TARGETS if t not in {dev for dev, _ in out}]
    # The ISO drive before the seed: BIOS boots the first CD drive.
    order = sorted((i for i, d in enumerate(disks) if d.device == "cdrom"),
                   key=lambda i: disks[i].disk_id == SEED_DISK_ID)
    if len(order) > len(free):
        raise ValueError(f"{len(order)} CD drives and {4 - len(free)} IDE disks: the IDE "
                         "bus has room for 4 devices")
    for i, dev in zip(order, free, strict=False):
        out[i] = (dev, "ide")
    return out


def next_disk_target(xmls: Sequence[str], prefix: str = "vd") -> str:
    """The first ``prefix`` target (``vdb`` after ``vda`` …) used by no disk of the
    domain XMLs ``xmls`` (live and definition) nor recorded in their Yun metadata."""
    used: set[str] = set()
    for xml in xmls:
        root = ET.fromstring(xml)
        used.update(t.get("dev", "") for t in root.findall("devices/disk/target"))
        used.update(d.get("target", "") for d in root.findall(f"metadata/{_Y}instance/{_Y}disk"))
    index = 0
    while target_dev(prefix, index) in used:
        index += 1
    return target_dev(prefix, index)


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


def _disk(devices: ET.Element, disk: ResolvedDisk, dev: str, bus: str, cache: str,
          qos: QosSpec) -> ET.Element:
    """The ``<disk>`` device of ``disk`` (target ``dev`` on ``bus``) under ``devices``.

    A ``shared`` disk (on the shared mount) gets nothing special: QEMU's image locking,
    on by default, is what keeps a second node from opening it while one has it open;
    ``<shareable/>`` would lift that lock and is never written."""
    if disk.device == "cdrom":
        el = _sub(devices, "disk", type="file", device="cdrom")
        # An ISO is a raw image; read-only, so any cache mode is safe.
        _sub(el, "driver", name="qemu", type="raw", cache=cache)
        if disk.path is not None:  # no <source>: an empty drive
            _sub(el, "source", file=str(disk.path))
        _sub(el, "target", dev=dev, bus=bus)
        _sub(el, "readonly")
        return el
    if disk.format not in ("qcow2", "raw"):
        raise ValueError(f"disk {disk.disk_id!r}: unknown format {disk.format!r}")
    if disk.path is None:
        raise ValueError(f"disk {disk.disk_id!r}: a disk needs a file (only a CD drive "
                         "may be empty)")
    el = _sub(devices, "disk", type="file", device="disk")
    _sub(el, "driver", name="qemu", type=disk.format, cache=cache)
    _sub(el, "source", file=str(disk.path))
    _sub(el, "target", dev=dev, bus=bus)
    if disk.read_only:
        _sub(el, "readonly")
    _iotune(el, qos)
    return el


def _meta_disk(inst: ET.Element, disk: ResolvedDisk, dev: str) -> None:
    attrs = {"id": disk.disk_id, "target": dev}
    if disk.device != "disk":
        attrs["device"] = disk.device
    _sub(inst, f"{_Y}disk", **attrs)


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
        _meta_disk(inst, disk, dev)
    for nic in nics:
        _sub(inst, f"{_Y}nic", id=nic.nic_id, mac=nic.mac)
    _net_qos(inst, spec.qos)

    _sub(dom, "memory", str(spec.memory_mb), unit="MiB")
    _sub(dom, "currentMemory", str(spec.memory_mb), unit="MiB")
    _sub(dom, "vcpu", str(spec.vcpus), placement="static")
    _cputune(dom, spec.qos)

    os_el = _sub(dom, "os")
    _sub(os_el, "type", "hvm", arch="x86_64", machine="pc")
    if spec.boot == "cdrom":
        if not any(d.device == "cdrom" and d.disk_id != SEED_DISK_ID for d in disks):
            raise ValueError("boot from cdrom needs a CD drive (spec.cdrom)")
        # From the ISO; once it is ejected (an installed system) from the disk.
        _sub(os_el, "boot", dev="cdrom")
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
    # Disks first, then CD drives, each in the given order.
    for disk, (dev, bus) in sorted(zip(disks, targets, strict=True),
                                   key=lambda pair: (pair[0].device != "disk",
                                                     pair[0].disk_id == SEED_DISK_ID)):
        _disk(devices, disk, dev, bus, cache_modes.get(disk.disk_id, "none"), spec.qos)
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
    cdrom_ids: frozenset[str] = frozenset()  # ids of the CD drives among ``disks``
    sources: dict[str, str] = field(default_factory=dict)  # target dev -> file ("": none)
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
        cdrom_ids=frozenset(d.get("id", "") for d in inst.findall(f"{_Y}disk")
                            if d.get("device") == "cdrom"),
        sources={_target_of(d): _source_of(d) for d in root.findall("devices/disk")},
        nic_taps=tuple(t.get("dev", "") for t in root.findall("devices/interface/target")),
        nic_macs=tuple(_mac_of(i) for i in root.findall("devices/interface")),
    )


def _target_of(disk: ET.Element) -> str:
    target = disk.find("target")
    return target.get("dev", "") if target is not None else ""


def _source_of(disk: ET.Element) -> str:
    source = disk.find("source")
    return source.get("file", "") if source is not None else ""


def attached_disks(parsed: ParsedDomain) -> list[str]:
    """Ids of the domain's disks in force (device disk, present in this XML), in the
    order Yun's metadata lists them."""
    present = set(parsed.disk_targets)
    return [disk_id for disk_id, dev in parsed.disks.items()
            if disk_id not in parsed.cdrom_ids and dev in present]


def cdrom_image(parsed: ParsedDomain) -> str | None:
    """The image id of the ISO in the domain's CD drive (not the cloud-init seed): the
    name of the cached file ``<image_id>.iso`` without its suffix; None when empty."""
    for disk_id in sorted(parsed.cdrom_ids):
        if disk_id == SEED_DISK_ID:
            continue
        source = parsed.sources.get(parsed.disks.get(disk_id, ""), "")
        if source:
            return Path(source).stem
    return None


# --------------------------------------------------------------------------- disk hot-plug


def _instance(dom: ET.Element) -> tuple[ET.Element, ET.Element]:
    inst = dom.find(f"metadata/{_Y}instance")
    devices = dom.find("devices")
    if inst is None or devices is None:
        raise ValueError("not a Yun domain: no Yun metadata or devices")
    return inst, devices


def disk_target(xml: str, disk_id: str) -> str | None:
    """The target dev Yun's metadata in ``xml`` records for disk ``disk_id`` (None: none)."""
    for el in ET.fromstring(xml).findall(f"metadata/{_Y}instance/{_Y}disk"):
        if el.get("id") == disk_id:
            return el.get("target") or None
    return None


def disk_device_xml(xml: str, target: str) -> str | None:
    """The ``<disk>`` device of ``xml`` on ``target``, as libvirt takes it to detach or
    update it (None: no such device)."""
    for disk in ET.fromstring(xml).findall("devices/disk"):
        if _target_of(disk) == target:
            return ET.tostring(disk, encoding="unicode")
    return None


def new_disk_xml(disk: ResolvedDisk, target: str, *, cache: str, qos: QosSpec) -> str:
    """The ``<disk>`` device plugging ``disk`` in on virtio ``target``, with the domain's
    disk limits ``qos``."""
    if disk.device != "disk":
        raise ValueError(f"disk {disk.disk_id!r}: only disks are plugged in, CD drives "
                         "change their media")
    holder = ET.Element("devices")
    return ET.tostring(_disk(holder, disk, target, "virtio", cache, qos), encoding="unicode")


def with_disk(xml: str, disk: ResolvedDisk, target: str, *, cache: str) -> str:
    """The domain definition ``xml`` with ``disk`` plugged in on ``target`` (device and
    Yun metadata, its disk limits those of the domain); what is there already is kept."""
    dom = ET.fromstring(xml)
    inst, devices = _instance(dom)
    if not any(_target_of(d) == target for d in devices.findall("disk")):
        # Disks stay together, before the other devices, as build_domain_xml writes them.
        position = max((i + 1 for i, el in enumerate(devices) if el.tag == "disk"), default=0)
        holder = ET.Element("devices")
        el = _disk(holder, disk, target, "virtio", cache, parse_qos(dom))
        devices.insert(position, el)
    if not any(d.get("id") == disk.disk_id for d in inst.findall(f"{_Y}disk")):
        _meta_disk(inst, disk, target)
    ET.indent(dom)
    return ET.tostring(dom, encoding="unicode")


def without_disk(xml: str, disk_id: str) -> str:
    """The domain XML with disk ``disk_id`` (its device and its metadata) taken out."""
    dom = ET.fromstring(xml)
    inst, devices = _instance(dom)
    for el in inst.findall(f"{_Y}disk"):
        if el.get("id") == disk_id:
            for disk in devices.findall("disk"):
                if _target_of(disk) == el.get("target"):
                    devices.remove(disk)
            inst.remove(el)
    ET.indent(dom)
    return ET.tostring(dom, encoding="unicode")


def media_xml(xml: str, disk_id: str, path: Path | None) -> str:
    """The ``<disk>`` of CD drive ``disk_id`` in ``xml`` holding ``path`` (None: empty),
    as ``virDomainUpdateDeviceFlags`` takes it; ValueError if there is no such drive."""
    target = disk_target(xml, disk_id)
    device = disk_device_xml(xml, target) if target else None
    if device is None:
        raise ValueError(f"the domain has no CD drive {disk_id!r}")
    el = ET.fromstring(device)
    if el.get("device") != "cdrom":
        raise ValueError(f"disk {disk_id!r} is not a CD drive: its medium cannot change")
    for old in el.findall("source"):
        el.remove(old)
    if path is not None:
        # <source> right after <driver>, where libvirt writes it.
        driver = el.find("driver")
        index = list(el).index(driver) + 1 if driver is not None else 0
        el.insert(index, ET.Element("source", {"file": str(path)}))
    return ET.tostring(el, encoding="unicode")


def with_media(xml: str, disk_id: str, path: Path | None) -> str:
    """The domain definition ``xml`` with ``path`` in CD drive ``disk_id`` (None: empty)."""
    dom = ET.fromstring(xml)
    _inst, devices = _instance(dom)
    new = ET.fromstring(media_xml(xml, disk_id, path))
    target = _target_of(new)
    for i, disk in enumerate(list(devices)):
        if disk.tag == "disk" and _target_of(disk) == target:
            devices.remove(disk)
            devices.insert(i, new)
    ET.indent(dom)
    return ET.tostring(dom, encoding="unicode")


def backup_xml(xml: str, target: str, file: Path) -> str:
    """A push-mode ``<domainbackup>`` copying disk ``target`` of live domain ``xml`` to
    ``file`` (qcow2); every other disk is left out of the backup."""
    backup = ET.Element("domainbackup", {"mode": "push"})
    disks = _sub(backup, "disks")
    for disk in ET.fromstring(xml).findall("devices/disk"):
        dev = _target_of(disk)
        if dev == target:
            el = _sub(disks, "disk", name=dev, backup="yes", type="file")
            _sub(el, "driver", type="qcow2")
            _sub(el, "target", file=str(file))
        else:
            _sub(disks, "disk", name=dev, backup="no")
    return ET.tostring(backup, encoding="unicode")


def instance_metadata(xml: str) -> str:
    """Yun's metadata element of domain ``xml`` as ``virDomainSetMetadata`` takes it.

    libvirt declares the "yun" prefix on the element itself and refuses an element that
    already declares it: it is handed over in the default namespace instead. User text
    is escaped ("<" is "&lt;"), so every "<yun:" here is a tag."""
    inst = ET.fromstring(xml).find(f"metadata/{_Y}instance")
    if inst is None:
        raise ValueError("not a Yun domain: no Yun metadata")
    text = ET.tostring(inst, encoding="unicode")
    return (text.replace(f'xmlns:yun="{YUN_NS}"', f'xmlns="{YUN_NS}"')
            .replace("<yun:", "<").replace("</yun:", "</"))
