"""The simulated hypervisor: the driver contract with no QEMU, for many nodes on one machine.

Like Nova's fake driver, it keeps domains in memory and honours the same
idempotence and error rules as the libvirt driver. ``fail_next(op)`` makes the
next call of an operation fail, and ``latency`` adds a delay to every call, so
tests can exercise rollbacks and timing without real guests.

Given a state file (see :mod:`.hostfile`), it behaves like a libvirt host across a
restart of its process: persistent domains come back, shut off (the process dying is a
host crash: every guest died with it). Without one, domains live in memory only.

A test hook for hosts in another process (``yun serve sim-nodes``), where a test cannot
reach the driver object: a file ``sim-poweroff`` beside the state file, one VM uuid a
line, is read and removed whenever the domains are listed (each node report). Each
named domain that runs is switched off behind the node agent's back, with no event, as
a guest powering itself off unseen: the control server learns it only from the node's
next report (``benchmarks/inventory_scale.py`` measures how soon it shows in the API).
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from yun.node.hypervisor.base import (
    SEED_DISK_ID,
    Capabilities,
    ConsoleInfo,
    DomainEvent,
    DomainNotFound,
    DomainNotRunning,
    HostCapacity,
    HypervisorDriver,
    HypervisorError,
    ResolvedDisk,
    ResolvedNic,
)
from yun.node.hypervisor.sim.hostfile import SimHostFile, host_file
from yun.proto.messages import DomainInfo, DomainSpec, DomainState, QosSpec

log = logging.getLogger("yun.node.sim")

POWEROFF_FILE = "sim-poweroff"  # the test hook's file, beside the host's state file


@dataclass
class SimDomain:
    spec: DomainSpec
    disks: list[ResolvedDisk]
    nics: list[ResolvedNic]
    state: DomainState = DomainState.SHUTOFF
    console: list[str] = field(default_factory=list)
    #: disk id -> virtual size in bytes the guest sees, once resize_disk set it
    sizes: dict[str, int] = field(default_factory=dict)

    def log(self, line: str) -> None:
        self.console.append(f"[{time.time():.3f}] {line}")

    def saved(self) -> dict[str, Any]:
        """The domain as kept in the host's state file (its console is not kept)."""
        return {
            "state": self.state.value,
            "disk_ids": [d.disk_id for d in self.spec.disks],
            "macs": [n.mac for n in self.nics],
            "spec": self.spec.model_dump(mode="json"),
            "disks": [{"disk_id": d.disk_id,
                       "path": str(d.path) if d.path is not None else None,
                       "format": d.format, "bus": d.bus, "device": d.device,
                       "read_only": d.read_only, "shared": d.shared} for d in self.disks],
            "sizes": dict(self.sizes),
            "nics": [{"nic_id": n.nic_id, "mac": n.mac, "bridge": n.bridge, "tap": n.tap}
                     for n in self.nics],
        }

    @classmethod
    def restored(cls, data: dict[str, Any]) -> SimDomain:
        """A domain read back from the state file after the host restarted: shut off."""
        dom = cls(
            spec=DomainSpec.model_validate(data["spec"]),
            disks=[ResolvedDisk(disk_id=d["disk_id"],
                                path=Path(d["path"]) if d.get("path") else None,
                                format=d["format"], bus=d.get("bus", "virtio"),
                                device=d.get("device", "disk"),
                                read_only=bool(d.get("read_only", False)),
                                shared=bool(d.get("shared", False)))
                   for d in data.get("disks", [])],
            sizes={k: int(v) for k, v in data.get("sizes", {}).items()},
            nics=[ResolvedNic(**n) for n in data.get("nics", [])],
            state=DomainState.SHUTOFF,
        )
        dom.log(f"host restarted; the domain was {data.get('state')} and is shut off")
        return dom


