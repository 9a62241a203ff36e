"""Disks on the node's own file system: an image cache and per-VM qcow2 volumes.

Layout under ``root``::

    images/<image_id>.<format>         a cached image, verified against its sha256
    images/<image_id>.<format>.sha256  the checksum it was verified against
    images/<image_id>.<format>.part    a download in progress (resumed with Range)
    vms/<vm_uuid>/<disk_id>.qcow2      a VM's volume (overlay of a cached image, or blank)

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
import grp
import hashlib
import logging
import os
import pwd
import re
import shutil
import ssl
import uuid
from pathlib import Path
from typing import BinaryIO, Literal

import httpx

from yun.node.hypervisor.base import ResolvedDisk
from yun.node.storage.base import DiskBackend, DiskError, ImageAccess
from yun.proto import PROTOCOL_VERSION, REQUEST_ID_HEADER, VERSION_HEADER
from yun.proto.messages import DiskSpec, ImageLocation
from yun.util import qemu_img
from yun.util.ids import uuid_problem

log = logging.getLogger("yun.node.storage.local")

GIB = 1024**3
CHUNK = 1024 * 1024
# Every format a cached image may have: the disk formats plus ISO installation media.
CACHE_FORMATS = frozenset(qemu_img.IMAGE_FORMATS | {"iso"})
_DISK_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_DIR_MODE = 0o700
_FILE_MODE = 0o600
QEMU_CONF = Path("/etc/libvirt/qemu.conf")
# What Debian's libvirt runs QEMU as when qemu.conf names no user or group.
_DEFAULT_QEMU_USER = "libvirt-qemu"
_DEFAULT_QEMU_GROUP = "libvirt-qemu"


# --- validation shared with the simulated backend ------------------------------------


def check_uuid(value: str, what: str) -> str:
    """``value`` if it is a canonical UUID; ids become path components, so nothing else."""
    problem = uuid_problem(value, what)
    if problem is not None:
        raise DiskError(problem)
    return value


def check_image_location(image: ImageLocation) -> None:
    """Refuse an image location the node could not or must not fetch."""
    check_uuid(image.image_id, "image id")
    if image.format not in CACHE_FORMATS:
        raise DiskError(f"image {image.image_id} has unsupported format {image.format!r}")
    if not _SHA256_RE.match(image.sha256):
        raise DiskError(f"image {image.image_id} has an invalid sha256 {image.sha256[:80]!r}")
    if image.size <= 0:
        raise DiskError(f"image {image.image_id} has an invalid size {image.size}")
    if not image.url.startswith(("http://", "https://")):
        raise DiskError(f"image {image.image_id} has a non-HTTP url {image.url[:200]!r}")


def check_disk(vm_uuid: str, disk: DiskSpec) -> None:
    """Refuse a disk spec that cannot name a volume safely."""
    check_uuid(vm_uuid, "VM uuid")
    if not _DISK_ID_RE.match(disk.disk_id):
        raise DiskError(
            f"invalid disk id {disk.disk_id[:80]!r}: letters, digits, '-' and '_' only"
        )
    if disk.image_id is not None:
        check_uuid(disk.image_id, "image id")
        if disk.image_format is None or disk.image_format not in CACHE_FORMATS:
            raise DiskError(
                f"disk {disk.disk_id}: image {disk.image_id} has unsupported format "
                f"{disk.image_format!r}"
            )


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
    """Images cached and volumes kept under ``root`` on this node.

    ``owner`` is the (uid, gid) given the directories, cached images and volumes: by
    default the user QEMU runs as (:func:`qemu_owner`); None leaves them the agent's."""

    def __init__(self, root: Path, *, http_timeout: float = 300,
                 owner: Owner | Literal["qemu"] | None = "qemu") -> None:
        self.root = Path(root)
        self.images_dir = self.root / "images"
        self.vms_dir = self.root / "vms"
        self.http_timeout = http_timeout
        self.owner: Owner | None = qemu_owner() if owner == "qemu" else owner
        for d in (self.root, self.images_dir, self.vms_dir):
            _mkdir(d, self.owner)
        self._tighten_modes()
        self._image_locks: dict[str, asyncio.Lock] = {}
        self._disk_locks: dict[str, asyncio.Lock] = {}
        self._client: httpx.AsyncClient | None = None
        self._client_tls: ssl.SSLContext | None = None
        self._old_clients: list[httpx.AsyncClient] = []

    async def aclose(self) -> None:
        """Close the HTTP client used for downloads."""
        for client in [*self._old_clients, *([self._client] if self._client else [])]:
            await client.aclose()
        self._client = None
        self._old_clients.clear()

    def _tighten_modes(self) -> None:
        """Make what an older version left world-readable (0644 files, 0755
        directories) private, and give it to QEMU's user."""
        for path in (*self.images_dir.iterdir(), *self.vms_dir.glob("*/*.qcow2")):
            if path.is_file() and not path.name.endswith((".sha256", ".part", ".tmp")):
                _private(path, self.owner)
        for vm_dir in self.vms_dir.iterdir():
            if vm_dir.is_dir():
                _mkdir(vm_dir, self.owner)

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

    def image_path(self, image_id: str, fmt: str) -> Path:
        """Where image ``image_id`` of format ``fmt`` is cached."""
        check_uuid(image_id, "image id")
        if fmt not in CACHE_FORMATS:
            raise DiskError(f"image {image_id} has unsupported format {fmt!r}")
        return self.images_dir / f"{image_id}.{fmt}"

    def volume_path(self, vm_uuid: str, disk_id: str) -> Path:
        """Where the volume ``disk_id`` of VM ``vm_uuid`` lives."""
        return self.vms_dir / check_uuid(vm_uuid, "VM uuid") / f"{disk_id}.qcow2"

    # --- image cache -------------------------------------------------------------------

    async def ensure_image(self, image: ImageLocation, access: ImageAccess | None) -> None:
        """Fetch ``image`` into the cache unless it is already there and verified."""
        check_image_location(image)
        path = self.image_path(image.image_id, image.format)
        # One download per image even when several VMs ask for it at once.
        lock = self._image_locks.setdefault(image.image_id, asyncio.Lock())
        async with lock:
            if await self._cached_ok(image, path):
                return
            await self._download(image, path, access)

    async def _cached_ok(self, image: ImageLocation, path: Path) -> bool:
        if not await asyncio.to_thread(path.exists):
            return False
        sidecar = _sha_path(path)
        recorded = await asyncio.to_thread(_read_sidecar, sidecar)
        if recorded is None:
            # Died between verification and writing the sidecar: hash it once more.
            recorded = await asyncio.to_thread(_sha256_file, path)
            _write_sidecar(sidecar, recorded)
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
        _write_sidecar(_sha_path(path), got)
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

    async def ensure_disk(self, vm_uuid: str, disk: DiskSpec) -> ResolvedDisk:
        """The volume of ``disk``: an overlay of its cached image, or a blank qcow2."""
        check_disk(vm_uuid, disk)
        path = self.volume_path(vm_uuid, disk.disk_id)
        resolved = ResolvedDisk(disk_id=disk.disk_id, path=path, format="qcow2", bus=disk.bus)
        lock = self._disk_locks.setdefault(f"{vm_uuid}/{disk.disk_id}", asyncio.Lock())
        async with lock:
            if path.exists():
                return resolved
            size = disk.size_gb * GIB
            # ISO media are attached as a CD-ROM (a later issue), never used as a base.
            base = None
            if disk.image_id is not None and disk.image_format != "iso":
                base = self._cached_base(disk)
            _mkdir(path.parent, self.owner)
            # Built under a temporary name and renamed: a crash never leaves a volume
            # that looks finished but is not.
            tmp = path.with_name(f".{path.name}.tmp")
            tmp.unlink(missing_ok=True)
            try:
                if base is None:
                    await qemu_img.create_blank(tmp, size)
                else:
                    assert disk.image_format is not None  # checked by check_disk
                    base_info = await qemu_img.info(base, fmt=disk.image_format)
                    grow = size if size > base_info.virtual_size else None
                    await qemu_img.create_overlay(
                        base, tmp, grow, backing_format=disk.image_format
                    )
                _private(tmp, self.owner)
                os.replace(tmp, path)
            except qemu_img.QemuImgError as exc:
                raise DiskError(f"VM {vm_uuid} disk {disk.disk_id}: {exc}") from exc
            finally:
                tmp.unlink(missing_ok=True)
        log.info("volume created", extra={"vm": vm_uuid, "disk": disk.disk_id,
                                          "image": disk.image_id, "size_gb": disk.size_gb})
        return resolved

    def _cached_base(self, disk: DiskSpec) -> Path:
        assert disk.image_id is not None and disk.image_format is not None
        base = self.image_path(disk.image_id, disk.image_format)
        if not base.exists():
            raise DiskError(
                f"disk {disk.disk_id}: image {disk.image_id} is not cached on this node "
                "(ensure_image first)"
            )
        if disk.image_sha256 is not None:
            recorded = _read_sidecar(_sha_path(base))
            if recorded is not None and recorded != disk.image_sha256:
                raise DiskError(
                    f"disk {disk.disk_id}: cached image {disk.image_id} has sha256 {recorded}, "
                    f"not {disk.image_sha256}"
                )
        return base

    async def delete_disks(self, vm_uuid: str) -> None:
        """Remove the VM's volume directory; nothing to do if it is absent."""
        check_uuid(vm_uuid, "VM uuid")
        vm_dir = self.vms_dir / vm_uuid
        if not vm_dir.exists():
            return
        await asyncio.to_thread(shutil.rmtree, vm_dir, ignore_errors=False)
        for key in [k for k in self._disk_locks if k.startswith(f"{vm_uuid}/")]:
            self._disk_locks.pop(key, None)
        log.info("volumes deleted", extra={"vm": vm_uuid})

    async def vm_disk_ids(self) -> dict[str, list[str]]:
        """Every VM with a volume directory here, and its disk ids."""
        found: dict[str, list[str]] = {}
        for vm_dir in sorted(self.vms_dir.iterdir()):
            if not vm_dir.is_dir():
                continue
            disks = sorted(p.stem for p in vm_dir.glob("*.qcow2") if not p.name.startswith("."))
            if disks:
                found[vm_dir.name] = disks
        return found

    async def capacity_gb(self) -> tuple[int, int]:
        """(total, used) GiB of the file system holding ``root``."""
        st = os.statvfs(self.root)
        total = st.f_blocks * st.f_frsize
        used = (st.f_blocks - st.f_bfree) * st.f_frsize
        return total // GIB, used // GIB


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


def _sha_path(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def _read_sidecar(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        return None


def _size_or_zero(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _write_sidecar(path: Path, sha256: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(sha256 + "\n")
    os.chmod(tmp, _FILE_MODE)
    os.replace(tmp, path)


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
