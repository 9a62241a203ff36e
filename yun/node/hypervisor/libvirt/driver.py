"""The libvirt hypervisor driver: Yun's VMs as libvirt domains on QEMU (KVM or TCG).

* Only Yun's domains are touched: each carries Yun metadata (see :mod:`.xml`) and is
  named ``yun-<uuid>``; other domains on the host are invisible to this driver.
* Libvirt calls block, so each runs in a worker thread (``asyncio.to_thread``); the
  event loop integration (:mod:`.events`) is safe for that.
* Lifecycle events arrive through libvirt's event loop on asyncio and are queued for
  :meth:`LibvirtDriver.events`.
* Guests belong to libvirtd, not to this process: :meth:`~LibvirtDriver.close` (or a
  crash of the agent) leaves them running, and a new driver finds them again.
* A connection that libvirtd closed (a libvirtd restart) is reopened on the next call;
  events emitted while it was down are lost, which a periodic :meth:`list_domains`
  resync covers.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import libvirt

from yun.node.hypervisor.base import (
    Capabilities,
    ConsoleInfo,
    DomainEvent,
    DomainNotFound,
    DomainNotRunning,
    HostCapacity,
    HypervisorDriver,
    HypervisorError,
    NotSupported,
    ResolvedDisk,
    ResolvedNic,
)
from yun.node.hypervisor.libvirt.accel import resolve_accel
from yun.node.hypervisor.libvirt.events import ensure_event_impl, lifecycle_event
from yun.node.hypervisor.libvirt.shaping import (
    ifb_name,
    in_netns,
    shape_commands,
    unshape_commands,
)
from yun.node.hypervisor.libvirt.xml import (
    DOMAIN_NAME_PREFIX,
    YUN_NS,
    ParsedDomain,
    apply_qos,
    attached_disks,
    backup_xml,
    build_domain_xml,
    cdrom_image,
    disk_device_xml,
    disk_target,
    domain_name,
    has_nic,
    instance_metadata,
    interface_xml,
    iotune_params,
    media_xml,
    new_disk_xml,
    next_disk_target,
    nic_mac,
    parse_domain_xml,
    parse_qos,
    scheduler_params,
    with_disk,
    with_media,
    with_nic,
    without_disk,
    without_nic,
)
from yun.proto.messages import DomainInfo, DomainSpec, DomainState, QosSpec
from yun.util.ids import canonical_uuid as canonical_uuid_or_none
from yun.util.run import CommandError, run

log = logging.getLogger("yun.node.hypervisor.libvirt")

T = TypeVar("T")

EVENT_QUEUE_SIZE = 10_000  # beyond this, the oldest events are dropped (resync covers)
SHUTDOWN_POLL = 0.25  # seconds between state checks while a guest powers off
KEEPALIVE_INTERVAL = 5  # seconds; libvirt closes the connection after 3 missed
KEEPALIVE_COUNT = 3
# How long a running guest gets to release a NIC being unplugged (PCI hot-unplug is
# asked of the guest, which may take a while under TCG, or never come: no driver).
DETACH_TIMEOUT = 40.0
DETACH_POLL = 0.25
BACKUP_TIMEOUT = 3600.0  # seconds a live disk copy may take (F-IMAGE: GBs of data)
BACKUP_POLL = 0.5

_UNDEFINE_FLAGS = (
    libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE
    | libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA
    | libvirt.VIR_DOMAIN_UNDEFINE_NVRAM
    | libvirt.VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA
)

_STATES = {
    libvirt.VIR_DOMAIN_NOSTATE: DomainState.RUNNING,
    libvirt.VIR_DOMAIN_RUNNING: DomainState.RUNNING,
    libvirt.VIR_DOMAIN_BLOCKED: DomainState.RUNNING,  # running, waiting on I/O
    libvirt.VIR_DOMAIN_SHUTDOWN: DomainState.RUNNING,  # still running, powering off
    libvirt.VIR_DOMAIN_PAUSED: DomainState.PAUSED,
    libvirt.VIR_DOMAIN_PMSUSPENDED: DomainState.PAUSED,
    libvirt.VIR_DOMAIN_SHUTOFF: DomainState.SHUTOFF,
    libvirt.VIR_DOMAIN_CRASHED: DomainState.CRASHED,
}
_CRASHED_SHUTOFF_REASONS = (libvirt.VIR_DOMAIN_SHUTOFF_CRASHED, libvirt.VIR_DOMAIN_SHUTOFF_FAILED)


def _quiet(_ctx: object, _err: object) -> None:
    """Libvirt's default error handler prints every error on stderr; we raise them."""


libvirt.registerErrorHandler(_quiet, None)


def map_state(state: int, reason: int) -> DomainState:
    """Yun's state for libvirt's ``(state, reason)`` from ``virDomain.state()``."""
    if state == libvirt.VIR_DOMAIN_SHUTOFF and reason in _CRASHED_SHUTOFF_REASONS:
        return DomainState.CRASHED
    return _STATES.get(state, DomainState.RUNNING)


def canonical_uuid(value: str) -> str:
    """``value`` as libvirt prints UUIDs (lowercase, dashed); HypervisorError if invalid."""
    canonical = canonical_uuid_or_none(value)
    if canonical is None:
        raise HypervisorError(f"{value!r} is not a UUID: libvirt domains are named by UUID")
    return canonical


def supports_direct_io(path: Path) -> bool:
    """Whether ``path`` can be opened with O_DIRECT (cache='none'); tmpfs cannot.

    A file that does not exist yet is assumed to live on a normal file system.
    """
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECT", 0))
    except OSError as exc:
        return exc.errno != errno.EINVAL
    os.close(fd)
    return True


def _cache_mode(path: Path | None) -> str:
    """"none" (O_DIRECT) where the file's file system allows it, else "writeback"."""
    return "none" if path is None or supports_direct_io(path) else "writeback"


def _code(exc: libvirt.libvirtError) -> int:
    return int(exc.get_error_code() or 0)


