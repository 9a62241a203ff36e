"""The node client's work: provision VMs from their specs, power them, report the host.

Each VM's operations run one at a time through its own queue. Every operation is
idempotent (ensure-style), so a command repeated by the control server after a
timeout or a crash does no harm.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import uuid
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import httpx
from pydantic import ValidationError

from yun.node.hypervisor.base import HypervisorDriver, ResolvedDisk, node_capabilities
from yun.node.netload import UplinkMeter
from yun.node.network.base import NetworkBackend
from yun.node.storage.base import DiskBackend, DiskError, ImageAccess, VolumeInUse
from yun.proto.client import SigningAuth, decode_response
from yun.proto.components import ComponentType
from yun.proto.errors import BadRequest, NotFound, PeerError, Unavailable, YunError
from yun.proto.membership import Membership
from yun.proto.messages import (
    NODE_REPORT_DELTA_FIELDS,
    CdromChange,
    DiskAttach,
    DiskSpec,
    DomainInfo,
    DomainSpec,
    DomainState,
    HostInfo,
    ImageLocation,
    NicAttach,
    NicSpec,
    NodeCapability,
    NodeReport,
    NodeReportAnswer,
    ProvisionRequest,
    QosSpec,
    StopRequest,
    StorageImageReport,
    VolumeEnsure,
    VolumeExport,
    VolumeInfo,
    legacy_volume_id,
)
from yun.proto.network import LearnedAddress, NicNetwork, NodeForward
from yun.util.lifecycle import wait_set
from yun.util.queues import KeyedQueues

log = logging.getLogger("yun.node")
# Bytes read from an exported copy per chunk of its upload to the storage server.
UPLOAD_CHUNK = 1 << 20

GIB = 1024**3
# The disk id of the VM's CD drive in the hypervisor (the seed is "cidata").
CDROM_DISK_ID = "cdrom"
# Every this many reports to a control server carries the full lists even when a delta
# would do: it bounds how long a lost change can stay unseen there.
FULL_REPORT_EVERY = 6


def holdings_generation(domains: list[DomainInfo], ports: Mapping[str, list[str]],
                        disks: Mapping[str, list[str]], volumes: list[str]) -> int:
    """A hash of what the node holds: which domains, ports, disks and volumes (not the
    domains' states, which deltas carry). Never 0, which means "not tracked"."""
    held = [sorted(d.uuid for d in domains),
            sorted((vm, sorted(macs)) for vm, macs in ports.items()),
            sorted((vm, sorted(ids)) for vm, ids in disks.items()), sorted(volumes)]
    digest = hashlib.blake2b(json.dumps(held, separators=(",", ":")).encode(),
                             digest_size=8).digest()
    return (int.from_bytes(digest, "big") >> 1) or 1


@dataclass
class PeerView:
    """What one control server has of this node: the last report it answered."""

    seq: int
    generation: int
    domains: dict[str, DomainState]
    storage: list[dict[str, object]] | None
    learned: list[LearnedAddress]
    since_full: int = 0
    want_full: bool = False
    # Set once the server's answer said it takes delta reports.
    deltas: bool = field(default=False)


def report_for_peer(report: NodeReport, view: PeerView | None, acked: int) -> NodeReport:
    """The report to send one control server: the full ``report``, or a delta against
    ``view`` (what that server answered last, report ``acked``) when it takes deltas,
    holds the same generation and asked for nothing more, and the last full report
    is fewer than ``FULL_REPORT_EVERY`` reports old."""
    full = report.model_copy(update={"acked_seq": acked})
    if (view is None or not view.deltas or view.want_full or view.seq != acked
            or not acked or view.generation != report.generation or not report.generation
            or view.since_full + 1 >= FULL_REPORT_EVERY):
        return full
    storage = report.storage
    if storage is not None and [d.model_dump(mode="json") for d in storage] == view.storage:
        storage = None
    return report.model_copy(update={
        "acked_seq": acked, "full": False, "delta": True, "ports": None, "disks": None,
        "volumes": None, "storage": storage,
        "domains": [d for d in report.domains if view.domains.get(d.uuid) != d.state],
        "learned": [] if report.learned == view.learned else report.learned})


def answered(view: PeerView | None, sent: NodeReport, taken: NodeReport,
             answer: NodeReportAnswer | None) -> PeerView | None:
    """What the server has after answering ``sent`` (taken from ``taken``); None while it
    has not said it takes delta reports (``sent`` then had none of their fields)."""
    if answer is None or not answer.deltas:
        return None
    storage = (None if taken.storage is None
               else [d.model_dump(mode="json") for d in taken.storage])
    if view is None or not view.deltas or not sent.generation:
        # Its first answer saying it takes deltas: the next report is a full one with them.
        return PeerView(seq=0, generation=0, domains={}, storage=None, learned=[],
                        deltas=True, want_full=True)
    return PeerView(seq=taken.seq, generation=taken.generation,
                    domains={d.uuid: d.state for d in taken.domains}, storage=storage,
                    learned=list(taken.learned),
                    since_full=view.since_full + 1 if sent.delta else 0,
                    want_full=answer.full_report, deltas=True)


@dataclass(frozen=True)
class HostReserve:
    """What the host keeps for itself; reported beside the totals, never given to VMs."""

    memory_mb: int = 0
    vcpus: int = 0
    disk_gb: int = 0


def same_id(what: str, in_body: str, in_url: str) -> None:
    """Refuse a request whose body names another resource than its URL."""
    if in_body != in_url:
        raise BadRequest(f"{what} {in_body} does not match the URL ({in_url})")


class NodeAgent:
    """One node client: a hypervisor driver with its disk and network backends."""

    def __init__(self, membership: Membership, driver: HypervisorDriver, disks: DiskBackend,
                 networks: Mapping[NicNetwork, NetworkBackend], report_interval: float, *,
                 reserve: HostReserve | None = None, pool: str | None = None,
                 uplink: UplinkMeter | None = None,
                 forward_address: str | None = None) -> None:
        """``pool`` is the pool the configuration names (used when the node first
        registers); ``uplink`` measures the network load (None: reported as 0);
        ``forward_address`` is where the node's NAT ports answer (None: the host of the
        agent's URL)."""
        self.membership = membership
        self.forward_address = forward_address
        self.reserve = reserve or HostReserve()
        self.pool = pool
        self.uplink = uplink
        self._reserve_warned = False
        self.driver = driver
        self.disks = disks
        if NicNetwork.SANDBOX not in networks:
            raise ValueError("a node always has a sandbox network backend")
        self.networks = dict(networks)
        self.report_interval = report_interval
        self.queues = KeyedQueues("node-vms")
        # Volume operations outside any VM (ensure, resize, snapshots) queue per volume,
        # apart from the VM queues whose keys the report lists as busy VMs.
        self.volume_queues = KeyedQueues("node-volumes")
        self._tasks: list[asyncio.Task[None]] = []
        self._report_now = asyncio.Event()
        # Reports are numbered per boot; each control server is told the last report it
        # answered, so it knows this one was taken after it had acted on that one.
        self.boot_id = uuid.uuid4().hex
        self._seq = 0
        self._acked: dict[str, int] = {}
        self._views: dict[str, PeerView] = {}
        self._report_again = False

    @property
    def network(self) -> NetworkBackend:
        """The sandbox network backend (every node has one)."""
        return self.networks[NicNetwork.SANDBOX]

    def network_of(self, nic: NicSpec) -> NetworkBackend:
        """The backend of the NIC's network, or BadRequest naming what this node lacks."""
        backend = self.networks.get(nic.network)
        if backend is None:
            raise BadRequest(f"NIC {nic.nic_id}: this node has no {nic.network} network "
                             f"(a direct network needs [node] direct_uplink)")
        return backend

    @property
    def node_id(self) -> str:
        return self.membership.component_id or ""

    async def start(self) -> None:
        await self.driver.open()
        for backend in self.networks.values():
            await backend.ensure_network()
        domains = await self.driver.list_domains()
        log.info("node agent found its domains", extra={
            "node": self.node_id, "domains": len(domains),
            "running": sum(1 for d in domains if d.state == "running")})
        attached = await self.disks.attachments()
        for dom in domains:
            if dom.state == DomainState.RUNNING and dom.uuid in attached:
                await self.disks.note_open(list(attached[dom.uuid].values()), True)
        self._tasks = [asyncio.create_task(self._report_loop()),
                       asyncio.create_task(self._event_loop())]
        self.membership.on_peers_changed(lambda added, removed: self._report_now.set())

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        # Guests outlive the agent (U-SPLIT): close the connection, never stop domains.
        await self.driver.close()

    # -- VM operations ---------------------------------------------------------------------

    def image_access(self) -> ImageAccess:
        """How this node's image downloads are signed and checked (TLS to the storage
        server, with the node's certificate)."""
        signer = self.membership.signer
        return ImageAccess(SigningAuth(signer) if signer is not None else None,
                           self.membership.client_tls)

    async def provision(self, vm_uuid: str, req: ProvisionRequest) -> DomainInfo:
        """Images cached, volumes made (or found), the CD drive and the cloud-init seed,
        NICs leased, domain defined (and started)."""
        same_id("spec uuid", req.spec.uuid, vm_uuid)
        async with self.queues.hold(vm_uuid):
            spec = req.spec
            specs = [self.volume_spec(vm_uuid, d) for d in spec.disks]
            await self._not_elsewhere(vm_uuid, specs)
            cached = await self._ensure_images(req.images, specs)
            disks = [await self.disks.ensure_volume(d) for d in specs]
            current = await self.driver.get_domain(vm_uuid)
            running = current is not None and current.state == DomainState.RUNNING
            if not running:
                await self._check_free(specs)
            extra = await self._extra_disks(vm_uuid, spec, cached)
            if req.sandbox is not None:
                # Every backend: the direct one takes its blocked networks from it too.
                for backend in self.networks.values():
                    await backend.ensure_network(req.sandbox)
            nics = [await self.network_of(n).ensure_port(vm_uuid, n) for n in spec.nics]
            await self.disks.set_attachments(
                vm_uuid, {d.disk_id: str(d.volume_id) for d in specs})
            await self.driver.ensure_defined(spec, disks + extra, nics)
            if req.start:
                await self.driver.start(vm_uuid)
                await self.disks.note_open([str(d.volume_id) for d in specs], True)
            log.info("VM provisioned", extra={"vm": vm_uuid, "node": self.node_id,
                                              "started": req.start,
                                              "volumes": [d.volume_id for d in specs]})
            return await self._info(vm_uuid)

    @staticmethod
    def volume_spec(vm_uuid: str, disk: DiskSpec) -> DiskSpec:
        """``disk`` with its volume id: an older control server sends none, and its disk
        is the volume the node adopted under :func:`legacy_volume_id`."""
        if disk.volume_id is not None:
            return disk
        return disk.model_copy(update={"volume_id": legacy_volume_id(vm_uuid, disk.disk_id)})

    async def _ensure_images(self, images: list[ImageLocation], specs: list[DiskSpec]
                             ) -> dict[str, Path]:
        """Each image in the node's cache, and on the shared mount when a shared volume
        is made of it; image id -> the cached file (the node's own copy first)."""
        shared = {d.image_id for d in specs if d.storage == "shared" and d.image_id}
        local = {d.image_id for d in specs if d.storage == "local" and d.image_id}
        found: dict[str, Path] = {}
        for image in images:
            if image.image_id in shared:
                found[image.image_id] = await self.disks.ensure_image(
                    image, self.image_access(), shared=True)
            if image.image_id in local or image.image_id not in shared:
                found[image.image_id] = await self.disks.ensure_image(
                    image, self.image_access())
        return found

    async def _not_elsewhere(self, vm_uuid: str, specs: list[DiskSpec]) -> None:
        """Refuse (VolumeInUse) a volume another VM of this node has attached: a volume
        is attached to at most one VM."""
        owners = {vid: vm for vm, volumes in (await self.disks.attachments()).items()
                  if vm != vm_uuid for vid in volumes.values()}
        for d in specs:
            other = owners.get(str(d.volume_id))
            if other is not None:
                raise VolumeInUse(f"volume {d.volume_id} (disk {d.disk_id}) is already "
                                  f"attached to VM {other} on node {self.membership.name}")

    async def _check_free(self, specs: list[DiskSpec]) -> None:
        """Refuse (VolumeInUse) when another node has one of the shared volumes open."""
        for d in specs:
            if d.storage == "shared" and d.volume_id is not None:
                await self.disks.check_free(d.volume_id)

    async def _extra_disks(self, vm_uuid: str, spec: DomainSpec,
                           cached: dict[str, Path]) -> list[ResolvedDisk]:
        """The CD drive (with its ISO, or empty) and the cloud-init seed of the spec."""
        extra: list[ResolvedDisk] = []
        if spec.cdrom is not None:
            path = None
            if spec.cdrom.image_id is not None:
                path = cached.get(spec.cdrom.image_id)
                if path is None:
                    raise BadRequest(f"CD image {spec.cdrom.image_id} is not among the "
                                     "request's images")
            extra.append(cdrom_disk(path))
        if spec.cloud_init is not None:
            extra.append(await self.disks.ensure_seed(vm_uuid, spec.cloud_init))
        return extra

    async def attach_nic(self, vm_uuid: str, req: NicAttach) -> DomainInfo:
        """One more NIC in the VM (U-HOTPLUG): its port (tap, lease, rules), then the
        hypervisor plugs it, live if the domain runs and into its definition. When the
        hypervisor fails, the port is released again: nothing is half made."""
        async with self.queues.hold(vm_uuid):
            await self._require(vm_uuid)
            backend = self.network_of(req.nic)
            if req.sandbox is not None and backend is self.network:
                await backend.ensure_network(req.sandbox)
            nic = await backend.ensure_port(vm_uuid, req.nic)
            try:
                await self.driver.attach_nic(vm_uuid, nic)
            except Exception as exc:
                await backend.release_port(vm_uuid, req.nic.nic_id)
                log.warning("NIC not plugged; its port released", extra={
                    "vm": vm_uuid, "node": self.node_id, "nic": req.nic.nic_id,
                    "error": str(exc)})
                raise
            info = await self._info(vm_uuid)
        log.info("NIC plugged into VM", extra={"vm": vm_uuid, "node": self.node_id,
                                               "nic": req.nic.nic_id, "mac": req.nic.mac,
                                               "ip": req.nic.ip, "state": str(info.state)})
        self._report_now.set()
        return info

    async def detach_nic(self, vm_uuid: str, nic_id: str) -> DomainInfo:
        """Unplug a NIC of the VM: the hypervisor first (the guest lets it go), then its
        port in every network backend. No error if it is not there."""
        async with self.queues.hold(vm_uuid):
            await self._require(vm_uuid)
            await self.driver.detach_nic(vm_uuid, nic_id)
            for backend in self.networks.values():
                await backend.release_port(vm_uuid, nic_id)
            info = await self._info(vm_uuid)
        log.info("NIC unplugged from VM", extra={"vm": vm_uuid, "node": self.node_id,
                                                 "nic": nic_id})
        self._report_now.set()
        return info

    async def remove(self, vm_uuid: str, delete_volumes: list[str] | None = None) -> None:
        """Domain, leases and VM files (seed, older disks) gone, and the listed volumes;
        other volumes are kept (Z-CASCADE: a volume may outlive its VM). Nothing to do
        if already gone."""
        async with self.queues.hold(vm_uuid):
            await self.driver.undefine(vm_uuid)
            attached = (await self.disks.attachments()).get(vm_uuid, {})
            await self.disks.note_open(list(attached.values()), False)
            for backend in self.networks.values():
                await backend.release_ports(vm_uuid)
            for volume_id in delete_volumes or []:
                await self.disks.delete_volume(volume_id)
            await self.disks.set_attachments(vm_uuid, {})
            await self.disks.delete_vm_files(vm_uuid)
            log.info("VM removed", extra={"vm": vm_uuid, "node": self.node_id,
                                          "volumes_deleted": delete_volumes or [],
                                          "volumes_kept": sorted(
                                              set(attached.values())
                                              - set(delete_volumes or []))})
        self._report_now.set()

    async def start_vm(self, vm_uuid: str) -> DomainInfo:
        async with self.queues.hold(vm_uuid):
            info = await self._require(vm_uuid)
            volumes = (await self.disks.attachments()).get(vm_uuid, {})
            if info.state != DomainState.RUNNING:
                for volume_id in volumes.values():
                    await self.disks.check_free(volume_id)
            await self.driver.start(vm_uuid)
            await self.disks.note_open(list(volumes.values()), True)
            return await self._info(vm_uuid)

    async def stop_vm(self, vm_uuid: str, req: StopRequest) -> DomainInfo:
        async with self.queues.hold(vm_uuid):
            await self._require(vm_uuid)
            if req.force:
                await self.driver.destroy(vm_uuid)
            else:
                await self.driver.shutdown(vm_uuid, req.timeout)
            info = await self._info(vm_uuid)
            if info.state != DomainState.RUNNING:
                await self._closed(vm_uuid)
            return info

    async def _closed(self, vm_uuid: str) -> None:
        """The VM's domain no longer runs: its volumes are closed."""
        volumes = (await self.disks.attachments()).get(vm_uuid, {})
        await self.disks.note_open(list(volumes.values()), False)

    async def reboot_vm(self, vm_uuid: str) -> DomainInfo:
        async with self.queues.hold(vm_uuid):
            await self._require(vm_uuid)
            await self.driver.reboot(vm_uuid)
            return await self._info(vm_uuid)

    async def set_qos(self, vm_uuid: str, qos: QosSpec) -> DomainInfo:
        """New QoS limits on the VM, live if it runs and for its next boots; the answer
        holds the limits the hypervisor reports in force."""
        async with self.queues.hold(vm_uuid):
            await self._require(vm_uuid)
            await self.driver.set_qos(vm_uuid, qos)
            info = await self._info(vm_uuid)
        log.info("VM QoS set", extra={"vm": vm_uuid, "node": self.node_id,
                                      "qos": qos.model_dump(mode="json", exclude_none=True)})
        self._report_now.set()
        return info

    async def set_forwards(self, vm_uuid: str, forwards: list[NodeForward]) -> None:
        """Replace the node NAT ports reaching the VM (sandbox private mode)."""
        async with self.queues.hold(vm_uuid):
            await self.network.set_forwards(vm_uuid, forwards)
        log.info("VM node ports set", extra={
            "vm": vm_uuid, "node": self.node_id,
            "forwards": [f"{f.protocol}/{f.node_port}->{f.vm_ip}:{f.vm_port}"
                         for f in forwards]})

    # -- volumes (U-HOTPLUG, snapshots, resize) ----------------------------------------------

    async def _holder(self, volume_id: str) -> tuple[str, str, DomainInfo] | None:
        """(vm, disk id, domain) of the domain on this node that has the volume attached,
        or None."""
        for vm, volumes in (await self.disks.attachments()).items():
            for disk_id, vid in volumes.items():
                if vid == volume_id:
                    info = await self.driver.get_domain(vm)
                    if info is not None:
                        return vm, disk_id, info
        return None

    async def _require_closed(self, volume_id: str, what: str) -> None:
        holder = await self._holder(volume_id)
        if holder is not None and holder[2].state == DomainState.RUNNING:
            raise VolumeInUse(f"volume {volume_id} is open by running VM {holder[0]} (disk "
                              f"{holder[1]}) on node {self.membership.name}: stop it to {what}")

    async def ensure_volume(self, volume_id: str, req: VolumeEnsure) -> VolumeInfo:
        """The volume made (idempotent), its image fetched first; its state on disk."""
        same_id("volume id", req.disk.volume_id or volume_id, volume_id)
        disk = req.disk.model_copy(update={"volume_id": volume_id})
        async with self.volume_queues.hold(volume_id):
            if req.image is not None:
                await self.disks.ensure_image(req.image, self.image_access(),
                                              shared=disk.storage == "shared")
            await self.disks.ensure_volume(disk)
            info = await self.disks.volume_info(volume_id)
        self._report_now.set()
        return info

    async def volume_info(self, volume_id: str) -> VolumeInfo:
        return await self.disks.volume_info(volume_id)

    async def delete_volume(self, volume_id: str) -> None:
        """The volume gone (no error when absent); 409 while a domain here has it."""
        async with self.volume_queues.hold(volume_id):
            holder = await self._holder(volume_id)
            if holder is not None:
                raise VolumeInUse(f"volume {volume_id} is attached to VM {holder[0]} (disk "
                                  f"{holder[1]}) on node {self.membership.name}: detach it "
                                  "first")
            await self.disks.delete_volume(volume_id)
        log.info("volume deleted", extra={"volume": volume_id, "node": self.node_id})
        self._report_now.set()

    async def resize_volume(self, volume_id: str, size_gb: int) -> VolumeInfo:
        """Grow the volume: through the hypervisor when a running domain has it (the
        guest sees the new size at once), offline with qemu-img otherwise."""
        async with self.volume_queues.hold(volume_id):
            holder = await self._holder(volume_id)
            if holder is not None and holder[2].state == DomainState.RUNNING:
                current = await self.disks.volume_info(volume_id)
                if size_gb < current.size_gb:
                    raise DiskError(f"volume {volume_id}: cannot shrink from "
                                    f"{current.size_gb} GiB to {size_gb} GiB")
                if size_gb > current.size_gb:
                    await self.driver.resize_disk(holder[0], holder[1], size_gb * GIB)
                info = await self.disks.resize_volume(volume_id, size_gb, online=True)
            else:
                info = await self.disks.resize_volume(volume_id, size_gb)
        log.info("volume resized", extra={"volume": volume_id, "node": self.node_id,
                                          "size_gb": size_gb,
                                          "online": holder is not None})
        return info

    async def snapshot_volume(self, volume_id: str, name: str,
                              action: Literal["create", "revert", "delete"]) -> VolumeInfo:
        """An internal snapshot made, reverted to or dropped; the volume must be closed."""
        async with self.volume_queues.hold(volume_id):
            await self._require_closed(volume_id, f"{action} snapshot {name}")
            if action == "create":
                info = await self.disks.create_snapshot(volume_id, name)
            elif action == "revert":
                info = await self.disks.revert_snapshot(volume_id, name)
            else:
                info = await self.disks.delete_snapshot(volume_id, name)
        log.info("volume snapshot changed", extra={"volume": volume_id, "node": self.node_id,
                                                   "snapshot": name, "action": action})
        return info

    async def export_volume(self, volume_id: str, req: VolumeExport) -> StorageImageReport:
        """Copy the volume into the new image ``req.image_id`` and upload it to the
        storage server (F-IMAGE). When a domain here runs it, the hypervisor copies it
        live (a point-in-time copy, the guest goes on writing), else qemu-img copies the
        closed volume; either way the copy is flattened qcow2. The storage server's
        report of the stored image is answered; a storage server that cannot be reached
        is a 503 (the caller retries: the upload of one image id is idempotent)."""
        holder = await self._holder(volume_id)
        hold_vm = self.queues.hold(holder[0]) if holder is not None \
            else contextlib.nullcontext()
        async with hold_vm, self.volume_queues.hold(volume_id):
            holder = await self._holder(volume_id)
            running = holder is not None and holder[2].state == DomainState.RUNNING
            if req.vm_uuid is not None and holder is not None and holder[0] != req.vm_uuid:
                raise VolumeInUse(f"volume {volume_id} is attached to VM {holder[0]} on node "
                                  f"{self.membership.name}, not to VM {req.vm_uuid}")
            live = None
            if running and holder is not None:
                vm, disk_id = holder[0], holder[1]

                async def live_copy(target: Path) -> None:
                    await self.driver.backup_disk(vm, disk_id, target)
                live = live_copy

            async def upload(path: Path) -> StorageImageReport:
                return await self._upload_image(req, path)

            report = await self.disks.export_volume(volume_id, req.image_id, upload,
                                                    live=live)
        log.info("volume exported to the storage server", extra={
            "volume": volume_id, "image": req.image_id, "node": self.node_id,
            "vm": holder[0] if holder else None, "live": live is not None,
            "size": report.size, "sha256": report.sha256})
        return report

    async def _upload_image(self, req: VolumeExport, path: Path) -> StorageImageReport:
        """Stream the file at ``path`` to the storage server as image ``req.image_id``,
        signed with this node's credentials over the domain's TLS."""
        storage = self.membership.client_for_url(req.storage_url)
        size = await asyncio.to_thread(lambda: path.stat().st_size)

        async def body() -> AsyncIterator[bytes]:
            with path.open("rb") as f:
                while chunk := await asyncio.to_thread(f.read, UPLOAD_CHUNK):
                    yield chunk

        headers = {**storage.headers(), "Content-Type": "application/octet-stream",
                   "Content-Length": str(size)}
        params = {"name": req.name, "format": "qcow2"}
        try:
            resp = await storage.http.put(
                f"/internal/v1/images/{req.image_id}/data", content=body(), params=params,
                headers=headers, timeout=httpx.Timeout(60.0, read=3600.0, write=3600.0))
        except httpx.HTTPError as exc:
            raise Unavailable(f"storage server {req.storage_url} unreachable while node "
                              f"{self.membership.name} uploaded image {req.image_id}: "
                              f"{exc.__class__.__name__}: {exc}") from exc
        try:
            return StorageImageReport.model_validate(decode_response(resp, req.storage_url))
        except ValidationError as exc:
            raise PeerError(f"storage server {req.storage_url} answered a malformed "
                            "report of the stored image") from exc

    async def attach_disk(self, vm_uuid: str, req: DiskAttach) -> DomainInfo:
        """Plug an existing volume into the VM (live when it runs, and into its
        definition); a volume attached to another VM here is refused."""
        disk = self.volume_spec(vm_uuid, req.disk).model_copy(update={"create": False})
        volume_id = str(disk.volume_id)
        async with self.queues.hold(vm_uuid):
            info = await self._require(vm_uuid)
            holder = await self._holder(volume_id)
            if holder is not None and (holder[0], holder[1]) != (vm_uuid, disk.disk_id):
                raise VolumeInUse(f"volume {volume_id} is already attached to VM {holder[0]} "
                                  f"(disk {holder[1]}) on node {self.membership.name}")
            resolved = await self.disks.ensure_volume(disk)
            running = info.state == DomainState.RUNNING
            if running and holder is None and disk.storage == "shared":
                await self.disks.check_free(volume_id)
            if holder is None:
                await self.driver.attach_disk(vm_uuid, resolved)
            volumes = (await self.disks.attachments()).get(vm_uuid, {})
            await self.disks.set_attachments(vm_uuid, {**volumes, disk.disk_id: volume_id})
            if running:
                await self.disks.note_open([volume_id], True)
            info = await self._info(vm_uuid)
        log.info("volume attached to VM", extra={"vm": vm_uuid, "node": self.node_id,
                                                 "disk": disk.disk_id, "volume": volume_id})
        self._report_now.set()
        return info

    async def detach_disk(self, vm_uuid: str, disk_id: str) -> DomainInfo:
        """Unplug disk ``disk_id`` of the VM; its volume stays. No error if absent."""
        async with self.queues.hold(vm_uuid):
            await self._require(vm_uuid)
            await self.driver.detach_disk(vm_uuid, disk_id)
            volumes = dict((await self.disks.attachments()).get(vm_uuid, {}))
            volume_id = volumes.pop(disk_id, None)
            await self.disks.set_attachments(vm_uuid, volumes)
            if volume_id is not None:
                await self.disks.note_open([volume_id], False)
            info = await self._info(vm_uuid)
        log.info("volume detached from VM", extra={"vm": vm_uuid, "node": self.node_id,
                                                   "disk": disk_id, "volume": volume_id})
        self._report_now.set()
        return info

    async def change_cdrom(self, vm_uuid: str, req: CdromChange) -> DomainInfo:
        """Insert an ISO into the VM's CD drive (cached first), or eject it."""
        async with self.queues.hold(vm_uuid):
            await self._require(vm_uuid)
            path = None
            if req.image is not None:
                if req.image.format != "iso":
                    raise DiskError(f"image {req.image.image_id} is a {req.image.format} disk "
                                    "image, not an ISO: only an ISO goes into the CD drive")
                path = await self.disks.ensure_image(req.image, self.image_access())
            await self.driver.change_media(vm_uuid, CDROM_DISK_ID, path)
            info = await self._info(vm_uuid)
        log.info("VM CD changed", extra={"vm": vm_uuid, "node": self.node_id,
                                         "image": req.image.image_id if req.image else None})
        return info

    async def _require(self, vm_uuid: str) -> DomainInfo:
        info = await self.driver.get_domain(vm_uuid)
        if info is None:
            raise NotFound(f"no domain {vm_uuid} on this node")
        return info

    async def _info(self, vm_uuid: str) -> DomainInfo:
        return await self._require(vm_uuid)

    # -- reporting -------------------------------------------------------------------------

    async def host_info(self) -> HostInfo:
        """The host's totals and reserves (separately: the control server subtracts the
        reserve), its load, capabilities and configured pool."""
        host = await self.driver.host_info()
        total_gb, used_gb = await self.disks.capacity_gb()
        reserve = self.reserve
        if not self._reserve_warned and (reserve.memory_mb >= host.memory_mb
                                         or reserve.vcpus >= host.vcpus
                                         or reserve.disk_gb >= total_gb):
            self._reserve_warned = True
            log.warning("the host reserve leaves nothing for VMs in at least one resource",
                        extra={"node": self.node_id, "memory_mb": host.memory_mb,
                               "memory_reserve_mb": reserve.memory_mb, "vcpus": host.vcpus,
                               "vcpus_reserve": reserve.vcpus, "disk_gb": total_gb,
                               "disk_reserve_gb": reserve.disk_gb})
        return HostInfo(
            hostname=host.hostname, hypervisor=self.driver.name, accel=host.accel,
            vcpus=host.vcpus, memory_mb=host.memory_mb, disk_gb=total_gb,
            memory_reserved_mb=reserve.memory_mb, vcpus_reserved=reserve.vcpus,
            disk_reserved_gb=reserve.disk_gb,
            cpu_load=host.cpu_load, memory_used_mb=host.memory_used_mb, disk_used_gb=used_gb,
            net_load=self.uplink.sample() if self.uplink is not None else 0.0,
            capabilities=sorted({*node_capabilities(self.driver.caps, host.accel),
                                 *self._network_capabilities()}),
            pool=self.pool,
            forward_address=self.forward_address,
        )

    def _network_capabilities(self) -> list[NodeCapability]:
        return [NodeCapability.NET_DIRECT] if NicNetwork.DIRECT in self.networks else []

    async def report(self) -> None:
        """Push identity, capacity, load and the domains to each control server: every
        domain, or only those whose state changed (:func:`report_for_peer`)."""
        controls = self.membership.peers_of(ComponentType.CONTROL)
        if not controls:
            return
        report = await self.snapshot()
        for peer in controls:
            view = self._views.get(peer.component_id)
            body = report_for_peer(report, view, self._acked.get(peer.component_id, 0))
            # A server that has not said it takes deltas may be older: it refuses fields
            # it does not know, so they are left out.
            payload = body.model_dump(mode="json", exclude=(
                None if view is not None and view.deltas else set(NODE_REPORT_DELTA_FIELDS)))
            try:
                raw = await self.membership.client(peer).request(
                    "POST", "/internal/v1/nodes/report", body=payload,
                    params={"deltas": "1"}, timeout=10)
                answer = NodeReportAnswer.model_validate(raw) if raw is not None else None
                if answer is not None and answer.sandbox is not None:
                    for backend in self.networks.values():
                        await backend.ensure_network(answer.sandbox)
            except YunError as exc:
                log.warning("report to control server failed: %s", exc,
                            extra={"node": self.node_id, "control": peer.component_id})
                continue
            self._acked[peer.component_id] = report.seq
            new_view = answered(view, body, report, answer)
            if new_view is None:
                self._views.pop(peer.component_id, None)
            else:
                self._views[peer.component_id] = new_view
                if answer is not None and answer.full_report:
                    self._report_again = True  # the server lacks what deltas apply to

    async def snapshot(self) -> NodeReport:
        """What this node holds now: its domains, network reservations and volumes.

        VMs with an operation under way are listed as busy first, so a VM whose
        provisioning starts while the lists are read is never seen as holding nothing.
        """
        self._seq += 1
        busy = self.queues.keys()
        domains = await self.driver.list_domains()
        ports: dict[str, list[str]] = {}
        learned: list[LearnedAddress] = []
        for backend in self.networks.values():
            for vm, macs in (await backend.vm_ports()).items():
                ports.setdefault(vm, []).extend(macs)
            learned.extend(await backend.learned())
        # A VM is named while anything of it is here: its files (seed) or volumes
        # recorded as attached to its domain.
        disks = await self.disks.vm_disk_ids()
        storage = await self.disks.storage_report()
        volumes = await self.disks.volume_ids()
        busy = sorted(set(busy) | set(self.queues.keys()))
        return NodeReport(node_id=self.node_id, name=self.membership.name,
                          url=self.membership.url, host=await self.host_info(),
                          domains=domains, ports=ports, disks=disks, busy=busy,
                          boot_id=self.boot_id, seq=self._seq,
                          report_interval=self.report_interval, learned=learned,
                          storage=storage, volumes=volumes,
                          generation=holdings_generation(domains, ports, disks, volumes))

    async def _report_loop(self) -> None:
        while True:
            try:
                await self.report()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("node report failed", extra={"node": self.node_id})
            self._report_now.clear()
            if self._report_again:  # a server asked for the full lists: send them now
                self._report_again = False
                self._report_now.set()
            await wait_set(self._report_now, self.report_interval)

    async def _event_loop(self) -> None:
        async for event in self.driver.events():
            log.info("domain event", extra={"vm": event.uuid, "state": str(event.state),
                                            "reason": event.reason, "node": self.node_id})
            if event.state != DomainState.RUNNING:
                await self._closed(event.uuid)
            self._report_now.set()




def cdrom_disk(path: Path | None) -> ResolvedDisk:
    """The VM's CD drive with the ISO at ``path`` (None: empty): read-only, on the IDE
    bus so it takes no virtio disk name from the volumes."""
    return ResolvedDisk(disk_id=CDROM_DISK_ID, path=path, format="raw", bus="ide",
                        device="cdrom", read_only=True)
