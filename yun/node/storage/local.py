"""Disks on the node's own file systems: an image cache and qcow2 volumes keyed by volume.

The node has several storage directories (``[node] storage_dirs``, one per disk of the
host; an entry may be a glob, expanded again on every report and volume creation, so a
directory made while the node runs is used at once) and optionally a shared mount
(``[node] shared_storage``, NFS or CephFS, present on every node of a shared pool)::

    <dir>/volumes/<volume_id>.qcow2      a volume (overlay of a cached image, or blank)
    <dir>/volumes/<volume_id>.json       what was asked of it (thin, image, backing file)
    <first dir>/images/<image_id>.<fmt>  the node's image cache (or [node] image_cache_dir)
    <first dir>/vms/<vm_uuid>/cidata.iso the VM's cloud-init seed
    <first dir>/vms/<vm_uuid>/attached.json  which volumes the VM's domain has
    <mount>/volumes/<volume_id>.qcow2    a shared volume
    <mount>/images/<image_id>.<fmt>      a base image on the shared mount (fetched once,
                                         under <image>.lock, by the first node needing it)

A cached image has beside it ``.sha256`` (the checksum it was verified against; its
mtime is the image's last use, for the bounded cache) and, while downloading, ``.part``
(resumed with Range). Volumes of the older per-VM layout (``vms/<vm>/<disk>.qcow2``)
are adopted at start under :func:`~yun.proto.messages.legacy_volume_id` (a rename in
the same file system).

VM disks and cached images are tenants' data: files are 0600 and directories 0700
whatever the umask. QEMU runs as another user than the node agent (``libvirt-qemu`` on
Debian, the ``user`` of ``/etc/libvirt/qemu.conf``), so the tree and the files QEMU
opens (volumes and cached bases) are owned by that user: it can traverse the 0700
directories and open the 0600 files, nobody else but root can. libvirt's own DAC
relabelling (``dynamic_ownership``) chowns only the files, never their directories,
so it cannot be relied on alone.
"""

from __future__ import annotations

import asyncio
import fcntl
import glob
import grp
import hashlib
import json
import logging
import os
import pwd
import re
import shutil
import ssl
import time
import uuid
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO, Literal

import httpx