def host_memory(conn: libvirt.virConnect) -> tuple[int, int]:
    """``(total, used)`` MiB of the host's memory, as its kernel counts it (worker thread).

    Not ``getInfo()``'s figure: libvirt adds up the NUMA cells there, which on hosts
    whose memory is not all in online NUMA nodes (virtio-mem, hotplug, some VMs) is a
    fraction of the RAM and changes from boot to boot. The all-cells memory stats are
    the host's ``/proc/meminfo`` read by libvirtd, so they hold for a remote libvirtd
    too. Used is what the kernel could not hand out at once: total minus free, buffers
    and page cache. Hypervisors without memory stats (``test:///``) give getInfo's.
    """
    try:
        stats = conn.getMemoryStats(libvirt.VIR_NODE_MEMORY_STATS_ALL_CELLS)
    except libvirt.libvirtError as exc:
        if _code(exc) not in (libvirt.VIR_ERR_NO_SUPPORT, libvirt.VIR_ERR_ARGUMENT_UNSUPPORTED):
            raise
        stats = {}
    total_kib = int(stats.get("total", 0))
    if total_kib <= 0:
        total_mb = int(conn.getInfo()[1])
        free_mb = int(conn.getFreeMemory()) // (1024 * 1024)
        return total_mb, max(0, total_mb - free_mb)
    available_kib = sum(int(stats.get(k, 0)) for k in ("free", "buffers", "cached"))
    return total_kib // 1024, max(0, total_kib - available_kib) // 1024


