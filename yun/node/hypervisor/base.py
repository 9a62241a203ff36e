"""The hypervisor driver contract: small, declarative, idempotent, async.

Every driver (``libvirt``, ``sim``) honours the same contract; nothing outside a
driver may ask which one it is talking to. Operations on a domain that is already
in the requested state succeed quietly, so that a retried command is harmless.
The one exception is :meth:`HypervisorDriver.reboot`: "restart it" has no meaning
for a stopped domain, and starting a domain an operator (or a racing stop) left off
would be a surprise, so a reboot of a domain that is not running is refused with
:class:`DomainNotRunning` by every driver. tests/integration/test_driver_contract.py
runs one suite over every driver to hold them to this contract.
"""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

from yun.proto.messages import DomainInfo, DomainSpec, DomainState, NodeCapability, QosSpec


class HypervisorError(RuntimeError):
    """The hypervisor refused or failed an operation."""


class DomainNotFound(HypervisorError):
    """No domain with that uuid exists on this host."""


class NotSupported(HypervisorError):
    """The driver does not offer this operation (see :class:`Capabilities`)."""


class DomainNotRunning(HypervisorError):
    """The operation needs a running domain (a reboot of a stopped one)."""


@dataclass(frozen=True)
class Capabilities:
    """What a driver can do. Each flag is named as the :class:`NodeCapability` the node
    reports for it (see :func:`node_capabilities`)."""

    live_migrate: bool = False
    hotplug_disk: bool = False
    hotplug_nic: bool = False
    snapshots: bool = False
    console: bool = False
    qos_cpu: bool = False  # CPU levels (shares and a per-vCPU cap) applied by set_qos
    qos_disk: bool = False  # per-disk IOPS and bytes/s limits
    qos_net: bool = False  # per-NIC bandwidth in both directions


def node_capabilities(caps: Capabilities, accel: str) -> list[NodeCapability]:
    """The capabilities a node reports: the driver's flags that are set, and ``kvm``
    when guests run under KVM (not TCG emulation), in a stable order."""
    out: list[NodeCapability] = [
        cap for cap in NodeCapability
        if cap is not NodeCapability.KVM and getattr(caps, cap.value, False)]
    if accel == "kvm":
        out.append(NodeCapability.KVM)
    return out


@dataclass(frozen=True)
class HostCapacity:
    """What the host offers to VMs."""

    hostname: str
    vcpus: int
    memory_mb: int
    accel: str  # "kvm" or "tcg" (or "sim")
    cpu_load: float = 0.0
    memory_used_mb: int = 0


#: The disk id of a VM's cloud-init NoCloud seed (a read-only CD drive); every other CD
#: drive holds an installation ISO (or nothing).
SEED_DISK_ID = "cidata"


@dataclass(frozen=True)
class ResolvedDisk:
    """A disk of the spec, made real by the disk backend: a file the hypervisor opens."""

    disk_id: str
    path: Path | None  # None: an empty CD drive
    format: str  # "qcow2" or "raw"
    bus: str = "virtio"
    device: str = "disk"  # "disk" or "cdrom" (an ISO, or the cloud-init seed)
    read_only: bool = False
    #: the shared mount holds it: QEMU's image locking keeps other nodes off it
    shared: bool = False


@dataclass(frozen=True)
class ResolvedNic:
    """A NIC of the spec, made real by the network backend.

    ``bridge`` set: the hypervisor creates the tap and joins it to that bridge; None:
    the tap was made by the network backend (routed in sandbox mode, joined to the
    node's bridge in direct mode) and the hypervisor only opens it."""

    nic_id: str
    mac: str
    bridge: str | None
    tap: str


@dataclass(frozen=True)
class DomainEvent:
    """Something the hypervisor reports on its own: a domain started, stopped, crashed."""

    uuid: str
    state: DomainState
    reason: str = ""


@dataclass(frozen=True)
class ConsoleInfo:
    """How to reach a domain's display and serial log."""

    vnc_host: str | None
    vnc_port: int | None
    serial_log: Path | None
    extra: dict[str, str] = field(default_factory=dict)


