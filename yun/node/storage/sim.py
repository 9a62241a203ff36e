"""A disk backend in memory, for simulated nodes (thousands in one process).

It keeps the contract of :class:`~yun.node.storage.local.LocalDiskBackend` — same
validation, same errors, same idempotence, volumes keyed by volume — without files,
``qemu-img`` or downloads, so flows tested against it behave as they will on a real
node (the one suite tests/unit/test_disk_contract.py runs over both):

- storage directories with sizes (:meth:`SimDiskBackend.add_dir` adds one while the
  node runs; :meth:`SimDiskBackend.fill` simulates other files on it for the alarm);
- thin volumes take nothing until written (:meth:`SimDiskBackend.write`), thick ones
  their whole size; a volume whose size exceeds every directory's free space is
  refused with :class:`NoSpace`;
- a volume's content is a marker string; internal snapshots record it and revert
  restores it; an export (a host image, F-IMAGE) uploads a real qcow2 carrying it, and
  the exporting node keeps the image in its cache with that content, so a volume made
  from the image there starts with it;
- shared mode: a :class:`SimSharedMount` given to several sim nodes of one process
  holds their shared volumes and images, and a lock registry keyed by path stands for
  QEMU's image lock, so one node is refused a volume another node has open.

Faults are injected with :meth:`SimDiskBackend.fail_next`; ``latency`` makes every
operation take time. Given a state file (see :mod:`yun.node.hypervisor.sim.hostfile`),
its local volumes, cached images, seeds and attachments outlive its process, as files on
a real node do; without one they live in memory.
"""

from __future__ import annotations

import asyncio
import json
import logging
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from yun.node.hypervisor.base import ResolvedDisk
from yun.node.hypervisor.sim.hostfile import SimHostFile, host_file
from yun.node.storage.base import (
    DiskBackend,
    DiskError,
    ImageAccess,
    LiveCopy,
    Upload,
    VolumeInUse,
    VolumeNotFound,
)
from yun.node.storage.common import (
    DEFAULT_ALARM_PERCENT,
    GIB,
    DirSpace,
    StorageAlarm,
    check_image_location,
    check_snapshot_name,
    check_uuid,
    check_volume_spec,
    choose_dir,
)
from yun.proto.messages import (
    CloudInitSpec,
    DiskSpec,
    ImageLocation,
    StorageDirReport,
    StorageImageReport,
    VolumeInfo,
    VolumeSnapshotInfo,
    legacy_volume_id,
)
from yun.util import qemu_img

log = logging.getLogger("yun.node.storage.sim")


def _write_marker(path: Path, content: str) -> None:
    data = EXPORT_MAGIC + json.dumps({"content": content}).encode() + b"\n"
    if len(data) > EXPORT_BYTES:
        raise DiskError(f"sim volume content of {len(data)} bytes is too long to export")
    with path.open("wb") as f:
        f.write(data)
        f.truncate(EXPORT_BYTES)


async def exported_content(path: Path, fmt: str = "qcow2") -> str | None:
    """The content marker an exported sim volume carries in the image at ``path`` (read
    back through ``qemu-img convert`` to raw), or None when it carries none."""
    with tempfile.TemporaryDirectory(prefix="yun-sim-read-") as scratch:
        raw = Path(scratch) / "image.raw"
        await qemu_img.convert(path, raw, src_fmt=fmt, dst_fmt="raw")
        head = await asyncio.to_thread(_head, raw, EXPORT_BYTES)
    if not head.startswith(EXPORT_MAGIC):
        return None
    line = head[len(EXPORT_MAGIC):].split(b"\n", 1)[0]
    return str(json.loads(line)["content"])


def _head(path: Path, size: int) -> bytes:
    with path.open("rb") as f:
        return f.read(size)

OPERATIONS = frozenset({
    "ensure_image", "ensure_volume", "volume_info", "delete_volume", "resize_volume",
    "create_snapshot", "revert_snapshot", "delete_snapshot", "volume_ids", "ensure_seed",
    "delete_vm_files", "vm_disk_ids", "storage_report", "check_free", "export_volume",
})
# An exported sim volume is a real qcow2 image (the storage server checks it as any
# upload) whose first bytes carry the volume's content marker after this magic line.
EXPORT_MAGIC = b"YUN-SIM-VOLUME\n"
EXPORT_BYTES = 1 << 20
# What a fresh qcow2 takes on disk (its header and first tables), as qemu-img makes it.
QCOW2_HEADER_BYTES = 196_608