class LibvirtDriver(HypervisorDriver):
    """Yun's domains on one libvirtd (``qemu:///system`` or a test host's socket)."""

    name = "libvirt"
    # QoS: <cputune> needs libvirt's cgroup CPU controller (v1 or v2), <iotune> QEMU's
    # block throttling, the NIC limit tc on the taps (see .shaping); all are standard on
    # a QEMU host.
    caps = Capabilities(console=True, qos_cpu=True, qos_disk=True, qos_net=True,
                        hotplug_nic=True, hotplug_disk=True)

    def __init__(
        self,
        uri: str = "qemu:///system",
        accel: str = "auto",
        state_dir: Path = Path("/var/lib/yun/node"),
        vnc_listen: str = "0.0.0.0",
        netns: str | None = None,
    ) -> None:
        """``netns``: the network namespace libvirtd (and so the taps) lives in, when it
        is not this process's own (a test's node host); tc then runs there."""
        self.uri = uri
        self.netns = netns
        self.accel_setting = accel
        self.state_dir = Path(state_dir)
        self.vnc_listen = vnc_listen
        self.accel: str | None = None  # "kvm" or "tcg", once open() resolved it
        self._conn: libvirt.virConnect | None = None
        self._conn_lock = threading.Lock()
        self._callback_id: int | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._queue: asyncio.Queue[DomainEvent | None] = asyncio.Queue(EVENT_QUEUE_SIZE)
        self._closed = False
        self._cpu_sample: tuple[int, int] | None = None  # (busy ns, total ns)

    # ------------------------------------------------------------------ connection

    async def open(self) -> None:
        """Resolve the accelerator (probing KVM once per process) and connect."""
        self._loop = asyncio.get_running_loop()
        # libvirt needs the event implementation before the first connection opens.
        ensure_event_impl()
        self.accel = await asyncio.to_thread(resolve_accel, self.accel_setting)
        self._closed = False
        await asyncio.to_thread(self._connection)
        log.info("connected to libvirt", extra={"uri": self.uri, "accel": self.accel})

    async def close(self) -> None:
        """Drop the connection and end :meth:`events`; domains keep running."""
        self._closed = True
        await asyncio.to_thread(self._disconnect)
        with contextlib.suppress(asyncio.QueueFull):
            self._queue.put_nowait(None)  # wakes and ends events()

    async def __aenter__(self) -> LibvirtDriver:
        await self.open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    def _connection(self) -> libvirt.virConnect:
        """The open connection, reopened if libvirtd dropped it (worker thread)."""
        with self._conn_lock:
            if self._closed:
                raise HypervisorError(f"the driver for {self.uri} is closed")
            if self._conn is not None:
                try:
                    if self._conn.isAlive():
                        return self._conn
                except libvirt.libvirtError:
                    pass
                log.warning("libvirt connection lost, reconnecting", extra={"uri": self.uri})
                self._drop_connection()
            try:
                conn = libvirt.open(self.uri)
            except libvirt.libvirtError as exc:
                raise HypervisorError(
                    f"cannot connect to libvirt at {self.uri}: {exc.get_error_message()}"
                ) from exc
            # Keepalive notices a hung libvirtd; drivers without a daemon lack it.
            with contextlib.suppress(libvirt.libvirtError):
                conn.setKeepAlive(KEEPALIVE_INTERVAL, KEEPALIVE_COUNT)
            try:
                self._callback_id = conn.domainEventRegisterAny(
                    None, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, self._on_lifecycle, None
                )
            except libvirt.libvirtError as exc:
                with contextlib.suppress(libvirt.libvirtError):
                    conn.close()
                raise HypervisorError(
                    f"cannot subscribe to libvirt events at {self.uri}: "
                    f"{exc.get_error_message()}"
                ) from exc
            self._conn = conn
            return conn

    def _drop_connection(self) -> None:
        conn, self._conn = self._conn, None
        callback_id, self._callback_id = self._callback_id, None
        if conn is None:
            return
        if callback_id is not None:
            with contextlib.suppress(libvirt.libvirtError):
                conn.domainEventDeregisterAny(callback_id)
        with contextlib.suppress(libvirt.libvirtError):
            conn.close()

    def _disconnect(self) -> None:
        with self._conn_lock:
            self._drop_connection()

    async def _call(self, fn: Callable[[libvirt.virConnect], T]) -> T:
        """Run ``fn(connection)`` in a worker thread."""
        if self._loop is None:
            raise HypervisorError("LibvirtDriver.open() was not called")
        return await asyncio.to_thread(lambda: fn(self._connection()))

    # ------------------------------------------------------------------ events

    def _on_lifecycle(
        self, conn: libvirt.virConnect, dom: libvirt.virDomain, event: int, detail: int,
        opaque: Any,
    ) -> None:
        """Libvirt's lifecycle callback (on the event loop's thread): queue Yun's events."""
        try:
            if not dom.name().startswith(DOMAIN_NAME_PREFIX):  # name(): no round trip
                return
            ev = lifecycle_event(dom.UUIDString(), event, detail)
        except libvirt.libvirtError:
            return
        if ev is None:
            return
        log.info("domain event %s", ev.reason, extra={"vm": ev.uuid, "state": str(ev.state)})
        if self._queue.full():  # nobody listens: drop the oldest, keep the news
            with contextlib.suppress(asyncio.QueueEmpty):
                self._queue.get_nowait()
        self._queue.put_nowait(ev)

    async def events(self) -> AsyncIterator[DomainEvent]:
        """Lifecycle events of Yun's domains, until :meth:`close`. One consumer only."""
        while True:
            ev = await self._queue.get()
            if ev is None:
                return
            yield ev

    # ------------------------------------------------------------------ helpers

    def _plug_live(self, dom: libvirt.virDomain, uuid: str, device_xml: str,
                   what: str) -> bool:
        """Plug ``device_xml`` into the running guest; False when the domain stopped
        meanwhile (its definition is then enough), NotSupported when the hypervisor
        cannot hot-plug."""
        try:
            dom.attachDeviceFlags(device_xml, libvirt.VIR_DOMAIN_AFFECT_LIVE)
        except libvirt.libvirtError as exc:
            if _code(exc) == libvirt.VIR_ERR_NO_SUPPORT:
                raise NotSupported(f"{self.uri} cannot plug {what} into running domain "
                                   f"{uuid}: {exc.get_error_message()}") from exc
            if _code(exc) == libvirt.VIR_ERR_OPERATION_INVALID and not dom.isActive():
                return False
            raise
        return True

    @staticmethod
    def _running_disk(dom: libvirt.virDomain, uuid: str, disk_id: str,
                      not_running: str) -> tuple[str, str]:
        """(target dev, live XML) of disk ``disk_id`` of the running domain ``dom``;
        DomainNotRunning with ``not_running`` when it is stopped, HypervisorError when it
        has no such disk."""
        if not dom.isActive():
            raise DomainNotRunning(not_running)
        live = dom.XMLDesc(0)
        target = disk_target(live, disk_id)
        if target is None or disk_device_xml(live, target) is None:
            raise HypervisorError(f"domain {uuid} has no disk {disk_id!r}")
        return target, live

    def _lookup(self, conn: libvirt.virConnect, uuid: str) -> libvirt.virDomain:
        """The Yun domain ``uuid``; DomainNotFound if absent or not Yun's."""
        try:
            dom = conn.lookupByUUIDString(uuid)
        except libvirt.libvirtError as exc:
            if _code(exc) == libvirt.VIR_ERR_NO_DOMAIN:
                raise DomainNotFound(f"domain {uuid} does not exist on {self.uri}") from None
            raise self._error(exc, "look up", uuid) from exc
        if dom.name() != domain_name(uuid):
            raise DomainNotFound(
                f"domain {uuid} on {self.uri} is {dom.name()!r}, not a Yun domain"
            )
        return dom

    def _error(self, exc: libvirt.libvirtError, action: str, uuid: str) -> HypervisorError:
        if _code(exc) == libvirt.VIR_ERR_NO_DOMAIN:
            return DomainNotFound(f"domain {uuid} vanished on {self.uri} during {action}")
        return HypervisorError(
            f"libvirt could not {action} domain {uuid} ({domain_name(uuid)}) on {self.uri}: "
            f"{exc.get_error_message()}"
        )

    def _info(self, dom: libvirt.virDomain) -> DomainInfo | None:
        """DomainInfo of ``dom``, None if it is not Yun's (worker thread)."""
        parsed = parse_domain_xml(dom.XMLDesc(0))
        if parsed is None:
            return None
        state, reason = dom.state()
        return _domain_info(parsed, map_state(state, reason))

    def console_log_path(self, uuid: str) -> Path:
        """Where virtlogd appends domain ``uuid``'s serial console."""
        return self.state_dir / "console" / f"{uuid}.log"

    # ------------------------------------------------------------------ queries

    async def host_info(self) -> HostCapacity:
        def query(conn: libvirt.virConnect) -> HostCapacity:
            info = conn.getInfo()  # [model, memory MiB, cpus, MHz, nodes, sockets, cores, threads]
            memory_mb, used_mb = host_memory(conn)
            stats = conn.getCPUStats(libvirt.VIR_NODE_CPU_STATS_ALL_CPUS)
            return HostCapacity(
                hostname=conn.getHostname(),
                vcpus=int(info[2]),
                memory_mb=memory_mb,
                accel=self.accel or "tcg",
                cpu_load=self._cpu_load(stats),
                memory_used_mb=used_mb,
            )

        try:
            return await self._call(query)
        except libvirt.libvirtError as exc:
            raise HypervisorError(
                f"libvirt could not describe the host {self.uri}: {exc.get_error_message()}"
            ) from exc

    def _cpu_load(self, stats: dict[str, int]) -> float:
        """Busy fraction of all CPUs since the previous call (0.0 the first time)."""
        idle = int(stats.get("idle", 0)) + int(stats.get("iowait", 0))
        total = idle + sum(int(stats.get(k, 0)) for k in ("kernel", "user"))
        busy = total - idle
        previous, self._cpu_sample = self._cpu_sample, (busy, total)
        if previous is None or total <= previous[1]:
            return 0.0
        return round(max(0.0, min(1.0, (busy - previous[0]) / (total - previous[1]))), 3)

    async def list_domains(self) -> list[DomainInfo]:
        def query(conn: libvirt.virConnect) -> list[DomainInfo]:
            out = []
            for dom in conn.listAllDomains(0):
                if not dom.name().startswith(DOMAIN_NAME_PREFIX):
                    continue
                try:
                    info = self._info(dom)
                except libvirt.libvirtError as exc:
                    if _code(exc) == libvirt.VIR_ERR_NO_DOMAIN:
                        continue  # undefined while we listed
                    raise
                if info is not None:
                    out.append(info)
            return out

        try:
            return await self._call(query)
        except libvirt.libvirtError as exc:
            raise HypervisorError(
                f"libvirt could not list domains on {self.uri}: {exc.get_error_message()}"
            ) from exc

    async def get_domain(self, uuid: str) -> DomainInfo | None:
        uuid = canonical_uuid(uuid)

        def query(conn: libvirt.virConnect) -> DomainInfo | None:
            try:
                return self._info(self._lookup(conn, uuid))
            except DomainNotFound:
                return None
            except libvirt.libvirtError as exc:
                if _code(exc) == libvirt.VIR_ERR_NO_DOMAIN:
                    return None
                raise self._error(exc, "inspect", uuid) from exc

        return await self._call(query)

    # ------------------------------------------------------------------ definition

    async def ensure_defined(
        self, spec: DomainSpec, disks: list[ResolvedDisk], nics: list[ResolvedNic]
    ) -> None:
        """Define, or redefine with the new spec (takes effect at the next cold boot)."""
        uuid = canonical_uuid(spec.uuid)
        if uuid != spec.uuid:
            spec = spec.model_copy(update={"uuid": uuid})
        console_log = self.console_log_path(uuid)
        cache_modes = {d.disk_id: _cache_mode(d.path) for d in disks}
        try:
            xml = build_domain_xml(
                spec, disks, nics, accel=self.accel or "tcg", console_log=console_log,
                vnc_listen=self.vnc_listen, cache_modes=cache_modes,
            )
        except ValueError as exc:
            raise HypervisorError(f"domain {uuid}: {exc}") from exc
        # virtlogd creates the log file but not its directory.
        await asyncio.to_thread(console_log.parent.mkdir, parents=True, exist_ok=True)

        def define(conn: libvirt.virConnect) -> None:
            try:
                existing = conn.lookupByUUIDString(uuid)
            except libvirt.libvirtError as exc:
                if _code(exc) != libvirt.VIR_ERR_NO_DOMAIN:
                    raise self._error(exc, "look up", uuid) from exc
            else:
                if parse_domain_xml(existing.XMLDesc(0)) is None:
                    raise HypervisorError(
                        f"domain {uuid} ({existing.name()}) exists on {self.uri} but is not "
                        "managed by Yun; refusing to redefine it"
                    )
            try:
                conn.defineXML(xml)
            except libvirt.libvirtError as exc:
                raise self._error(exc, "define", uuid) from exc

        await self._call(define)
        log.info("domain defined", extra={"vm": uuid, "vm_name": spec.name,
                                          "disks": len(disks), "nics": len(nics)})

    async def undefine(self, uuid: str) -> None:
        """Destroy if running, forget the definition and drop the console log."""
        uuid = canonical_uuid(uuid)

        taps: list[str] = []

        def undefine(conn: libvirt.virConnect) -> bool:
            try:
                dom = self._lookup(conn, uuid)
            except DomainNotFound:
                return False
            try:
                parsed = parse_domain_xml(dom.XMLDesc(0))
                taps.extend(parsed.nic_taps if parsed else ())
                if dom.isActive():
                    dom.destroy()
                if dom.isPersistent():
                    try:
                        dom.undefineFlags(_UNDEFINE_FLAGS)
                    except libvirt.libvirtError as exc:
                        # Drivers that know no NVRAM/checkpoints refuse the flags.
                        if _code(exc) not in (libvirt.VIR_ERR_INVALID_ARG,
                                              libvirt.VIR_ERR_NO_SUPPORT):
                            raise
                        dom.undefine()
            except libvirt.libvirtError as exc:
                if _code(exc) == libvirt.VIR_ERR_NO_DOMAIN:
                    return False
                raise self._error(exc, "undefine", uuid) from exc
            return True

        existed = await self._call(undefine)
        for tap in taps:  # the taps went with QEMU; the ifb devices shaping them stay
            await asyncio.to_thread(run, in_netns(self.netns, ["ip", "link", "del",
                                                               ifb_name(tap)]),
                                    check=False, timeout=30)
        with contextlib.suppress(FileNotFoundError):
            await asyncio.to_thread(self.console_log_path(uuid).unlink)
        if existed:
            log.info("domain undefined", extra={"vm": uuid})

    # ------------------------------------------------------------------ QoS

    async def set_qos(self, uuid: str, qos: QosSpec) -> None:
        """New limits for domain ``uuid``: written into its persistent definition (the
        next boot keeps them) and, when it runs, applied to it at once through libvirt's
        live calls (cgroup, QEMU block throttling, tc on the taps)."""
        uuid = canonical_uuid(uuid)

        def apply(conn: libvirt.virConnect) -> bool:
            dom = self._lookup(conn, uuid)
            try:
                if dom.isPersistent():
                    inactive = dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
                    conn.defineXML(apply_qos(inactive, qos))
                if not dom.isActive():
                    return False
                live = parse_domain_xml(dom.XMLDesc(0))
                if live is None:
                    raise DomainNotFound(f"domain {uuid} on {self.uri} is not a Yun domain")
                flags = libvirt.VIR_DOMAIN_AFFECT_LIVE
                dom.setSchedulerParametersFlags(scheduler_params(qos), flags)
                for dev in live.disk_targets:
                    dom.setBlockIoTune(dev, iotune_params(qos), flags)
                # The NIC limit lives in Yun's metadata, read back by get_domain().
                dom.setMetadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT,
                                _instance_metadata(dom.XMLDesc(0), qos), "yun", YUN_NS, flags)
            except libvirt.libvirtError as exc:
                if _code(exc) == libvirt.VIR_ERR_OPERATION_INVALID and not dom.isActive():
                    return False  # stopped meanwhile: the definition holds the limits
                raise self._error(exc, "set the QoS of", uuid) from exc
            return True

        live = await self._call(apply)
        if live:
            await self._shape(uuid)
        log.info("domain QoS set", extra={"vm": uuid, "live": live,
                                          "qos": qos.model_dump(exclude_none=True)})

    async def _shape(self, uuid: str) -> None:
        """Put the NIC limit of running domain ``uuid`` on its taps (or take it off)."""

        def query(conn: libvirt.virConnect) -> ParsedDomain | None:
            dom = self._lookup(conn, uuid)
            try:
                return parse_domain_xml(dom.XMLDesc(0)) if dom.isActive() else None
            except libvirt.libvirtError as exc:
                raise self._error(exc, "inspect", uuid) from exc

        parsed = await self._call(query)
        if parsed is None or not parsed.nic_taps:
            return
        kbit = parsed.qos.bandwidth_kbit
        await asyncio.to_thread(self._run_shaping, uuid, parsed.nic_taps, kbit)

    def _run_shaping(self, uuid: str, taps: tuple[str, ...], kbit: int | None) -> None:
        for tap in taps:
            if kbit is None:
                for argv in unshape_commands(tap, tap_exists=True):
                    run(in_netns(self.netns, argv), check=False, timeout=30)
                continue
            exists = run(in_netns(self.netns, ["ip", "link", "show", "dev", ifb_name(tap)]),
                         check=False, timeout=30).returncode == 0
            for argv in shape_commands(tap, kbit, ifb_exists=exists):
                try:
                    run(in_netns(self.netns, argv), timeout=30)
                except CommandError as exc:
                    raise HypervisorError(
                        f"cannot limit NIC {tap} of domain {uuid} to {kbit} kbit/s: "
                        f"{' '.join(argv)}: {exc} ({exc.stderr.strip()})"
                    ) from exc
        log.info("NIC bandwidth %s", f"limited to {kbit} kbit/s" if kbit else "unlimited",
                 extra={"vm": uuid, "taps": list(taps), "bandwidth_kbit": kbit})

    # ------------------------------------------------------------------ NIC hot-plug

    async def attach_nic(self, uuid: str, nic: ResolvedNic) -> None:
        """Plug ``nic`` into domain ``uuid``: into the running guest (VIR_DOMAIN_AFFECT_LIVE)
        when it runs, and into its definition, so the next boot keeps it. Idempotent: a
        NIC already there (by MAC) is left alone."""
        uuid = canonical_uuid(uuid)

        def attach(conn: libvirt.virConnect) -> bool:
            dom = self._lookup(conn, uuid)
            live = False
            try:
                if dom.isActive() and not has_nic(dom.XMLDesc(0), nic.mac):
                    live = self._plug_live(dom, uuid, interface_xml(nic), "a NIC")
                inactive = dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
                if not has_nic(inactive, nic.mac) or nic_mac(inactive, nic.nic_id) is None:
                    try:
                        conn.defineXML(with_nic(inactive, nic))
                    except libvirt.libvirtError:
                        if live:  # not half plugged: out of the guest again
                            with contextlib.suppress(libvirt.libvirtError):
                                dom.detachDeviceFlags(interface_xml(nic),
                                                      libvirt.VIR_DOMAIN_AFFECT_LIVE)
                        raise
            except libvirt.libvirtError as exc:
                raise self._error(exc, f"plug NIC {nic.nic_id} into", uuid) from exc
            except ValueError as exc:
                raise HypervisorError(f"domain {uuid}: {exc}") from exc
            return live

        live = await self._call(attach)
        if live:
            await self._shape(uuid)  # the NIC limit on the new tap too
        log.info("NIC plugged", extra={"vm": uuid, "nic": nic.nic_id, "mac": nic.mac,
                                       "tap": nic.tap, "live": live})

    async def detach_nic(self, uuid: str, nic_id: str) -> None:
        """Unplug NIC ``nic_id`` from domain ``uuid``: from the running guest first (it is
        asked to release the device; HypervisorError if it has not within
        ``DETACH_TIMEOUT``), then from its definition. No error if it is not there."""
        uuid = canonical_uuid(uuid)

        def request(conn: libvirt.virConnect) -> tuple[str | None, str | None]:
            dom = self._lookup(conn, uuid)
            try:
                live_xml = dom.XMLDesc(0) if dom.isActive() else None
                mac = nic_mac(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE), nic_id)
                if mac is None and live_xml is not None:
                    mac = nic_mac(live_xml, nic_id)
                if mac is None or live_xml is None:
                    return mac, None
                for iface in ET.fromstring(live_xml).findall("devices/interface"):
                    el = iface.find("mac")
                    if el is not None and el.get("address", "").lower() == mac:
                        target = iface.find("target")
                        dom.detachDeviceFlags(ET.tostring(iface, encoding="unicode"),
                                              libvirt.VIR_DOMAIN_AFFECT_LIVE)
                        return mac, target.get("dev") if target is not None else ""
                return mac, None
            except libvirt.libvirtError as exc:
                if _code(exc) == libvirt.VIR_ERR_NO_SUPPORT:
                    raise NotSupported(f"{self.uri} cannot unplug a NIC from running "
                                       f"domain {uuid}: {exc.get_error_message()}") from exc
                if _code(exc) == libvirt.VIR_ERR_OPERATION_INVALID and not dom.isActive():
                    return nic_mac(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE), nic_id), None
                raise self._error(exc, f"unplug NIC {nic_id} from", uuid) from exc

        def plugged_live(conn: libvirt.virConnect, mac: str) -> bool:
            dom = self._lookup(conn, uuid)
            try:
                return bool(dom.isActive()) and has_nic(dom.XMLDesc(0), mac)
            except libvirt.libvirtError as exc:
                if _code(exc) == libvirt.VIR_ERR_OPERATION_INVALID:
                    return False  # stopped meanwhile: the NIC went with QEMU
                raise self._error(exc, "inspect", uuid) from exc

        def forget(conn: libvirt.virConnect, mac: str) -> None:
            dom = self._lookup(conn, uuid)
            try:
                inactive = dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
                if has_nic(inactive, mac) or nic_mac(inactive, nic_id) is not None:
                    conn.defineXML(without_nic(inactive, nic_id, mac))
            except libvirt.libvirtError as exc:
                raise self._error(exc, f"unplug NIC {nic_id} from", uuid) from exc

        mac, tap = await self._call(request)
        if mac is None:
            return
        if tap is not None:
            deadline = time.monotonic() + DETACH_TIMEOUT
            while await self._call(lambda conn: plugged_live(conn, mac)):
                if time.monotonic() > deadline:
                    raise HypervisorError(
                        f"the guest of domain {uuid} did not release NIC {nic_id} ({mac}) "
                        f"within {DETACH_TIMEOUT:.0f} s (does its kernel do PCI hot-unplug?)")
                await asyncio.sleep(DETACH_POLL)
            if tap:  # the ifb device shaping the tap outlives it
                await asyncio.to_thread(run, in_netns(self.netns, ["ip", "link", "del",
                                                                   ifb_name(tap)]),
                                        check=False, timeout=30)
        await self._call(lambda conn: forget(conn, mac))
        log.info("NIC unplugged", extra={"vm": uuid, "nic": nic_id, "mac": mac,
                                         "live": tap is not None})

    # ------------------------------------------------------------------ disks (U-HOTPLUG)

    async def attach_disk(self, uuid: str, disk: ResolvedDisk) -> None:
        """Plug disk ``disk`` into domain ``uuid`` on the next free virtio target (vdb,
        vdc …): into the running guest when it runs, and into its definition, Yun's
        metadata recording which disk id the target holds. Idempotent by disk id."""
        uuid = canonical_uuid(uuid)
        if disk.device != "disk":
            raise HypervisorError(
                f"disk {disk.disk_id!r} of domain {uuid} is a CD drive: CD drives are "
                "defined with the domain and change their medium with change_media")
        cache = await asyncio.to_thread(_cache_mode, disk.path)

        def attach(conn: libvirt.virConnect) -> tuple[str, bool]:
            dom = self._lookup(conn, uuid)
            live = False
            try:
                inactive = dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
                live_xml = dom.XMLDesc(0) if dom.isActive() else None
                target = disk_target(inactive, disk.disk_id)
                if target is None and live_xml is not None:
                    target = disk_target(live_xml, disk.disk_id)
                if target is None:
                    target = next_disk_target([inactive, *([live_xml] if live_xml else [])])
                if live_xml is not None and disk_device_xml(live_xml, target) is None:
                    device = new_disk_xml(disk, target, cache=cache,
                                          qos=parse_qos(ET.fromstring(live_xml)))
                    live = self._plug_live(dom, uuid, device, "a disk")
                    if not live:
                        live_xml = None
                try:
                    if live_xml is not None:
                        now = dom.XMLDesc(0)
                        if disk_target(now, disk.disk_id) is None:
                            # get_domain reads the live XML: it must name the new disk.
                            dom.setMetadata(
                                libvirt.VIR_DOMAIN_METADATA_ELEMENT,
                                instance_metadata(with_disk(now, disk, target, cache=cache)),
                                "yun", YUN_NS, libvirt.VIR_DOMAIN_AFFECT_LIVE)
                    if (disk_target(inactive, disk.disk_id) is None
                            or disk_device_xml(inactive, target) is None):
                        conn.defineXML(with_disk(inactive, disk, target, cache=cache))
                except libvirt.libvirtError:
                    if live:  # not half plugged: out of the guest again
                        with contextlib.suppress(libvirt.libvirtError):
                            dom.detachDeviceFlags(device, libvirt.VIR_DOMAIN_AFFECT_LIVE)
                    raise
            except libvirt.libvirtError as exc:
                raise self._error(exc, f"plug disk {disk.disk_id} into", uuid) from exc
            except ValueError as exc:
                raise HypervisorError(f"domain {uuid}: {exc}") from exc
            return target, live

        target, live = await self._call(attach)
        log.info("disk plugged", extra={"vm": uuid, "disk": disk.disk_id, "target": target,
                                        "path": str(disk.path), "live": live})

    async def detach_disk(self, uuid: str, disk_id: str) -> None:
        """Unplug disk ``disk_id`` from domain ``uuid``: from the running guest first (it
        is asked to release the device; HypervisorError if it has not within
        ``DETACH_TIMEOUT``), then from its definition. No error if it is not there."""
        uuid = canonical_uuid(uuid)

        def request(conn: libvirt.virConnect) -> tuple[str | None, bool]:
            dom = self._lookup(conn, uuid)
            try:
                live_xml = dom.XMLDesc(0) if dom.isActive() else None
                inactive = dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
                target = disk_target(inactive, disk_id)
                if target is None and live_xml is not None:
                    target = disk_target(live_xml, disk_id)
                if target is None:
                    return None, False
                for xml in (inactive, live_xml):
                    found = disk_device_xml(xml, target) if xml is not None else None
                    if found is not None and ET.fromstring(found).get("device") == "cdrom":
                        raise HypervisorError(
                            f"disk {disk_id!r} of domain {uuid} is a CD drive: eject its "
                            "medium instead of unplugging it")
                device = disk_device_xml(live_xml, target) if live_xml is not None else None
                if device is None:
                    return target, False
                dom.detachDeviceFlags(device, libvirt.VIR_DOMAIN_AFFECT_LIVE)
                return target, True
            except libvirt.libvirtError as exc:
                if _code(exc) == libvirt.VIR_ERR_NO_SUPPORT:
                    raise NotSupported(f"{self.uri} cannot unplug a disk from running "
                                       f"domain {uuid}: {exc.get_error_message()}") from exc
                if _code(exc) == libvirt.VIR_ERR_OPERATION_INVALID and not dom.isActive():
                    return disk_target(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE),
                                       disk_id), False
                raise self._error(exc, f"unplug disk {disk_id} from", uuid) from exc

        def plugged_live(conn: libvirt.virConnect, target: str) -> bool:
            dom = self._lookup(conn, uuid)
            try:
                return bool(dom.isActive()) and disk_device_xml(dom.XMLDesc(0),
                                                                 target) is not None
            except libvirt.libvirtError as exc:
                if _code(exc) == libvirt.VIR_ERR_OPERATION_INVALID:
                    return False  # stopped meanwhile: the disk went with QEMU
                raise self._error(exc, "inspect", uuid) from exc

        def forget(conn: libvirt.virConnect) -> None:
            dom = self._lookup(conn, uuid)
            try:
                if dom.isActive():
                    now = dom.XMLDesc(0)
                    if disk_target(now, disk_id) is not None:
                        dom.setMetadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT,
                                        instance_metadata(without_disk(now, disk_id)),
                                        "yun", YUN_NS, libvirt.VIR_DOMAIN_AFFECT_LIVE)
                inactive = dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
                if disk_target(inactive, disk_id) is not None:
                    conn.defineXML(without_disk(inactive, disk_id))
            except libvirt.libvirtError as exc:
                if _code(exc) == libvirt.VIR_ERR_OPERATION_INVALID and not dom.isActive():
                    return forget(conn)  # stopped meanwhile: only the definition is left
                raise self._error(exc, f"unplug disk {disk_id} from", uuid) from exc

        target, requested = await self._call(request)
        if target is None:
            return
        if requested:
            deadline = time.monotonic() + DETACH_TIMEOUT
            while await self._call(lambda conn: plugged_live(conn, target)):
                if time.monotonic() > deadline:
                    raise HypervisorError(
                        f"the guest of domain {uuid} did not release disk {disk_id} "
                        f"({target}) within {DETACH_TIMEOUT:.0f} s (is it still mounted? "
                        "does its kernel do PCI hot-unplug?)")
                await asyncio.sleep(DETACH_POLL)
        await self._call(forget)
        log.info("disk unplugged", extra={"vm": uuid, "disk": disk_id, "target": target,
                                          "live": requested})

    async def resize_disk(self, uuid: str, disk_id: str, size_bytes: int) -> None:
        """Grow disk ``disk_id`` of running domain ``uuid`` to ``size_bytes`` through
        QEMU (virDomainBlockResize): the image file and the guest's view at once. A
        smaller size is refused; the same size is left alone."""
        uuid = canonical_uuid(uuid)
        if size_bytes <= 0:
            raise HypervisorError(f"disk {disk_id} of domain {uuid}: size must be > 0 bytes")

        def resize(conn: libvirt.virConnect) -> int:
            dom = self._lookup(conn, uuid)
            try:
                target, _ = self._running_disk(
                    dom, uuid, disk_id, f"cannot resize disk {disk_id} of domain {uuid} "
                    "online: it is not running (grow the volume offline instead)")
                current = int(dom.blockInfo(target)[0])  # capacity: the virtual size
                if size_bytes < current:
                    raise HypervisorError(
                        f"disk {disk_id} of domain {uuid} is {current} bytes: shrinking it "
                        f"to {size_bytes} would cut the guest's data; only growing is "
                        "allowed")
                if size_bytes > current:
                    dom.blockResize(target, size_bytes, libvirt.VIR_DOMAIN_BLOCK_RESIZE_BYTES)
                return current
            except libvirt.libvirtError as exc:
                if _code(exc) == libvirt.VIR_ERR_NO_SUPPORT:
                    raise NotSupported(f"{self.uri} cannot resize a disk of running domain "
                                       f"{uuid}: {exc.get_error_message()}") from exc
                if _code(exc) == libvirt.VIR_ERR_OPERATION_INVALID and not dom.isActive():
                    raise DomainNotRunning(
                        f"cannot resize disk {disk_id} of domain {uuid} online: it stopped "
                        "meanwhile") from exc
                raise self._error(exc, f"resize disk {disk_id} of", uuid) from exc

        before = await self._call(resize)
        log.info("disk resized online", extra={"vm": uuid, "disk": disk_id,
                                               "from_bytes": before, "to_bytes": size_bytes})

    async def change_media(self, uuid: str, disk_id: str, path: Path | None) -> None:
        """Put the ISO ``path`` into CD drive ``disk_id`` of domain ``uuid`` (None: eject),
        in the running guest (forced: a guest holding the tray locked is overridden, as
        a CD ejected by hand) and in the definition. Idempotent."""
        uuid = canonical_uuid(uuid)
        wanted = str(path) if path is not None else ""

        def change(conn: libvirt.virConnect) -> bool:
            dom = self._lookup(conn, uuid)
            live = False
            try:
                inactive = dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
                if dom.isActive():
                    live_xml = dom.XMLDesc(0)
                    parsed = parse_domain_xml(live_xml)
                    target = disk_target(live_xml, disk_id) or ""
                    if parsed is None or parsed.sources.get(target) != wanted:
                        try:
                            dom.updateDeviceFlags(
                                media_xml(live_xml, disk_id, path),
                                libvirt.VIR_DOMAIN_AFFECT_LIVE
                                | libvirt.VIR_DOMAIN_DEVICE_MODIFY_FORCE)
                            live = True
                        except libvirt.libvirtError as exc:
                            if _code(exc) == libvirt.VIR_ERR_NO_SUPPORT:
                                raise NotSupported(
                                    f"{self.uri} cannot change the CD of running domain "
                                    f"{uuid}: {exc.get_error_message()}") from exc
                            if not (_code(exc) == libvirt.VIR_ERR_OPERATION_INVALID
                                    and not dom.isActive()):
                                raise
                parsed = parse_domain_xml(inactive)
                target = disk_target(inactive, disk_id) or ""
                if parsed is None or parsed.sources.get(target) != wanted:
                    conn.defineXML(with_media(inactive, disk_id, path))
            except libvirt.libvirtError as exc:
                raise self._error(exc, f"change the CD in drive {disk_id} of", uuid) from exc
            except ValueError as exc:
                raise HypervisorError(f"domain {uuid}: {exc}") from exc
            return live

        live = await self._call(change)
        log.info("CD %s", "inserted" if path is not None else "ejected", extra={
            "vm": uuid, "disk": disk_id, "path": wanted or None, "live": live})

    async def backup_disk(self, uuid: str, disk_id: str, target: Path,
                          timeout: float = BACKUP_TIMEOUT) -> None:
        """Copy disk ``disk_id`` of running domain ``uuid``, as it was when the call began,
        to ``target`` (qcow2) with a push-mode backup job while the guest goes on
        writing; wait for the job (at most ``timeout`` s: then it is aborted and the
        partial copy removed). NotSupported when libvirt or QEMU offer no backup."""
        uuid = canonical_uuid(uuid)
        target = Path(target)

        def begin(conn: libvirt.virConnect) -> str:
            dom = self._lookup(conn, uuid)
            try:
                dev, live = self._running_disk(
                    dom, uuid, disk_id, f"cannot copy disk {disk_id} of domain {uuid} "
                    "live: it is not running (copy the stopped volume instead)")
                dom.backupBegin(backup_xml(live, dev, target), None, 0)
                return dev
            except libvirt.libvirtError as exc:
                if _code(exc) in (libvirt.VIR_ERR_NO_SUPPORT,
                                  libvirt.VIR_ERR_OPERATION_UNSUPPORTED,
                                  libvirt.VIR_ERR_ARGUMENT_UNSUPPORTED):
                    raise NotSupported(f"{self.uri} cannot copy a disk of running domain "
                                       f"{uuid}: {exc.get_error_message()}") from exc
                raise self._error(exc, f"copy disk {disk_id} of", uuid) from exc

        def job(conn: libvirt.virConnect, completed: bool) -> dict[str, Any]:
            dom = self._lookup(conn, uuid)
            flags = libvirt.VIR_DOMAIN_JOB_STATS_COMPLETED if completed else 0
            try:
                return dict(dom.jobStats(flags))
            except libvirt.libvirtError as exc:
                raise self._error(exc, "follow the backup job of", uuid) from exc

        def abort(conn: libvirt.virConnect) -> None:
            with contextlib.suppress(libvirt.libvirtError, DomainNotFound):
                self._lookup(conn, uuid).abortJob()

        started = time.monotonic()
        dev = await self._call(begin)
        try:
            while (await self._call(lambda conn: job(conn, False))).get(
                    "type", libvirt.VIR_DOMAIN_JOB_NONE) != libvirt.VIR_DOMAIN_JOB_NONE:
                if time.monotonic() - started > timeout:
                    raise HypervisorError(
                        f"the copy of disk {disk_id} of domain {uuid} did not finish within "
                        f"{timeout:.0f} s; aborted")
                await asyncio.sleep(BACKUP_POLL)
            done = await self._call(lambda conn: job(conn, True))
            if done.get("type") in (libvirt.VIR_DOMAIN_JOB_FAILED,
                                    libvirt.VIR_DOMAIN_JOB_CANCELLED):
                raise HypervisorError(
                    f"the copy of disk {disk_id} of domain {uuid} failed: "
                    f"{done.get('errmsg') or 'libvirt gave no reason'}")
        except BaseException:
            await self._call(abort)
            with contextlib.suppress(OSError):
                await asyncio.to_thread(target.unlink, missing_ok=True)
            raise
        log.info("disk copied live in %.1f s", time.monotonic() - started, extra={
            "vm": uuid, "disk": disk_id, "target_dev": dev, "file": str(target)})

    # ------------------------------------------------------------------ power

    async def start(self, uuid: str) -> None:
        uuid = canonical_uuid(uuid)

        def start(conn: libvirt.virConnect) -> bool:
            dom = self._lookup(conn, uuid)
            try:
                if dom.isActive():
                    return False
                dom.create()
            except libvirt.libvirtError as exc:
                if _code(exc) == libvirt.VIR_ERR_OPERATION_INVALID and dom.isActive():
                    return False  # started by someone else meanwhile
                raise self._error(exc, "start", uuid) from exc
            return True

        started = time.monotonic()
        if await self._call(start):
            log.info("domain started in %.2f s", time.monotonic() - started,
                     extra={"vm": uuid})
        # Libvirt made fresh taps: put the NIC limit on them (idempotent when running).
        await self._shape(uuid)

    async def destroy(self, uuid: str) -> None:
        uuid = canonical_uuid(uuid)

        def destroy(conn: libvirt.virConnect) -> bool:
            dom = self._lookup(conn, uuid)
            try:
                if not dom.isActive():
                    return False
                dom.destroy()
            except libvirt.libvirtError as exc:
                if _code(exc) == libvirt.VIR_ERR_OPERATION_INVALID and not dom.isActive():
                    return False  # stopped meanwhile
                raise self._error(exc, "destroy", uuid) from exc
            return True

        if await self._call(destroy):
            log.info("domain destroyed", extra={"vm": uuid})

    async def shutdown(self, uuid: str, timeout: float) -> None:
        """ACPI power button, wait up to ``timeout`` s for power-off, then destroy."""
        uuid = canonical_uuid(uuid)

        def ask(conn: libvirt.virConnect) -> bool:
            dom = self._lookup(conn, uuid)
            try:
                if not dom.isActive():
                    return False
                try:
                    dom.shutdownFlags(libvirt.VIR_DOMAIN_SHUTDOWN_ACPI_POWER_BTN)
                except libvirt.libvirtError as exc:
                    # A hypervisor that lets no one choose the method (libvirt's test
                    # driver, some older ones) shuts down its own default way.
                    if _code(exc) not in (libvirt.VIR_ERR_INVALID_ARG,
                                          libvirt.VIR_ERR_NO_SUPPORT):
                        raise
                    dom.shutdown()
            except libvirt.libvirtError as exc:
                if not dom.isActive():
                    return False
                raise self._error(exc, "shut down", uuid) from exc
            return True

        def active(conn: libvirt.virConnect) -> bool:
            try:
                return bool(self._lookup(conn, uuid).isActive())
            except DomainNotFound:
                return False

        started = time.monotonic()
        if timeout > 0 and not await self._call(ask):
            return
        deadline = started + max(0.0, timeout)
        while time.monotonic() < deadline:
            if not await self._call(active):
                log.info("domain shut down by the guest in %.1f s",
                         time.monotonic() - started, extra={"vm": uuid})
                return
            await asyncio.sleep(SHUTDOWN_POLL)
        if await self._call(active):
            log.warning("guest did not power off within %.0f s, destroying it", timeout,
                        extra={"vm": uuid})
            await self.destroy(uuid)

    async def reboot(self, uuid: str) -> None:
        """ACPI reboot of a running guest; DomainNotRunning if it is not running.

        The guest decides: one that ignores the power button keeps running (the
        caller can shutdown()/start() instead).
        """
        uuid = canonical_uuid(uuid)

        def reboot(conn: libvirt.virConnect) -> None:
            dom = self._lookup(conn, uuid)
            try:
                state = map_state(*dom.state())
                if state is not DomainState.RUNNING:
                    raise DomainNotRunning(
                        f"cannot reboot domain {uuid}: it is {state}, not running "
                        "(start it instead)")
                dom.reboot(libvirt.VIR_DOMAIN_REBOOT_ACPI_POWER_BTN)
            except libvirt.libvirtError as exc:
                if _code(exc) == libvirt.VIR_ERR_OPERATION_INVALID and not dom.isActive():
                    raise DomainNotRunning(
                        f"cannot reboot domain {uuid}: it stopped meanwhile (start it "
                        "instead)") from exc
                raise self._error(exc, "reboot", uuid) from exc

        await self._call(reboot)
        log.info("domain reboot requested", extra={"vm": uuid})

    # ------------------------------------------------------------------ console

    async def console(self, uuid: str) -> ConsoleInfo:
        uuid = canonical_uuid(uuid)

        def query(conn: libvirt.virConnect) -> ParsedDomain:
            dom = self._lookup(conn, uuid)
            try:
                parsed = parse_domain_xml(dom.XMLDesc(0))  # live XML: the actual VNC port
            except libvirt.libvirtError as exc:
                raise self._error(exc, "inspect", uuid) from exc
            if parsed is None:
                raise DomainNotFound(f"domain {uuid} on {self.uri} is not a Yun domain")
            return parsed

        parsed = await self._call(query)
        return ConsoleInfo(
            vnc_host=self.vnc_listen if parsed.vnc_port is not None else None,
            vnc_port=parsed.vnc_port,
            serial_log=parsed.console_log,
        )

    async def console_log(self, uuid: str, max_bytes: int = 65536) -> str:
        """The last ``max_bytes`` of the serial log ("" before the first boot)."""
        uuid = canonical_uuid(uuid)
        path = self.console_log_path(uuid)
        with contextlib.suppress(DomainNotFound):
            path = (await self.console(uuid)).serial_log or path
        return await asyncio.to_thread(_tail, path, max_bytes)


def _instance_metadata(xml: str, qos: QosSpec) -> str:
    """Yun's metadata element of domain ``xml`` with the NIC limit of ``qos``."""
    try:
        return instance_metadata(apply_qos(xml, qos))
    except ValueError as exc:
        raise HypervisorError(str(exc)) from exc


def _tail(path: Path, max_bytes: int) -> str:
    try:
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - max(0, max_bytes)))
            data = f.read()
    except FileNotFoundError:
        return ""
    return data.decode("utf-8", errors="replace")


def _domain_info(parsed: ParsedDomain, state: DomainState) -> DomainInfo:
    return DomainInfo(
        uuid=parsed.uuid,
        name=parsed.name,
        state=state,
        vcpus=parsed.vcpus,
        memory_mb=parsed.memory_mb,
        vnc_port=parsed.vnc_port if state in (DomainState.RUNNING, DomainState.PAUSED) else None,
        console_log=str(parsed.console_log) if parsed.console_log else None,
        qos=parsed.qos,
        nics=list(parsed.nic_macs),
        disks=attached_disks(parsed),
        cdrom_image=cdrom_image(parsed),
    )
