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

import xml.etree.ElementTree as ET
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from yun.node.hypervisor.base import ResolvedDisk, ResolvedNic
from yun.proto.messages import DomainSpec

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

    _sub(dom, "memory", str(spec.memory_mb), unit="MiB")
    _sub(dom, "currentMemory", str(spec.memory_mb), unit="MiB")
    _sub(dom, "vcpu", str(spec.vcpus), placement="static")

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
    for nic in nics:
        el = _sub(devices, "interface", type="bridge")
        _sub(el, "source", bridge=nic.bridge)
        _sub(el, "mac", address=nic.mac)
        _sub(el, "target", dev=nic.tap)
        _sub(el, "model", type="virtio")
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
    )