from yun.node.hypervisor.base import ResolvedDisk
from yun.node.storage.base import (
    DiskBackend,
    DiskError,
    ImageAccess,
    LiveCopy,
    NoSpace,
    Upload,
    VolumeInUse,
    VolumeNotFound,
)
from yun.node.storage.common import (
    CACHE_FORMATS,
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
from yun.proto import PROTOCOL_VERSION, REQUEST_ID_HEADER, VERSION_HEADER
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
from yun.util.ids import uuid_problem
from yun.util.image_files import image_file, read_sidecar, sidecar_path, write_sidecar

log = logging.getLogger("yun.node.storage.local")

CHUNK = 1024 * 1024
_DIR_MODE = 0o700
_FILE_MODE = 0o600
QEMU_CONF = Path("/etc/libvirt/qemu.conf")
# What Debian's libvirt runs QEMU as when qemu.conf names no user or group.
_DEFAULT_QEMU_USER = "libvirt-qemu"
_DEFAULT_QEMU_GROUP = "libvirt-qemu"
_LEGACY_DISK_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
# (total, used, free for us) bytes of the file system holding a directory.
SpaceFn = Callable[[Path], tuple[int, int, int]]

__all__ = ["CACHE_FORMATS", "LocalDiskBackend", "check_image_location", "check_uuid",
           "fs_space", "qemu_owner"]


def fs_space(path: Path) -> tuple[int, int, int]:
    """(total, used, available) bytes of the file system holding ``path`` (statvfs)."""
    st = os.statvfs(path)
    total = st.f_blocks * st.f_frsize
    return total, total - st.f_bfree * st.f_frsize, st.f_bavail * st.f_frsize


# --- who QEMU runs as --------------------------------------------------------------------

Owner = tuple[int, int]


def _conf_value(text: str, key: str) -> str | None:
    """The value of ``key = "value"`` in libvirt's qemu.conf syntax, or None."""
    found = None
    for line in text.splitlines():
        match = re.match(rf'^\s*{key}\s*=\s*"([^"]*)"', line)
        if match:
            found = match.group(1)  # the last assignment wins, as in libvirt
    return found


def _resolve_id(name: str, kind: Literal["user", "group"]) -> int | None:
    if name.startswith("+") and name[1:].isdigit():  # libvirt's "+uid" form
        return int(name[1:])
    try:
        return pwd.getpwnam(name).pw_uid if kind == "user" else grp.getgrnam(name).gr_gid
    except KeyError:
        return None


def qemu_owner(conf: Path = QEMU_CONF) -> Owner | None:
    """(uid, gid) QEMU runs as under this host's libvirt, from ``qemu.conf``.

    None when that user does not exist here (no libvirt installed) or when this process
    is not root (it could not chown anyway): files then stay the agent's own."""
    if os.geteuid() != 0:
        return None
    try:
        text = conf.read_text()
    except OSError:
        text = ""
    uid = _resolve_id(_conf_value(text, "user") or _DEFAULT_QEMU_USER, "user")
    gid = _resolve_id(_conf_value(text, "group") or _DEFAULT_QEMU_GROUP, "group")
    if uid is None or gid is None:
        return None
    return uid, gid


# --- the backend -----------------------------------------------------------------------


class LocalDiskBackend(DiskBackend):
    """Images cached and volumes kept in this node's storage directories (and its
    shared mount).

    ``storage`` is one directory or a list of directories or globs; ``owner`` is the
    (uid, gid) given the directories, cached images and volumes: by default the user
    QEMU runs as (:func:`qemu_owner`); None leaves them the agent's. ``space`` reads a
    directory's (total, used, free) bytes: statvfs unless a test gives another."""

    def __init__(self, storage: Path | str | Sequence[Path | str], *,
                 image_cache_dir: Path | None = None, image_cache_gb: float | None = None,
                 shared_storage: Path | None = None,
                 alarm_percent: float = DEFAULT_ALARM_PERCENT, node: str = "node",
                 http_timeout: float = 300,
                 owner: Owner | Literal["qemu"] | None = "qemu",
                 space: SpaceFn = fs_space) -> None:
        raw = [storage] if isinstance(storage, (str, Path)) else list(storage)
        if not raw:
            raise ValueError("a node needs at least one storage directory")
        self.patterns = [str(p) for p in raw]
        self.owner: Owner | None = qemu_owner() if owner == "qemu" else owner
        self.node = node
        self.space = space
        self.http_timeout = http_timeout
        self.image_cache_bytes = int(image_cache_gb * GIB) if image_cache_gb else None
        self.alarm = StorageAlarm(node, alarm_percent)
        # The fixed directories exist from the start; glob matches appear on their own.
        for pattern in self.patterns:
            if not glob.has_magic(pattern):
                _mkdir(Path(pattern), self.owner)
        dirs = self.storage_dirs()
        if not dirs and image_cache_dir is None:
            raise ValueError(f"no storage directory matches {self.patterns}: name one that "
                             "exists, or an image_cache_dir")
        self.root = dirs[0] if dirs else Path(self.patterns[0])
        self.images_dir = Path(image_cache_dir) if image_cache_dir else self.root / "images"
        self.vms_dir = self.root / "vms"
        self.shared = Path(shared_storage) if shared_storage is not None else None
        for d in (self.images_dir, self.vms_dir):
            _mkdir(d, self.owner)
        if self.shared is not None:
            if not self.shared.is_dir():
                raise ValueError(f"shared storage {self.shared} is not a directory (is the "
                                 "NFS or CephFS mount there?)")
            for d in (self.shared / "volumes", self.shared / "images"):
                _mkdir(d, self.owner)
        self._tighten_modes()
        self._adopt_legacy()
        self._sweep_leftovers()
        self._image_locks: dict[str, asyncio.Lock] = {}
        self._volume_locks: dict[str, asyncio.Lock] = {}
        self._where: dict[str, Path] = {}
        self._client: httpx.AsyncClient | None = None
        self._client_tls: ssl.SSLContext | None = None
        self._old_clients: list[httpx.AsyncClient] = []

    async def aclose(self) -> None:
        """Close the HTTP client used for downloads."""
        for client in [*self._old_clients, *([self._client] if self._client else [])]:
            await client.aclose()
        self._client = None
        self._old_clients.clear()

    # --- directories ---------------------------------------------------------------------

    def storage_dirs(self) -> list[Path]:
        """The storage directories now: fixed entries, and what each glob matches (read
        again on every call, so a directory made while the node runs counts at once)."""
        found: list[Path] = []
        seen: set[str] = set()
        for pattern in self.patterns:
            matches = (sorted(Path(p) for p in glob.glob(pattern) if os.path.isdir(p))
                       if glob.has_magic(pattern) else [Path(pattern)])
            for path in matches:
                key = os.path.realpath(path)
                if key not in seen and path.is_dir():
                    seen.add(key)
                    found.append(path)
        return found

    def _volumes_dir(self, directory: Path) -> Path:
        vdir = directory / "volumes"
        if not vdir.is_dir():
            _mkdir(vdir, self.owner)
        return vdir

    def _places(self) -> list[tuple[Path, bool]]:
        places = [(d, False) for d in self.storage_dirs()]
        if self.shared is not None:
            places.append((self.shared, True))
        return places

    def _sweep_leftovers(self) -> None:
        """Remove what an agent that died mid-way left in its own storage directories:
        volumes being built (``.<id>.qcow2.tmp``) and copies being exported
        (``.export-<image>.qcow2``). Not on the shared mount, where another node may be
        doing either right now."""
        for directory in self.storage_dirs():
            volumes = directory / "volumes"
            for path in (*volumes.glob(".*.qcow2.tmp"), *volumes.glob(".export-*.qcow2")):
                path.unlink(missing_ok=True)
                log.info("leftover of an interrupted volume operation removed",
                         extra={"node": self.node, "path": str(path)})

    def _tighten_modes(self) -> None:
        """Make what an older version left world-readable (0644 files, 0755
        directories) private, and give it to QEMU's user."""
        volumes = [p for d in self.storage_dirs() for p in (d / "volumes").glob("*.qcow2")]
        for path in (*self.images_dir.iterdir(), *self.vms_dir.glob("*/*.qcow2"), *volumes):
            if path.is_file() and not path.name.endswith((".sha256", ".part", ".tmp")):
                _private(path, self.owner)
        for vm_dir in self.vms_dir.iterdir():
            if vm_dir.is_dir():
                _mkdir(vm_dir, self.owner)

    def _adopt_legacy(self) -> None:
        """Move disks of the older per-VM layout (``vms/<vm>/<disk>.qcow2``, in any
        storage directory) to ``volumes/<legacy id>.qcow2`` of the same directory (one
        rename: same file system), and record them as attached to their VM."""
        for directory in self.storage_dirs():
            vms = directory / "vms"
            if not vms.is_dir():
                continue
            for disk in sorted(vms.glob("*/*.qcow2")):
                vm, disk_id = disk.parent.name, disk.stem
                if uuid_ok(vm) is None or not _LEGACY_DISK_RE.match(disk_id):
                    continue
                volume_id = legacy_volume_id(vm, disk_id)
                target = self._volumes_dir(directory) / f"{volume_id}.qcow2"
                if not target.exists():
                    _write_json(target.with_suffix(".json"),
                                {"thin": True, "legacy": f"{vm}/{disk_id}"})
                    os.rename(disk, target)
                else:
                    log.warning("legacy disk not adopted: its volume exists already",
                                extra={"vm": vm, "disk": disk_id, "volume": volume_id,
                                       "path": str(disk)})
                    continue
                attached = self._read_attached(vm)
                attached.setdefault(disk_id, volume_id)
                self._write_attached(vm, attached)
                log.info("legacy disk adopted as a volume", extra={
                    "vm": vm, "disk": disk_id, "volume": volume_id, "path": str(target)})

    def _http(self, access: ImageAccess | None) -> httpx.AsyncClient:
        # Created lazily so the backend can be built outside an event loop, and again when
        # the TLS context changes (a new join); one client keeps its connections.
        tls = access.tls if access is not None else None
        if self._client is None or tls is not self._client_tls:
            if self._client is not None:
                self._old_clients.append(self._client)
            self._client = httpx.AsyncClient(
                timeout=httpx.Timeout(self.http_timeout, connect=min(10.0, self.http_timeout)),
                follow_redirects=False, verify=tls if tls is not None else True,
            )
            self._client_tls = tls
        return self._client

    def image_path(self, image_id: str, fmt: str, *, shared: bool = False) -> Path:
        """Where image ``image_id`` of format ``fmt`` is cached (on the shared mount
        when ``shared``)."""
        check_uuid(image_id, "image id")
        if fmt not in CACHE_FORMATS:
            raise DiskError(f"image {image_id} has unsupported format {fmt!r}")
        if shared:
            if self.shared is None:
                raise DiskError(f"image {image_id}: node {self.node} has no shared storage "
                                "([node] shared_storage)")
            return image_file(self.shared / "images", image_id, fmt)
        return image_file(self.images_dir, image_id, fmt)

    # --- image cache -------------------------------------------------------------------

    async def ensure_image(self, image: ImageLocation, access: ImageAccess | None, *,
                           shared: bool = False) -> Path:
        """Fetch ``image`` into the cache (or the shared mount) unless it is already
        there and verified; its last use is recorded, and the node's cache trimmed."""
        check_image_location(image)
        path = self.image_path(image.image_id, image.format, shared=shared)
        # One download per image even when several VMs ask for it at once.
        lock = self._image_locks.setdefault(f"{shared}/{image.image_id}", asyncio.Lock())
        async with lock:
            if shared:
                # Other nodes of the pool share the mount: a lock file keeps them from
                # fetching the same image at once (flock works on NFSv4 and CephFS).
                fd = os.open(path.with_name(path.name + ".lock"),
                             os.O_CREAT | os.O_RDWR | os.O_CLOEXEC, _FILE_MODE)
                try:
                    await asyncio.to_thread(fcntl.flock, fd, fcntl.LOCK_EX)
                    if not await self._cached_ok(image, path):
                        await self._download(image, path, access)
                    else:
                        # Perhaps published by a storage server in shared mode (its own
                        # file on the mount): QEMU's user must read it.
                        await asyncio.to_thread(_private, path, self.owner)
                finally:
                    os.close(fd)  # closing drops the flock
                return path
            if not await self._cached_ok(image, path):
                await self._download(image, path, access)
                await asyncio.to_thread(self._evict, path)
            _touch(sidecar_path(path))
        return path

    def _evict(self, keep: Path) -> None:
        """Past ``image_cache_gb``, remove least-recently-used cached images that no
        volume has as its backing file (and never ``keep``, just asked for)."""
        if self.image_cache_bytes is None:
            return
        images = [p for p in self.images_dir.iterdir()
                  if p.is_file() and p.suffix.lstrip(".") in CACHE_FORMATS]
        total = sum(p.stat().st_size for p in images)
        if total <= self.image_cache_bytes:
            return
        pinned = self._pinned_bases() | {os.path.realpath(keep)}
        for path in sorted(images, key=lambda p: _mtime(sidecar_path(p))):
            if total <= self.image_cache_bytes:
                break
            if os.path.realpath(path) in pinned:
                continue
            size = path.stat().st_size
            path.unlink(missing_ok=True)
            sidecar_path(path).unlink(missing_ok=True)
            total -= size
            log.info("cached image evicted", extra={
                "node": self.node, "image": path.stem, "size": size,
                "cache_limit": self.image_cache_bytes})
        if total > self.image_cache_bytes:
            log.warning("image cache past its limit: the rest is in use by volumes", extra={
                "node": self.node, "cache_bytes": total, "cache_limit": self.image_cache_bytes})

    def _pinned_bases(self) -> set[str]:
        """Real paths of every backing file a volume of this node records."""
        pinned: set[str] = set()
        for directory in self.storage_dirs():
            for meta_path in (directory / "volumes").glob("*.json"):
                backing = _read_json(meta_path).get("backing")
                if backing:
                    pinned.add(os.path.realpath(backing))
                elif "backing" not in _read_json(meta_path):
                    # An adopted legacy volume: read its header for the backing file.
                    found = _qcow2_backing(meta_path.with_suffix(".qcow2"))
                    if found:
                        pinned.add(os.path.realpath(found))
        return pinned

    async def _cached_ok(self, image: ImageLocation, path: Path) -> bool:
        if not await asyncio.to_thread(path.exists):
            return False
        sidecar = sidecar_path(path)
        recorded = await asyncio.to_thread(read_sidecar, sidecar)
        if recorded is None:
            # Died between verification and writing the sidecar: hash it once more.
            recorded = await asyncio.to_thread(_sha256_file, path)
            write_sidecar(sidecar, recorded)
        if recorded != image.sha256:
            # Never replace it: running VMs may have overlays on top of this file.
            raise DiskError(
                f"cached image {image.image_id} has sha256 {recorded} but the storage server "
                f"says {image.sha256}; remove {path} by hand if no VM uses it"
            )
        return True

    async def _download(self, image: ImageLocation, path: Path, access: ImageAccess | None) -> None:
        part = path.with_name(path.name + ".part")
        have, digest = 0, hashlib.sha256()
        # A second pass happens only when the server refuses the resume point (416).
        for _ in range(2):
            have = _size_or_zero(part)
            if have > image.size:
                part.unlink()
                have = 0
            if have == image.size:
                # Complete but never verified (the agent died): just verify it.
                digest = hashlib.sha256()
                await asyncio.to_thread(_hash_into, part, digest, have)
                break
            fetched = await self._fetch(image, part, have, access)
            if fetched is None:
                part.unlink(missing_ok=True)
                continue
            have, digest = fetched
            break
        if have != image.size:
            part.unlink(missing_ok=True)
            raise DiskError(
                f"image {image.image_id}: downloaded {have} bytes, expected {image.size}"
            )
        got = digest.hexdigest()
        if got != image.sha256:
            part.unlink(missing_ok=True)
            log.warning("image checksum mismatch",
                        extra={"image": image.image_id, "sha256": got, "expected": image.sha256})
            raise DiskError(
                f"image {image.image_id}: sha256 {got} does not match the expected "
                f"{image.sha256}; the download was discarded"
            )
        # QEMU opens the cached image as the backing file of every overlay on it.
        _private(part, self.owner)
        # Sidecar before rename: a cached file therefore always has its checksum.
        write_sidecar(sidecar_path(path), got)
        os.replace(part, path)
        log.info("image cached", extra={"image": image.image_id, "sha256": got,
                                        "size": image.size})

    async def _fetch(
        self, image: ImageLocation, part: Path, have: int, access: ImageAccess | None
    ) -> tuple[int, hashlib._Hash] | None:
        """Stream ``image`` into ``part`` from byte ``have``.

        Returns the bytes now in ``part`` and the sha256 of all of them, or None when
        the server refuses to resume at ``have`` (the caller starts over). Raises
        :class:`DiskError`; after a broken connection ``part`` keeps what arrived.
        """
        headers = {
            VERSION_HEADER: str(PROTOCOL_VERSION),
            REQUEST_ID_HEADER: uuid.uuid4().hex,
        }
        if have:
            headers["Range"] = f"bytes={have}-"
        log.info("downloading image", extra={"image": image.image_id, "url": image.url,
                                             "resume_from": have})
        try:
            async with self._http(access).stream(
                    "GET", image.url, headers=headers,
                    auth=access.auth if access and access.auth else httpx.USE_CLIENT_DEFAULT,
            ) as resp:
                if resp.status_code == 416 and have:
                    return None
                digest = hashlib.sha256()
                if resp.status_code == 206 and have:
                    _check_content_range(resp, have, image)
                    # Resuming: the bytes already on disk are part of the checksum.
                    await asyncio.to_thread(_hash_into, part, digest, have)
                    mode: Literal["ab", "wb"] = "ab"
                elif resp.status_code == 200:
                    # A full answer (also when the server ignored our Range): from zero.
                    have, mode = 0, "wb"
                else:
                    body = (await resp.aread())[:300].decode(errors="replace")
                    raise DiskError(
                        f"image {image.image_id}: storage server answered HTTP "
                        f"{resp.status_code}: {body}"
                    )
                have = await _write_body(resp, part, mode, have, digest, image)
        except httpx.HTTPError as exc:
            size = _size_or_zero(part)
            raise DiskError(
                f"download of image {image.image_id} interrupted after {size} bytes "
                f"({exc.__class__.__name__}: {exc}); the next attempt resumes"
            ) from exc
        return have, digest

    # --- volumes -------------------------------------------------------------------------

    def _locate(self, volume_id: str) -> Path | None:
        """The volume's file in any storage directory or the shared mount, or None."""
        known = self._where.get(volume_id)
        if known is not None and known.exists():
            return known
        for directory, _shared in self._places():
            path = directory / "volumes" / f"{volume_id}.qcow2"
            if path.exists():
                self._where[volume_id] = path
                return path
        self._where.pop(volume_id, None)
        return None

    def _require(self, volume_id: str) -> Path:
        check_uuid(volume_id, "volume id")
        path = self._locate(volume_id)
        if path is None:
            raise VolumeNotFound(f"no volume {volume_id} on node {self.node}")
        return path

    def _is_shared(self, path: Path) -> bool:
        return self.shared is not None and path.parent.parent == self.shared

    async def ensure_volume(self, disk: DiskSpec) -> ResolvedDisk:
        """The volume of ``disk``: found, or made (an overlay of its cached image, or
        blank; thin, or preallocated) in the directory with the most free space."""
        volume_id = check_volume_spec(disk)
        shared = disk.storage == "shared"
        if shared and self.shared is None:
            raise DiskError(f"volume {volume_id}: node {self.node} has no shared storage "
                            "([node] shared_storage)")
        lock = self._volume_locks.setdefault(volume_id, asyncio.Lock())
        async with lock:
            path = self._locate(volume_id)
            if path is None:
                if not disk.create:
                    raise VolumeNotFound(
                        f"no volume {volume_id} on node {self.node} (disk {disk.disk_id} "
                        "must exist: it is not made blank)")
                path = await self._create(volume_id, disk, shared)
        return ResolvedDisk(disk_id=disk.disk_id, path=path, format="qcow2", bus=disk.bus,
                            shared=self._is_shared(path))

    async def _create(self, volume_id: str, disk: DiskSpec, shared: bool) -> Path:
        base = self._cached_base(disk, shared) if disk.image_id is not None else None
        size = disk.size_gb * GIB
        if base is not None:
            assert disk.image_format is not None  # checked by check_volume_spec
            base_info = await _img(volume_id, qemu_img.info(base, fmt=disk.image_format))
            size = max(size, base_info.virtual_size)
        places = [self.shared] if shared and self.shared is not None else self.storage_dirs()
        spaces = []
        for directory in places:
            total, _used, free = await asyncio.to_thread(self.space, directory)
            spaces.append(DirSpace(str(directory), total, free))
        target = Path(choose_dir(spaces, size, volume_id).path)
        path = self._volumes_dir(target) / f"{volume_id}.qcow2"
        # Built under a temporary name and renamed: a crash never leaves a volume that
        # looks finished but is not.
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.unlink(missing_ok=True)
        prealloc = None if disk.thin else "falloc"
        try:
            if base is None:
                await _img(volume_id, qemu_img.create_blank(tmp, size, preallocation=prealloc))
            elif disk.backing:
                await _img(volume_id, qemu_img.create_overlay(
                    base, tmp, size, backing_format=disk.image_format,
                    preallocation=prealloc))
            else:
                await self._full_copy(volume_id, base, disk, tmp, size, prealloc)
            _private(tmp, self.owner)
            _write_json(path.with_suffix(".json"), {
                "thin": disk.thin, "image_id": disk.image_id,
                "backing": str(base) if base is not None and disk.backing else None})
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        if base is not None and not shared:
            _touch(sidecar_path(base))  # the image's last use, for the bounded cache
        self._where[volume_id] = path
        log.info("volume created", extra={"volume": volume_id, "node": self.node,
                                          "directory": str(target), "image": disk.image_id,
                                          "size_gb": disk.size_gb, "thin": disk.thin})
        return path

    async def _full_copy(self, volume_id: str, base: Path, disk: DiskSpec, tmp: Path,
                         size: int, prealloc: str | None) -> None:
        """The image copied whole into the new volume, which then stands on its own (no
        backing file: the image may go, and a damaged base breaks nothing), grown to the
        volume's size."""
        assert disk.image_format is not None
        await _img(volume_id, qemu_img.convert(base, tmp, src_fmt=disk.image_format,
                                               preallocation=prealloc))
        copied = await _img(volume_id, qemu_img.info(tmp, fmt="qcow2"))
        if copied.virtual_size < size:
            await _img(volume_id, qemu_img.resize(tmp, size, preallocation=prealloc))

    def _cached_base(self, disk: DiskSpec, shared: bool) -> Path:
        assert disk.image_id is not None and disk.image_format is not None
        base = self.image_path(disk.image_id, disk.image_format, shared=shared)
        if not base.exists():
            raise DiskError(
                f"disk {disk.disk_id}: image {disk.image_id} is not cached "
                f"{'on the shared mount' if shared else 'on this node'} (ensure_image first)"
            )
        if disk.image_sha256 is not None:
            recorded = read_sidecar(sidecar_path(base))
            if recorded is not None and recorded != disk.image_sha256:
                raise DiskError(
                    f"disk {disk.disk_id}: cached image {disk.image_id} has sha256 {recorded}, "
                    f"not {disk.image_sha256}"
                )
        return base

    async def volume_info(self, volume_id: str) -> VolumeInfo:
        path = self._require(volume_id)
        info = await _img(volume_id, qemu_img.info(path, fmt="qcow2"))
        meta = _read_json(path.with_suffix(".json"))
        # A full copy records the image it came from but stands on its own.
        image_id = meta.get("image_id") if meta.get("backing", True) else None
        if image_id is None and info.backing_file:
            stem = Path(info.backing_file).name.split(".")[0]
            image_id = stem if uuid_ok(stem) else None
        snaps = [VolumeSnapshotInfo(
            name=str(s.get("name")),
            created_at=(datetime.fromtimestamp(int(s["date-sec"]), UTC)
                        if "date-sec" in s else None),
            vm_state_size=int(s.get("vm-state-size", 0)))
            for s in info.raw.get("snapshots", []) if isinstance(s, dict)]
        return VolumeInfo(volume_id=volume_id, path=str(path), format=info.format,
                          size_gb=info.virtual_size // GIB, allocated_bytes=info.actual_size,
                          thin=bool(meta.get("thin", True)), directory=str(path.parent.parent),
                          backing_image_id=image_id, snapshots=snaps)

    async def delete_volume(self, volume_id: str) -> None:
        check_uuid(volume_id, "volume id")
        path = self._locate(volume_id)
        if path is None:
            return
        if self._is_shared(path):
            await self.check_free(volume_id)
        path.unlink(missing_ok=True)
        path.with_suffix(".json").unlink(missing_ok=True)
        self._where.pop(volume_id, None)
        self._volume_locks.pop(volume_id, None)
        log.info("volume deleted", extra={"volume": volume_id, "node": self.node,
                                          "path": str(path)})

    async def resize_volume(self, volume_id: str, size_gb: int, *,
                            online: bool = False) -> VolumeInfo:
        path = self._require(volume_id)
        current = await self.volume_info(volume_id)
        if size_gb < current.size_gb:
            raise DiskError(f"volume {volume_id}: cannot shrink from {current.size_gb} GiB "
                            f"to {size_gb} GiB (only growing is allowed)")
        if online or size_gb == current.size_gb:
            return current
        extra = (size_gb - current.size_gb) * GIB
        _total, _used, free = await asyncio.to_thread(self.space, path.parent)
        if extra > free:
            raise NoSpace(f"volume {volume_id}: growing by {extra / GIB:.1f} GiB does not fit "
                          f"in {path.parent.parent} ({free / GIB:.1f} GiB free)")
        await _img(volume_id, qemu_img.resize(
            path, size_gb * GIB, preallocation=None if current.thin else "falloc"),
            what="resize it offline")
        log.info("volume resized", extra={"volume": volume_id, "node": self.node,
                                          "size_gb": size_gb})
        return await self.volume_info(volume_id)

    async def create_snapshot(self, volume_id: str, name: str) -> VolumeInfo:
        path = self._require(volume_id)
        check_snapshot_name(volume_id, name)
        if name not in {s.name for s in (await self.volume_info(volume_id)).snapshots}:
            await _img(volume_id, qemu_img.snapshot(path, "create", name), what="snapshot it")
            log.info("volume snapshot made", extra={"volume": volume_id, "snapshot": name,
                                                    "node": self.node})
        return await self.volume_info(volume_id)

    async def revert_snapshot(self, volume_id: str, name: str) -> VolumeInfo:
        path = self._require(volume_id)
        check_snapshot_name(volume_id, name)
        if name not in {s.name for s in (await self.volume_info(volume_id)).snapshots}:
            raise DiskError(f"volume {volume_id} has no snapshot {name!r}")
        await _img(volume_id, qemu_img.snapshot(path, "apply", name), what="revert it")
        log.info("volume reverted to snapshot", extra={"volume": volume_id, "snapshot": name,
                                                        "node": self.node})
        return await self.volume_info(volume_id)

    async def delete_snapshot(self, volume_id: str, name: str) -> VolumeInfo:
        path = self._require(volume_id)
        check_snapshot_name(volume_id, name)
        if name in {s.name for s in (await self.volume_info(volume_id)).snapshots}:
            await _img(volume_id, qemu_img.snapshot(path, "delete", name),
                       what="delete a snapshot")
        return await self.volume_info(volume_id)

    async def export_volume(self, volume_id: str, image_id: str, upload: Upload, *,
                            live: LiveCopy | None = None) -> StorageImageReport:
        """Copy the volume into image ``image_id`` (see the contract): the hypervisor's
        live copy, or ``qemu-img convert`` of the closed volume (which reads through its
        base: the copy has no backing file), into ``.export-<image>.qcow2`` beside the
        volume (a dot file: never taken for a volume), uploaded, then removed."""
        path = self._require(volume_id)
        check_uuid(image_id, "image id")
        tmp = path.parent / f".export-{image_id}.qcow2"
        started = time.monotonic()
        try:
            # A retried export (its upload broke off) starts from a fresh copy.
            await asyncio.to_thread(tmp.unlink, missing_ok=True)
            if live is not None:
                await live(tmp)
            else:
                await _img(volume_id, qemu_img.convert(path, tmp, src_fmt="qcow2"),
                           "copy it (it is open: copy it live)")
            copied = time.monotonic() - started
            report = await upload(tmp)
        finally:
            await asyncio.to_thread(tmp.unlink, missing_ok=True)
        log.info("volume exported as an image", extra={
            "volume": volume_id, "image": image_id, "node": self.node, "live": live is not None,
            "size": report.size, "copy_seconds": round(copied, 2),
            "seconds": round(time.monotonic() - started, 2)})
        return report

    async def volume_ids(self) -> list[str]:
        ids: set[str] = set()
        for directory, _shared in self._places():
            for path in (directory / "volumes").glob("*.qcow2"):
                if not path.name.startswith("."):
                    ids.add(path.stem)
        return sorted(ids)

    async def check_free(self, volume_id: str) -> None:
        """On the shared mount: VolumeInUse while a QEMU anywhere holds the volume's
        image lock (probed with ``qemu-img info`` without ``--force-share``)."""
        path = self._require(volume_id)
        if not self._is_shared(path):
            return
        try:
            message = await qemu_img.write_locked_by(path)
        except qemu_img.QemuImgError as exc:
            raise DiskError(f"volume {volume_id}: {exc}") from exc
        if message is not None:
            log.warning("shared volume refused: open elsewhere", extra={
                "volume": volume_id, "node": self.node, "path": str(path)})
            raise VolumeInUse(
                f"volume {volume_id} on the shared storage is open by a QEMU process "
                f"(another node of the pool runs it): {_last_line(message)}")

    # --- per VM --------------------------------------------------------------------------

    def _vm_dir(self, vm_uuid: str) -> Path:
        return self.vms_dir / check_uuid(vm_uuid, "VM uuid")

    async def ensure_seed(self, vm_uuid: str, spec: CloudInitSpec) -> ResolvedDisk:
        """``vms/<vm>/cidata.iso``, written again only when ``spec`` changed."""
        vm_dir = self._vm_dir(vm_uuid)
        _mkdir(vm_dir, self.owner)
        path = vm_dir / "cidata.iso"
        record = vm_dir / "cidata.json"
        wanted = spec.model_dump(mode="json")
        if not path.exists() or _read_json(record) != wanted:
            from yun.node.storage.seed import write_seed

            try:
                await write_seed(path, spec, owner=self.owner)
            except (OSError, ValueError, RuntimeError) as exc:
                raise DiskError(f"VM {vm_uuid}: cannot write its cloud-init seed: {exc}"
                                ) from exc
            _write_json(record, wanted)
            log.info("cloud-init seed written", extra={"vm": vm_uuid, "node": self.node,
                                                       "hostname": spec.hostname})
        return ResolvedDisk(disk_id="cidata", path=path, format="raw", bus="ide",
                            device="cdrom", read_only=True)

    async def delete_vm_files(self, vm_uuid: str) -> None:
        vm_dir = self._vm_dir(vm_uuid)
        if not vm_dir.exists():
            return
        await asyncio.to_thread(shutil.rmtree, vm_dir)
        log.info("VM files deleted", extra={"vm": vm_uuid, "node": self.node})

    async def vm_disk_ids(self) -> dict[str, list[str]]:
        """Every VM with files here: its recorded volumes' disk ids, and its seed."""
        found: dict[str, list[str]] = {}
        for vm_dir in sorted(self.vms_dir.iterdir()):
            if not vm_dir.is_dir():
                continue
            ids = set(self._read_attached(vm_dir.name))
            if (vm_dir / "cidata.iso").exists():
                ids.add("cidata")
            if ids:
                found[vm_dir.name] = sorted(ids)
        return found

    def _read_attached(self, vm_uuid: str) -> dict[str, str]:
        data = _read_json(self.vms_dir / vm_uuid / "attached.json")
        return {str(k): str(v) for k, v in data.items()}

    def _write_attached(self, vm_uuid: str, volumes: dict[str, str]) -> None:
        vm_dir = self.vms_dir / vm_uuid
        if volumes:
            _mkdir(vm_dir, self.owner)
            _write_json(vm_dir / "attached.json", volumes)
        else:
            (vm_dir / "attached.json").unlink(missing_ok=True)
            if vm_dir.is_dir() and not any(vm_dir.iterdir()):
                vm_dir.rmdir()

    async def set_attachments(self, vm_uuid: str, volumes: dict[str, str]) -> None:
        check_uuid(vm_uuid, "VM uuid")
        self._write_attached(vm_uuid, volumes)

    async def attachments(self) -> dict[str, dict[str, str]]:
        found: dict[str, dict[str, str]] = {}
        for vm_dir in self.vms_dir.iterdir():
            attached = self._read_attached(vm_dir.name) if vm_dir.is_dir() else {}
            if attached:
                found[vm_dir.name] = attached
        return found

    # --- capacity ------------------------------------------------------------------------

    async def storage_report(self) -> list[StorageDirReport]:
        """Each storage directory (globs expanded now) and the shared mount."""
        out: list[StorageDirReport] = []
        for directory, shared in self._places():
            total, used, _free = await asyncio.to_thread(self.space, directory)
            files = [p for p in (directory / "volumes").glob("*.qcow2")
                     if not p.name.startswith(".")]
            allocated = sum(_allocated(p) for p in files)
            out.append(StorageDirReport(
                path=str(directory), shared=shared, total_bytes=total, used_bytes=used,
                volumes=len(files), allocated_bytes=allocated,
                over_threshold=self.alarm.check(str(directory), used, total)))
        return out


# --- helpers -----------------------------------------------------------------------------


def _discard(path: Path) -> None:
    path.unlink(missing_ok=True)


def _mkdir(path: Path, owner: Owner | None) -> None:
    path.mkdir(mode=_DIR_MODE, parents=True, exist_ok=True)
    # mkdir's mode is masked by the umask and ignored for an existing directory.
    os.chmod(path, _DIR_MODE)
    if owner is not None:
        os.chown(path, *owner)


def _private(path: Path, owner: Owner | None) -> None:
    """Make ``path`` 0600 and, when given, ``owner``'s."""
    os.chmod(path, _FILE_MODE)
    if owner is not None:
        os.chown(path, *owner)



def _size_or_zero(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0



def _hash_into(path: Path, digest: hashlib._Hash, length: int) -> None:
    """Feed the first ``length`` bytes of ``path`` into ``digest``."""
    remaining = length
    with path.open("rb") as f:
        while remaining > 0:
            data = f.read(min(CHUNK, remaining))
            if not data:
                raise DiskError(f"{path.name} is shorter than {length} bytes")
            digest.update(data)
            remaining -= len(data)


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    _hash_into(path, digest, path.stat().st_size)
    return digest.hexdigest()


def _check_content_range(resp: httpx.Response, have: int, image: ImageLocation) -> None:
    """A 206 must start exactly where the partial file ends, or it cannot be appended."""
    value = resp.headers.get("content-range", "")
    match = re.match(r"^bytes (\d+)-(\d+)/(\d+|\*)$", value.strip())
    if not match or int(match.group(1)) != have:
        raise DiskError(
            f"image {image.image_id}: asked to resume at byte {have}, server sent "
            f"Content-Range {value!r}"
        )


def _append(f: BinaryIO, digest: hashlib._Hash, data: bytes) -> None:
    f.write(data)
    digest.update(data)


async def _write_body(
    resp: httpx.Response,
    part: Path,
    mode: Literal["ab", "wb"],
    have: int,
    digest: hashlib._Hash,
    image: ImageLocation,
) -> int:
    """Append the response body to ``part``; return the bytes now in it.

    What arrived before a broken connection is still written, so the next attempt
    resumes after it rather than fetching it again.
    """
    # Created 0600: even a partial image is a tenant's data.
    flags = os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC | (os.O_APPEND if mode == "ab" else os.O_TRUNC)
    with os.fdopen(os.open(part, flags, _FILE_MODE), mode) as f:
        pending: list[bytes] = []
        pending_len = 0
        try:
            async for chunk in resp.aiter_bytes(CHUNK):
                if have + len(chunk) > image.size:
                    pending = []
                    f.close()
                    _discard(part)
                    raise DiskError(
                        f"image {image.image_id}: server sent more than the expected "
                        f"{image.size} bytes; the download was discarded"
                    )
                have += len(chunk)
                pending.append(chunk)
                pending_len += len(chunk)
                if pending_len >= CHUNK:
                    data, pending, pending_len = b"".join(pending), [], 0
                    await asyncio.to_thread(_append, f, digest, data)
        finally:
            if pending:
                await asyncio.to_thread(_append, f, digest, b"".join(pending))
    return have


def uuid_ok(value: str) -> str | None:
    """``value`` when it is a canonical UUID, else None."""
    return value if uuid_problem(value, "id") is None else None


async def _img(volume_id: str, call: Any, what: str = "") -> Any:
    """Await a qemu-img wrapper; its failure becomes DiskError, or VolumeInUse when a
    QEMU holds the image's lock."""
    try:
        return await call
    except qemu_img.QemuImgError as exc:
        if qemu_img.is_lock_error(exc):
            raise VolumeInUse(f"volume {volume_id} is open by a running domain: stop it to "
                              f"{what or 'change it'} ({_last_line(str(exc))})") from exc
        raise DiskError(f"volume {volume_id}: {exc}") from exc


def _last_line(text: str) -> str:
    lines = text.strip().splitlines()
    return lines[-1] if lines else text


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, sort_keys=True) + "\n")
    os.chmod(tmp, _FILE_MODE)
    os.replace(tmp, path)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _touch(path: Path) -> None:
    now = time.time()
    try:
        os.utime(path, (now, now))
    except FileNotFoundError:
        pass


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except FileNotFoundError:
        return 0.0


def _allocated(path: Path) -> int:
    try:
        return path.stat().st_blocks * 512
    except FileNotFoundError:
        return 0


def _qcow2_backing(path: Path) -> str | None:
    """The backing file named in a qcow2 header, read directly (no qemu-img per file)."""
    try:
        with path.open("rb") as f:
            header = f.read(20)
            if len(header) < 20 or header[:4] != b"QFI\xfb":
                return None
            offset = int.from_bytes(header[8:16], "big")
            size = int.from_bytes(header[16:20], "big")
            if not offset or not size or size > 4096:
                return None
            f.seek(offset)
            return f.read(size).decode(errors="replace")
    except OSError:
        return None