@dataclass
class _SimImage:
    sha256: str
    size: int
    format: str
    last_used: float = 0.0
    content: str = ""  # the content marker volumes made from it start with


@dataclass
class _SimVolume:
    volume_id: str
    directory: str
    size_gb: int
    thin: bool
    image_id: str | None
    allocated: int
    shared: bool = False
    content: str = ""
    snapshots: dict[str, str] = field(default_factory=dict)
    backing: bool = True  # an overlay on image_id (False: a full copy of it)
    created: dict[str, float] = field(default_factory=dict)


@dataclass
class _SimDir:
    total_bytes: int
    other_bytes: int = 0  # files that are not Yun volumes


class SimSharedMount:
    """One shared mount (NFS or CephFS in production) seen by every sim node given it:
    the shared volumes, the images copied onto it, and which node has which volume open
    (QEMU's image lock, keyed by the volume's path)."""

    def __init__(self, path: Path = Path("/sim-shared"), total_gb: int = 16384) -> None:
        self.path = Path(path)
        self.dir = _SimDir(total_gb * GIB)
        self.volumes: dict[str, _SimVolume] = {}
        self.images: dict[str, _SimImage] = {}
        self.open_by: dict[str, str] = {}  # volume path -> the node that has it open
        self.fetches = 0  # images copied onto the mount (once each)