class HypervisorDriver(abc.ABC):
    """One hypervisor on one host."""

    name: str = "abstract"
    caps: Capabilities = Capabilities()

    async def open(self) -> None:
        """Connect to the hypervisor; called once before any other method."""

    async def close(self) -> None:
        """Release the connection; running domains keep running."""

    @abc.abstractmethod
    async def host_info(self) -> HostCapacity:
        """Capacity and load of this host."""

    @abc.abstractmethod
    async def list_domains(self) -> list[DomainInfo]:
        """Every domain on this host that Yun manages (a full resync)."""

    @abc.abstractmethod
    async def get_domain(self, uuid: str) -> DomainInfo | None:
        """The domain ``uuid``, or None when it does not exist."""

    @abc.abstractmethod
    async def ensure_defined(
        self, spec: DomainSpec, disks: list[ResolvedDisk], nics: list[ResolvedNic]
    ) -> None:
        """Define the domain, or update its definition; never starts it."""

    @abc.abstractmethod
    async def start(self, uuid: str) -> None:
        """Boot the domain; a running domain is left alone."""

    @abc.abstractmethod
    async def shutdown(self, uuid: str, timeout: float) -> None:
        """Ask the guest to power off (ACPI); force it off after ``timeout`` seconds."""

    @abc.abstractmethod
    async def destroy(self, uuid: str) -> None:
        """Power the domain off at once; a stopped domain is left alone."""

    @abc.abstractmethod
    async def reboot(self, uuid: str) -> None:
        """Restart a running guest; :class:`DomainNotRunning` if it is not running
        (shut off, crashed or paused: start or resume it instead)."""

    @abc.abstractmethod
    async def undefine(self, uuid: str) -> None:
        """Forget the domain (destroying it first); no error if it does not exist."""

    @abc.abstractmethod
    async def console(self, uuid: str) -> ConsoleInfo:
        """Where the domain's display and serial log are."""

    @abc.abstractmethod
    async def console_log(self, uuid: str, max_bytes: int = 65536) -> str:
        """The tail of what the guest printed on its serial console."""

    @abc.abstractmethod
    def events(self) -> AsyncIterator[DomainEvent]:
        """Lifecycle events as the hypervisor reports them."""

    async def suspend(self, uuid: str) -> None:
        raise NotSupported(f"{self.name} cannot suspend domains")

    async def resume(self, uuid: str) -> None:
        raise NotSupported(f"{self.name} cannot resume domains")

    async def attach_disk(self, uuid: str, disk: ResolvedDisk) -> None:
        raise NotSupported(f"{self.name} cannot hot-plug disks")

    async def detach_disk(self, uuid: str, disk_id: str) -> None:
        raise NotSupported(f"{self.name} cannot hot-unplug disks")

    async def resize_disk(self, uuid: str, disk_id: str, size_bytes: int) -> None:
        """Grow disk ``disk_id`` of a running domain to ``size_bytes`` (the guest sees the
        new size at once). Only growing: a smaller size is refused."""
        raise NotSupported(f"{self.name} cannot resize disks online")

    async def change_media(self, uuid: str, disk_id: str, path: Path | None) -> None:
        """Insert the ISO at ``path`` into CD drive ``disk_id`` (None: eject), live when
        the domain runs and in its definition, like a CD changed by hand."""
        raise NotSupported(f"{self.name} cannot change CD media")

    async def backup_disk(self, uuid: str, disk_id: str, target: Path) -> None:
        """Write a consistent copy of disk ``disk_id`` of a running domain, as it was when
        the call began, to ``target`` (qcow2) while the guest goes on writing (F-IMAGE)."""
        raise NotSupported(f"{self.name} cannot copy the disk of a running domain")

    async def attach_nic(self, uuid: str, nic: ResolvedNic) -> None:
        raise NotSupported(f"{self.name} cannot hot-plug NICs")

    async def detach_nic(self, uuid: str, nic_id: str) -> None:
        raise NotSupported(f"{self.name} cannot hot-unplug NICs")

    async def set_qos(self, uuid: str, qos: QosSpec) -> None:
        """Apply ``qos`` to domain ``uuid``: at once if it runs, and in its definition so
        that it holds after the next boot. DomainNotFound when there is no such domain;
        :meth:`get_domain` then reports the limits in force in ``DomainInfo.qos``."""
        raise NotSupported(f"{self.name} cannot change QoS limits")

    async def migrate(self, uuid: str, target_uri: str) -> None:
        raise NotSupported(f"{self.name} cannot migrate domains")