class SimDriver(HypervisorDriver):
    """Simulated domains of one simulated host."""

    name = "sim"
    caps = Capabilities(console=True, qos_cpu=True, qos_disk=True, qos_net=True,
                        hotplug_nic=True, hotplug_disk=True)

    def __init__(self, hostname: str = "sim", vcpus: int = 64, memory_mb: int = 262144,
                 latency: float = 0.0, state_file: Path | SimHostFile | None = None) -> None:
        self.hostname = hostname
        self.vcpus = vcpus
        self.memory_mb = memory_mb
        self.latency = latency
        self.domains: dict[str, SimDomain] = {}
        self._faults: dict[str, int] = {}
        self._crash_on_start = 0
        self._events: asyncio.Queue[DomainEvent] = asyncio.Queue()
        self._file = host_file(state_file)
        self.poweroff_file = (self._file.path.parent / POWEROFF_FILE
                              if self._file is not None else None)
        if self._file is not None:
            for uuid, data in self._file.section("domains").items():
                self.domains[uuid] = SimDomain.restored(data)
            if self.domains:
                log.info("sim host restarted with its domains shut off", extra={
                    "node_name": hostname, "domains": len(self.domains)})
                self._save()

    def _save(self) -> None:
        """Persist every domain in the host's state file (when it has one)."""
        if self._file is not None:
            self._file.save("domains", self._sections)

    def _sections(self) -> dict[str, dict[str, Any]]:
        return {"domains": {u: d.saved() for u, d in self.domains.items()}}

    # -- test knobs -------------------------------------------------------------------------

    def fail_next(self, op: str, times: int = 1) -> None:
        """Make the next ``times`` calls of ``op`` (e.g. "start") raise HypervisorError."""
        self._faults[op] = self._faults.get(op, 0) + times

    def clear_faults(self) -> None:
        """Forget every failure armed with :meth:`fail_next` or :meth:`crash_next_boot`."""
        self._faults.clear()
        self._crash_on_start = 0

    def crash_next_boot(self, times: int = 1) -> None:
        """Make the next ``times`` started domains crash as soon as they boot."""
        self._crash_on_start += times

    async def _enter(self, op: str) -> None:
        if self.latency:
            await asyncio.sleep(self.latency)
        if self._faults.get(op):
            self._faults[op] -= 1
            raise HypervisorError(f"simulated failure of {op}")

    def _get(self, uuid: str) -> SimDomain:
        dom = self.domains.get(uuid)
        if dom is None:
            raise DomainNotFound(f"no domain {uuid} on {self.hostname}")
        return dom

    def _set(self, dom: SimDomain, state: DomainState, reason: str) -> None:
        if dom.state is not state:
            dom.state = state
            dom.log(f"state {state} ({reason})")
            self._save()
            self._events.put_nowait(DomainEvent(dom.spec.uuid, state, reason))

    # -- contract ---------------------------------------------------------------------------

    async def host_info(self) -> HostCapacity:
        used = sum(d.spec.memory_mb for d in self.domains.values()
                   if d.state is DomainState.RUNNING)
        running_vcpus = sum(d.spec.vcpus for d in self.domains.values()
                            if d.state is DomainState.RUNNING)
        return HostCapacity(hostname=self.hostname, vcpus=self.vcpus, memory_mb=self.memory_mb,
                            accel="sim", cpu_load=min(1.0, running_vcpus / (4 * self.vcpus)),
                            memory_used_mb=used)

    def _info(self, dom: SimDomain) -> DomainInfo:
        return DomainInfo(uuid=dom.spec.uuid, name=dom.spec.name, state=dom.state,
                          vcpus=dom.spec.vcpus, memory_mb=dom.spec.memory_mb,
                          qos=dom.spec.qos, nics=[n.mac for n in dom.nics],
                          disks=[d.disk_id for d in dom.disks if d.device == "disk"],
                          cdrom_image=_cdrom_image(dom.disks))

    def _external_poweroffs(self) -> None:
        """Switch off the running domains the test hook's file names (see the module's
        docstring), silently, and remove the file. One failed stat when there is none."""
        if self.poweroff_file is None:
            return
        try:
            text = self.poweroff_file.read_text()
        except FileNotFoundError:
            return
        except OSError as exc:
            log.warning("sim poweroff requests not read: %s", exc,
                        extra={"node_name": self.hostname, "file": str(self.poweroff_file)})
            return
        self.poweroff_file.unlink(missing_ok=True)
        for uuid in text.split():
            dom = self.domains.get(uuid)
            if dom is None or dom.state is not DomainState.RUNNING:
                log.warning("sim poweroff request for a domain not running", extra={
                    "node_name": self.hostname, "vm_uuid": uuid,
                    "state": dom.state.value if dom else None})
                continue
            # No event and no _set: the agent must find it out by listing, as the
            # control server must from the report.
            dom.state = DomainState.SHUTOFF
            dom.log("state shutoff (powered off behind the agent's back: test hook)")
            self._save()
            log.info("sim domain powered off by request", extra={
                "node_name": self.hostname, "vm_uuid": uuid})

    async def list_domains(self) -> list[DomainInfo]:
        await self._enter("list_domains")
        self._external_poweroffs()
        return [self._info(d) for d in self.domains.values()]

    async def get_domain(self, uuid: str) -> DomainInfo | None:
        await self._enter("get_domain")
        dom = self.domains.get(uuid)
        return self._info(dom) if dom else None

    async def ensure_defined(self, spec: DomainSpec, disks: list[ResolvedDisk],
                             nics: list[ResolvedNic]) -> None:
        await self._enter("ensure_defined")
        if spec.boot == "cdrom" and not any(
                d.device == "cdrom" and d.disk_id != SEED_DISK_ID for d in disks):
            raise HypervisorError(f"domain {spec.uuid}: boot from cdrom needs a CD drive "
                                  "(spec.cdrom)")
        dom = self.domains.get(spec.uuid)
        if dom is None:
            self.domains[spec.uuid] = SimDomain(spec, disks, nics)
            self.domains[spec.uuid].log("defined")
        else:
            dom.spec, dom.disks, dom.nics = spec, disks, nics
        self._save()

    async def start(self, uuid: str) -> None:
        await self._enter("start")
        dom = self._get(uuid)
        if dom.state is not DomainState.RUNNING:
            self._set(dom, DomainState.RUNNING, "booted")
            if self._crash_on_start:
                self._crash_on_start -= 1
                dom.log("kernel panic (simulated)")
                self._set(dom, DomainState.CRASHED, "crashed at boot")
                return
            dom.log("YUN-GUEST-READY (simulated)")

    async def shutdown(self, uuid: str, timeout: float) -> None:
        await self._enter("shutdown")
        self._set(self._get(uuid), DomainState.SHUTOFF, "shutdown")

    async def destroy(self, uuid: str) -> None:
        await self._enter("destroy")
        self._set(self._get(uuid), DomainState.SHUTOFF, "destroyed")

    async def reboot(self, uuid: str) -> None:
        await self._enter("reboot")
        dom = self._get(uuid)
        if dom.state is not DomainState.RUNNING:
            raise DomainNotRunning(
                f"cannot reboot domain {uuid}: it is {dom.state}, not running (start it "
                "instead)")
        dom.log("rebooted")

    async def set_qos(self, uuid: str, qos: QosSpec) -> None:
        """Keep ``qos`` as the domain's limits (in the host's state file too), running or
        not, as libvirt keeps them live and in the definition."""
        await self._enter("set_qos")
        dom = self._get(uuid)
        dom.spec = dom.spec.model_copy(update={"qos": qos})
        dom.log(f"qos set: {qos.model_dump(mode='json', exclude_none=True)}")
        self._save()

    async def attach_nic(self, uuid: str, nic: ResolvedNic) -> None:
        """Plug ``nic`` in (running or not, as libvirt plugs it live and into the
        definition); a NIC already there (by MAC) is left alone."""
        await self._enter("attach_nic")
        dom = self._get(uuid)
        if any(n.mac == nic.mac for n in dom.nics):
            return
        dom.nics = [*dom.nics, nic]
        dom.log(f"NIC {nic.nic_id} ({nic.mac}) plugged")
        self._save()

    async def detach_nic(self, uuid: str, nic_id: str) -> None:
        """Unplug NIC ``nic_id``; no error if it is not there."""
        await self._enter("detach_nic")
        dom = self._get(uuid)
        kept = [n for n in dom.nics if n.nic_id != nic_id]
        if len(kept) == len(dom.nics):
            return
        dom.nics = kept
        dom.log(f"NIC {nic_id} unplugged")
        self._save()

    # -- disks ----------------------------------------------------------------------------

    async def attach_disk(self, uuid: str, disk: ResolvedDisk) -> None:
        """Plug ``disk`` in (running or not, as libvirt plugs it live and into the
        definition); a disk already there (by id) is left alone."""
        await self._enter("attach_disk")
        dom = self._get(uuid)
        if disk.device != "disk":
            raise HypervisorError(
                f"disk {disk.disk_id!r} of domain {uuid} is a CD drive: CD drives are "
                "defined with the domain and change their medium with change_media")
        if any(d.disk_id == disk.disk_id for d in dom.disks):
            return
        dom.disks = [*dom.disks, disk]
        dom.log(f"disk {disk.disk_id} ({disk.path}) plugged")
        self._save()

    async def detach_disk(self, uuid: str, disk_id: str) -> None:
        """Unplug disk ``disk_id``; no error if it is not there."""
        await self._enter("detach_disk")
        dom = self._get(uuid)
        found = [d for d in dom.disks if d.disk_id == disk_id]
        if not found:
            return
        if found[0].device != "disk":
            raise HypervisorError(f"disk {disk_id!r} of domain {uuid} is a CD drive: eject "
                                  "its medium instead of unplugging it")
        dom.disks = [d for d in dom.disks if d.disk_id != disk_id]
        dom.sizes.pop(disk_id, None)
        dom.log(f"disk {disk_id} unplugged")
        self._save()

    def _running_disk(self, uuid: str, disk_id: str, what: str) -> tuple[SimDomain, ResolvedDisk]:
        dom = self._get(uuid)
        if dom.state is not DomainState.RUNNING:
            raise DomainNotRunning(f"cannot {what} disk {disk_id} of domain {uuid} live: it is "
                                   f"{dom.state}, not running")
        for disk in dom.disks:
            if disk.disk_id == disk_id and disk.device == "disk":
                return dom, disk
        raise HypervisorError(f"domain {uuid} has no disk {disk_id!r}")

    async def resize_disk(self, uuid: str, disk_id: str, size_bytes: int) -> None:
        """Grow the disk the running guest sees (its file's size when nothing resized it
        before); shrinking is refused, the same size left alone."""
        await self._enter("resize_disk")
        dom, disk = self._running_disk(uuid, disk_id, "resize")
        current = dom.sizes.get(disk_id)
        if current is None:
            current = disk.path.stat().st_size if disk.path and disk.path.exists() else 0
        if size_bytes < current:
            raise HypervisorError(
                f"disk {disk_id} of domain {uuid} is {current} bytes: shrinking it to "
                f"{size_bytes} would cut the guest's data; only growing is allowed")
        dom.sizes[disk_id] = size_bytes
        dom.log(f"disk {disk_id} resized to {size_bytes} bytes")
        self._save()

    def disk_size(self, uuid: str, disk_id: str) -> int | None:
        """The size resize_disk gave disk ``disk_id`` (None: never resized); for tests."""
        return self._get(uuid).sizes.get(disk_id)

    async def change_media(self, uuid: str, disk_id: str, path: Path | None) -> None:
        """Put ``path`` into CD drive ``disk_id`` (None: eject), running or not."""
        await self._enter("change_media")
        dom = self._get(uuid)
        for i, disk in enumerate(dom.disks):
            if disk.disk_id == disk_id:
                if disk.device != "cdrom":
                    raise HypervisorError(f"domain {uuid}: disk {disk_id!r} is not a CD "
                                          "drive: its medium cannot change")
                if disk.path != path:
                    dom.disks[i] = replace(disk, path=path)
                    dom.log(f"CD drive {disk_id}: {path or 'ejected'}")
                    self._save()
                return
        raise HypervisorError(f"domain {uuid}: the domain has no CD drive {disk_id!r}")

    async def backup_disk(self, uuid: str, disk_id: str, target: Path) -> None:
        """Copy the disk's file to ``target`` (the sim guest writes nothing meanwhile)."""
        await self._enter("backup_disk")
        _dom, disk = self._running_disk(uuid, disk_id, "copy")
        if disk.path is None or not disk.path.exists():
            raise HypervisorError(f"disk {disk_id} of domain {uuid}: its file "
                                  f"{disk.path} does not exist")
        source = disk.path
        await asyncio.to_thread(_copy_file, source, Path(target))

    async def undefine(self, uuid: str) -> None:
        await self._enter("undefine")
        dom = self.domains.pop(uuid, None)
        if dom is not None:
            self._save()
            # As libvirt: a running domain is stopped first, and every undefine is told.
            if dom.state is DomainState.RUNNING:
                self._events.put_nowait(DomainEvent(uuid, DomainState.SHUTOFF, "destroyed"))
            self._events.put_nowait(DomainEvent(uuid, DomainState.ABSENT, "undefined"))

    async def console(self, uuid: str) -> ConsoleInfo:
        self._get(uuid)
        return ConsoleInfo(vnc_host=None, vnc_port=None, serial_log=None)

    async def console_log(self, uuid: str, max_bytes: int = 65536) -> str:
        return ("\n".join(self._get(uuid).console) + "\n")[-max_bytes:]

    async def events(self) -> AsyncIterator[DomainEvent]:  # type: ignore[override]
        while True:
            yield await self._events.get()


def _cdrom_image(disks: list[ResolvedDisk]) -> str | None:
    """The image id of the ISO in the CD drive (the cached ``<image_id>.iso``'s stem)."""
    for disk in disks:
        if disk.device == "cdrom" and disk.disk_id != SEED_DISK_ID and disk.path is not None:
            return disk.path.stem
    return None


def _copy_file(source: Path, target: Path) -> None:
    """Copy ``source`` to ``target`` atomically (a temporary file renamed over it)."""
    tmp = target.with_name(f".{target.name}.part")
    try:
        shutil.copyfile(source, tmp)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