class SimDiskBackend(DiskBackend):
    """Images and volumes as dictionaries; nothing touches the disk or the network."""

    def __init__(
        self, root: Path = Path("/sim"), *, total_gb: int = 4096,
        dirs: dict[str, int] | None = None, shared: SimSharedMount | None = None,
        node: str = "sim", image_cache_gb: float | None = None,
        alarm_percent: float = DEFAULT_ALARM_PERCENT, latency: float = 0.0,
        state_file: Path | SimHostFile | None = None,
    ) -> None:
        """``dirs`` maps each storage directory to its size in GiB (default: ``root``
        with ``total_gb``); ``shared`` is the pool's shared mount, if any."""
        self.root = Path(root)
        self.node = node
        self.latency = latency
        self.shared = shared
        self.image_cache_gb = image_cache_gb
        self.alarm = StorageAlarm(node, alarm_percent)
        self.dirs: dict[str, _SimDir] = {
            path: _SimDir(gb * GIB) for path, gb in (dirs or {str(self.root): total_gb}).items()}
        self.images: dict[str, _SimImage] = {}
        self.volumes: dict[str, _SimVolume] = {}
        self.seeds: dict[str, dict[str, Any]] = {}
        self._attached: dict[str, dict[str, str]] = {}
        self._open_here: set[str] = set()
        self.downloads = 0  # how many images were "fetched" (cache misses)
        self.exports: list[tuple[str, bool]] = []  # (volume id, live) of each export
        self._faults: dict[str, list[Exception]] = {}
        self._file = host_file(state_file)
        if self._file is not None:
            self._load(self._file)

    # -- state file ---------------------------------------------------------------------

    def _load(self, file: SimHostFile) -> None:
        for image_id, data in file.section("images").items():
            self.images[image_id] = _SimImage(**data)
        for volume_id, data in file.section("volumes").items():
            self.volumes[volume_id] = _SimVolume(**data)
        for vm, data in file.section("vm_files").items():
            if data.get("seed") is not None:
                self.seeds[vm] = data["seed"]
            if data.get("attached"):
                self._attached[vm] = dict(data["attached"])
        # Disks of the older per-VM layout are adopted as volumes under their legacy id,
        # as the local backend adopts vms/<vm>/<disk>.qcow2.
        # (Entries naming a volume_id are this backend's own view of its attachments.)
        legacy = {k: d for k, d in file.section("disks").items() if "volume_id" not in d}
        for data in legacy.values():
            vm, disk_id = data["vm_uuid"], data["disk_id"]
            volume_id = legacy_volume_id(vm, disk_id)
            self.volumes.setdefault(volume_id, _SimVolume(
                volume_id=volume_id, directory=next(iter(self.dirs)), size_gb=data["size_gb"],
                thin=True, image_id=data.get("image_id"), allocated=QCOW2_HEADER_BYTES))
            self._attached.setdefault(vm, {}).setdefault(disk_id, volume_id)
        if legacy:
            self._save()
            log.info("sim disks of the per-VM layout adopted as volumes",
                     extra={"node": self.node, "volumes": len(legacy)})

    def _save(self) -> None:
        """Persist volumes, cached images and VM files in the state file (when it has one)."""
        if self._file is not None:
            self._file.save("disks", self._sections)

    def _sections(self) -> dict[str, dict[str, Any]]:
        vms = set(self.seeds) | set(self._attached)
        # "disks" keeps the documented per-VM view (the invariant checker reads it):
        # each volume attached to a VM, under "<vm>/<disk id>".
        disks = {f"{vm}/{disk_id}": {
            "vm_uuid": vm, "disk_id": disk_id, "volume_id": vid,
            "size_gb": self.volumes[vid].size_gb if vid in self.volumes else None}
            for vm, attached in self._attached.items() for disk_id, vid in attached.items()}
        return {
            "disks": disks,
            "volumes": {v: asdict(vol) for v, vol in self.volumes.items()},
            "images": {i: asdict(img) for i, img in self.images.items()},
            "vm_files": {vm: {"seed": self.seeds.get(vm), "attached": self._attached.get(vm)}
                         for vm in vms},
        }

    # -- test knobs ---------------------------------------------------------------------

    def fail_next(self, op: str, error: Exception | None = None) -> None:
        """Make the next call of ``op`` raise ``error`` (a :class:`DiskError` by default).

        Calls queue up: ``fail_next("ensure_volume")`` twice fails the next two calls.
        """
        if op not in OPERATIONS:
            raise ValueError(f"unknown operation {op!r}; one of {', '.join(sorted(OPERATIONS))}")
        self._faults.setdefault(op, []).append(error or DiskError(f"injected failure of {op}"))

    def add_dir(self, path: str, total_gb: float) -> None:
        """A storage directory added while the node runs (a new disk mounted)."""
        self.dirs.setdefault(path, _SimDir(int(total_gb * GIB)))

    def fill(self, path: str, other_bytes: int) -> None:
        """Simulate ``other_bytes`` of files that are not volumes in directory ``path``."""
        if self.shared is not None and path == str(self.shared.path):
            self.shared.dir.other_bytes = other_bytes
        else:
            self.dirs[path].other_bytes = other_bytes

    def write(self, volume_id: str, content: str, nbytes: int = 1 << 20) -> None:
        """Simulate the guest writing: the volume's content becomes ``content`` and a
        thin volume takes ``nbytes`` more on disk (up to its size)."""
        vol = self._volume(volume_id)
        vol.content = content
        if vol.thin:
            vol.allocated = min(vol.size_gb * GIB, vol.allocated + nbytes)
        self._save()

    def read(self, volume_id: str) -> str:
        """The simulated volume's content marker."""
        return self._volume(volume_id).content

    async def _enter(self, op: str) -> None:
        if self.latency:
            await asyncio.sleep(self.latency)
        pending = self._faults.get(op)
        if pending:
            raise pending.pop(0)

    # -- lookups ------------------------------------------------------------------------

    def _find(self, volume_id: str) -> _SimVolume | None:
        vol = self.volumes.get(volume_id)
        if vol is None and self.shared is not None:
            vol = self.shared.volumes.get(volume_id)
        return vol

    def _volume(self, volume_id: str) -> _SimVolume:
        check_uuid(volume_id, "volume id")
        vol = self._find(volume_id)
        if vol is None:
            raise VolumeNotFound(f"no volume {volume_id} on node {self.node}")
        return vol

    @staticmethod
    def _path(vol: _SimVolume) -> Path:
        return Path(vol.directory) / "volumes" / f"{vol.volume_id}.qcow2"

    def _image_path(self, image_id: str, fmt: str, shared: bool) -> Path:
        base = self.shared.path if shared and self.shared is not None else self.root
        return base / "images" / f"{image_id}.{fmt}"

    def _dir_used(self, path: str, d: _SimDir, volumes: dict[str, _SimVolume]) -> int:
        return d.other_bytes + sum(v.allocated for v in volumes.values() if v.directory == path)

    def _info(self, vol: _SimVolume) -> VolumeInfo:
        return VolumeInfo(
            volume_id=vol.volume_id, path=str(self._path(vol)), format="qcow2",
            size_gb=vol.size_gb, allocated_bytes=vol.allocated, thin=vol.thin,
            directory=vol.directory, backing_image_id=vol.image_id if vol.backing else None,
            snapshots=[VolumeSnapshotInfo(name=n, vm_state_size=0)
                       for n in sorted(vol.snapshots, key=lambda n: vol.created[n])])

    def _check_closed(self, vol: _SimVolume, what: str) -> None:
        path = str(self._path(vol))
        holder = self.shared.open_by.get(path) if vol.shared and self.shared else None
        if vol.volume_id in self._open_here or holder is not None:
            raise VolumeInUse(
                f"volume {vol.volume_id} is open by a running domain"
                f"{f' on node {holder}' if holder and holder != self.node else ''}: "
                f"stop it to {what}")

    # -- images -------------------------------------------------------------------------

    async def ensure_image(self, image: ImageLocation, access: ImageAccess | None, *,
                           shared: bool = False) -> Path:
        """Record ``image`` as cached (on the shared mount when ``shared``); a different
        checksum for a cached id is refused."""
        await self._enter("ensure_image")
        check_image_location(image)
        if shared and self.shared is None:
            raise DiskError(f"image {image.image_id}: node {self.node} has no shared storage")
        cache = self.shared.images if shared and self.shared is not None else self.images
        cached = cache.get(image.image_id)
        if cached is not None:
            if cached.sha256 != image.sha256:
                raise DiskError(
                    f"cached image {image.image_id} has sha256 {cached.sha256} but the storage "
                    f"server says {image.sha256}"
                )
            cached.last_used = time.time()
        else:
            cache[image.image_id] = _SimImage(image.sha256, image.size, image.format,
                                              time.time())
            if shared and self.shared is not None:
                self.shared.fetches += 1
            else:
                self.downloads += 1
                self._evict(keep=image.image_id)
        self._save()
        return self._image_path(image.image_id, image.format, shared)

    def _evict(self, keep: str) -> None:
        """Past ``image_cache_gb``, drop least-recently-used images no volume is based on."""
        if self.image_cache_gb is None:
            return
        limit = int(self.image_cache_gb * GIB)
        pinned = {v.image_id for v in self.volumes.values() if v.backing} | {keep}
        total = sum(i.size for i in self.images.values())
        for image_id, img in sorted(self.images.items(), key=lambda kv: kv[1].last_used):
            if total <= limit:
                break
            if image_id in pinned:
                continue
            del self.images[image_id]
            total -= img.size
            log.info("cached image evicted", extra={"image": image_id, "node": self.node})

    # -- volumes ------------------------------------------------------------------------

    async def ensure_volume(self, disk: DiskSpec) -> ResolvedDisk:
        """Record the volume (idempotent); its image must have been ensured first."""
        await self._enter("ensure_volume")
        volume_id = check_volume_spec(disk)
        shared = disk.storage == "shared"
        if shared and self.shared is None:
            raise DiskError(f"volume {volume_id}: node {self.node} has no shared storage")
        vol = self._find(volume_id)
        if vol is None:
            if not disk.create:
                raise VolumeNotFound(f"no volume {volume_id} on node {self.node} (disk "
                                     f"{disk.disk_id} must exist: it is not made blank)")
            vol = self._create(volume_id, disk, shared)
        return ResolvedDisk(disk_id=disk.disk_id, path=self._path(vol), format="qcow2",
                            bus=disk.bus, shared=vol.shared)

    def _create(self, volume_id: str, disk: DiskSpec, shared: bool) -> _SimVolume:
        content = ""
        if disk.image_id is not None:
            cache = self.shared.images if shared and self.shared is not None else self.images
            cached = cache.get(disk.image_id)
            if cached is None:
                raise DiskError(
                    f"disk {disk.disk_id}: image {disk.image_id} is not cached "
                    f"{'on the shared mount' if shared else 'on this node'} (ensure_image first)")
            if disk.image_sha256 is not None and disk.image_sha256 != cached.sha256:
                raise DiskError(
                    f"disk {disk.disk_id}: cached image {disk.image_id} has sha256 "
                    f"{cached.sha256}, not {disk.image_sha256}")
            cached.last_used = time.time()
            content = cached.content
            copied = 0 if disk.backing else cached.size
        else:
            copied = 0
        size = disk.size_gb * GIB
        if shared and self.shared is not None:
            mount = self.shared
            path = str(mount.path)
            free = mount.dir.total_bytes - self._dir_used(path, mount.dir, mount.volumes)
            target = choose_dir([DirSpace(path, mount.dir.total_bytes, free)], size, volume_id)
            volumes = mount.volumes
        else:
            spaces = [DirSpace(p, d.total_bytes, d.total_bytes - self._dir_used(p, d, self.volumes))
                      for p, d in self.dirs.items()]
            target = choose_dir(spaces, size, volume_id)
            volumes = self.volumes
        vol = _SimVolume(volume_id=volume_id, directory=target.path, size_gb=disk.size_gb,
                         thin=disk.thin, image_id=disk.image_id,
                         allocated=QCOW2_HEADER_BYTES + copied if disk.thin else size,
                         shared=shared, backing=disk.backing, content=content)
        volumes[volume_id] = vol
        self._save()
        log.info("volume created", extra={"volume": volume_id, "node": self.node,
                                          "directory": target.path, "image": disk.image_id,
                                          "size_gb": disk.size_gb, "thin": disk.thin})
        return vol

    async def volume_info(self, volume_id: str) -> VolumeInfo:
        await self._enter("volume_info")
        return self._info(self._volume(volume_id))

    async def delete_volume(self, volume_id: str) -> None:
        await self._enter("delete_volume")
        check_uuid(volume_id, "volume id")
        vol = self._find(volume_id)
        if vol is None:
            return
        self._check_closed(vol, "delete it")
        if vol.shared and self.shared is not None:
            self.shared.volumes.pop(volume_id, None)
        else:
            self.volumes.pop(volume_id, None)
        self._save()
        log.info("volume deleted", extra={"volume": volume_id, "node": self.node})

    async def resize_volume(self, volume_id: str, size_gb: int, *,
                            online: bool = False) -> VolumeInfo:
        await self._enter("resize_volume")
        vol = self._volume(volume_id)
        if size_gb < vol.size_gb:
            raise DiskError(f"volume {volume_id}: cannot shrink from {vol.size_gb} GiB to "
                            f"{size_gb} GiB (only growing is allowed)")
        if not online:
            self._check_closed(vol, "resize it offline")
        if not vol.thin:
            vol.allocated = size_gb * GIB
        vol.size_gb = size_gb
        self._save()
        return self._info(vol)

    async def create_snapshot(self, volume_id: str, name: str) -> VolumeInfo:
        await self._enter("create_snapshot")
        vol = self._volume(volume_id)
        check_snapshot_name(volume_id, name)
        if name not in vol.snapshots:
            self._check_closed(vol, "snapshot it")
            vol.snapshots[name] = vol.content
            vol.created[name] = time.time()
            self._save()
        return self._info(vol)

    async def revert_snapshot(self, volume_id: str, name: str) -> VolumeInfo:
        await self._enter("revert_snapshot")
        vol = self._volume(volume_id)
        check_snapshot_name(volume_id, name)
        if name not in vol.snapshots:
            raise DiskError(f"volume {volume_id} has no snapshot {name!r}")
        self._check_closed(vol, "revert it")
        vol.content = vol.snapshots[name]
        self._save()
        return self._info(vol)

    async def delete_snapshot(self, volume_id: str, name: str) -> VolumeInfo:
        await self._enter("delete_snapshot")
        vol = self._volume(volume_id)
        check_snapshot_name(volume_id, name)
        if name in vol.snapshots:
            self._check_closed(vol, "delete a snapshot")
            del vol.snapshots[name]
            vol.created.pop(name, None)
            self._save()
        return self._info(vol)

    async def export_volume(self, volume_id: str, image_id: str, upload: Upload, *,
                            live: LiveCopy | None = None) -> StorageImageReport:
        """Upload a real qcow2 carrying the volume's content marker (written in a
        temporary directory, removed after), then keep the image in this node's cache
        with that content. ``live`` is not called: the sim guest writes nothing, and
        the sim volume has no file for the driver to copy; :attr:`exports` records it."""
        await self._enter("export_volume")
        vol = self._volume(volume_id)
        check_uuid(image_id, "image id")
        content = vol.content
        with tempfile.TemporaryDirectory(prefix="yun-sim-export-") as scratch:
            raw, copy = Path(scratch) / "volume.raw", Path(scratch) / f"{image_id}.qcow2"
            await asyncio.to_thread(_write_marker, raw, content)
            try:
                await qemu_img.convert(raw, copy, src_fmt="raw")
            except qemu_img.QemuImgError as exc:
                raise DiskError(f"volume {volume_id}: {exc}") from exc
            report = await upload(copy)
        self.exports.append((volume_id, live is not None))
        self.images[image_id] = _SimImage(report.sha256, report.size, report.format,
                                          time.time(), content=content)
        self._save()
        log.info("volume exported as an image", extra={
            "volume": volume_id, "image": image_id, "node": self.node,
            "live": live is not None, "size": report.size})
        return report

    async def volume_ids(self) -> list[str]:
        await self._enter("volume_ids")
        ids = set(self.volumes)
        if self.shared is not None:
            ids |= set(self.shared.volumes)
        return sorted(ids)

    # -- shared locking -----------------------------------------------------------------

    async def check_free(self, volume_id: str) -> None:
        """VolumeInUse when another node holds the volume's (simulated) image lock."""
        await self._enter("check_free")
        vol = self._volume(volume_id)
        if vol.shared and self.shared is not None:
            holder = self.shared.open_by.get(str(self._path(vol)))
            if holder is not None and holder != self.node:
                raise VolumeInUse(
                    f"volume {volume_id} on the shared mount is open by a running domain on "
                    f"node {holder}: it must stop there before this node may open it")

    async def note_open(self, volume_ids: list[str], is_open: bool) -> None:
        """Take or give back the simulated image lock of these volumes."""
        for volume_id in volume_ids:
            vol = self._find(volume_id)
            if vol is None:
                continue
            if is_open:
                self._open_here.add(volume_id)
            else:
                self._open_here.discard(volume_id)
            if vol.shared and self.shared is not None:
                path = str(self._path(vol))
                if is_open:
                    self.shared.open_by[path] = self.node
                elif self.shared.open_by.get(path) == self.node:
                    del self.shared.open_by[path]

    # -- per VM -------------------------------------------------------------------------

    async def ensure_seed(self, vm_uuid: str, spec: CloudInitSpec) -> ResolvedDisk:
        await self._enter("ensure_seed")
        check_uuid(vm_uuid, "VM uuid")
        data = spec.model_dump(mode="json")
        if self.seeds.get(vm_uuid) != data:
            self.seeds[vm_uuid] = data
            self._save()
        return ResolvedDisk(disk_id="cidata", path=self.root / "vms" / vm_uuid / "cidata.iso",
                            format="raw", bus="ide", device="cdrom", read_only=True)

    async def delete_vm_files(self, vm_uuid: str) -> None:
        await self._enter("delete_vm_files")
        check_uuid(vm_uuid, "VM uuid")
        had = self.seeds.pop(vm_uuid, None) is not None
        had = self._attached.pop(vm_uuid, None) is not None or had
        if had:
            self._save()

    async def vm_disk_ids(self) -> dict[str, list[str]]:
        """Every VM with a seed or recorded volumes, and those disk ids."""
        await self._enter("vm_disk_ids")
        found: dict[str, list[str]] = {}
        for vm in set(self.seeds) | set(self._attached):
            ids = set(self._attached.get(vm, {}))
            if vm in self.seeds:
                ids.add("cidata")
            if ids:
                found[vm] = sorted(ids)
        return dict(sorted(found.items()))

    async def set_attachments(self, vm_uuid: str, volumes: dict[str, str]) -> None:
        check_uuid(vm_uuid, "VM uuid")
        if volumes:
            self._attached[vm_uuid] = dict(volumes)
        else:
            self._attached.pop(vm_uuid, None)
        self._save()

    async def attachments(self) -> dict[str, dict[str, str]]:
        return {vm: dict(v) for vm, v in self._attached.items()}

    # -- capacity -----------------------------------------------------------------------

    async def storage_report(self) -> list[StorageDirReport]:
        """Each simulated directory (and the shared mount), thin volumes counted at what
        they take, thick ones at their size."""
        await self._enter("storage_report")
        out: list[StorageDirReport] = []
        places: list[tuple[str, _SimDir, dict[str, _SimVolume], bool]] = [
            (p, d, self.volumes, False) for p, d in self.dirs.items()]
        if self.shared is not None:
            places.append((str(self.shared.path), self.shared.dir, self.shared.volumes, True))
        for path, d, volumes, shared in places:
            mine = [v for v in volumes.values() if v.directory == path]
            used = self._dir_used(path, d, volumes)
            out.append(StorageDirReport(
                path=path, shared=shared, total_bytes=d.total_bytes, used_bytes=used,
                volumes=len(mine), allocated_bytes=sum(v.allocated for v in mine),
                over_threshold=self.alarm.check(path, used, d.total_bytes)))
        return out
