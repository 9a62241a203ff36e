"""What the local disk backend and its sim twin share: input validation, the choice of
a storage directory, and the storage alarm (F-THIN), so both answer alike."""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

from yun.node.storage.base import DiskError, NoSpace
from yun.proto.messages import DiskSpec, ImageLocation
from yun.util import qemu_img
from yun.util.ids import uuid_problem

log = logging.getLogger("yun.node.storage")

GIB = 1024**3
# Every format a cached image may have: the disk formats plus ISO installation media.
CACHE_FORMATS = frozenset(qemu_img.IMAGE_FORMATS | {"iso"})
DISK_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
SNAPSHOT_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
DEFAULT_ALARM_PERCENT = 85.0


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


def check_volume_spec(disk: DiskSpec) -> str:
    """The volume id of ``disk``; refuse a spec that cannot name a volume safely or
    would make a disk of an ISO."""
    if not DISK_ID_RE.match(disk.disk_id):
        raise DiskError(
            f"invalid disk id {disk.disk_id[:80]!r}: letters, digits, '-' and '_' only"
        )
    if disk.volume_id is None:
        raise DiskError(f"disk {disk.disk_id}: no volume id (the agent fills in the legacy "
                        "id of a disk the control server sent without one)")
    check_uuid(disk.volume_id, "volume id")
    if disk.image_id is not None:
        check_uuid(disk.image_id, "image id")
        if disk.image_format is None or disk.image_format not in CACHE_FORMATS:
            raise DiskError(
                f"disk {disk.disk_id}: image {disk.image_id} has unsupported format "
                f"{disk.image_format!r}"
            )
        if disk.image_format == "iso":
            raise DiskError(
                f"disk {disk.disk_id}: image {disk.image_id} is an ISO, which is never a "
                "disk; attach it as the VM's CD drive instead"
            )
    return disk.volume_id


def check_snapshot_name(volume_id: str, name: str) -> str:
    """``name`` if it can name an internal snapshot."""
    if not SNAPSHOT_RE.match(name):
        raise DiskError(f"volume {volume_id}: invalid snapshot name {name[:80]!r}: letters, "
                        "digits, '.', '-' and '_' only, at most 64")
    return name


@dataclass(frozen=True)
class DirSpace:
    """A storage directory's space as the chooser sees it."""

    path: str
    total_bytes: int
    free_bytes: int


def choose_dir(dirs: list[DirSpace], size_bytes: int, volume_id: str) -> DirSpace:
    """The directory with the most free space, or :class:`NoSpace` when the volume's
    virtual size exceeds the free space of every directory (thin volumes too: a thin
    volume that could never be filled is refused up front rather than failing the
    guest's writes later)."""
    if not dirs:
        raise NoSpace(f"volume {volume_id}: this node has no storage directory")
    best = max(dirs, key=lambda d: d.free_bytes)
    if size_bytes > best.free_bytes:
        raise NoSpace(
            f"volume {volume_id}: {size_bytes / GIB:.1f} GiB do not fit in any storage "
            f"directory; the most free is {best.free_bytes / GIB:.1f} GiB in {best.path}"
        )
    return best


class StorageAlarm:
    """Remembers which directories are past the threshold, and logs when one crosses it
    (a warning) or drops back under it (info), naming the node and the directory."""

    def __init__(self, node: str, percent: float = DEFAULT_ALARM_PERCENT) -> None:
        if not 0 < percent <= 100:
            raise ValueError(f"storage alarm threshold must be in (0, 100], not {percent}")
        self.node = node
        self.percent = percent
        self._over: set[str] = set()

    def check(self, path: str, used: int, total: int) -> bool:
        """Whether ``path`` is past the threshold now; logs a change."""
        over = total > 0 and used * 100 > total * self.percent
        if over and path not in self._over:
            self._over.add(path)
            log.warning("storage directory past the alarm threshold", extra={
                "node": self.node, "directory": path, "used_bytes": used,
                "total_bytes": total, "threshold_percent": self.percent})
        elif not over and path in self._over:
            self._over.discard(path)
            log.info("storage directory back under the alarm threshold", extra={
                "node": self.node, "directory": path, "used_bytes": used,
                "total_bytes": total, "threshold_percent": self.percent})
        return over
