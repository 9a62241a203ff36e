"""The disk backend contract: images cached on the node, volumes made from them."""

from __future__ import annotations

import abc
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import httpx

from yun.node.hypervisor.base import ResolvedDisk
from yun.proto.messages import (
    CloudInitSpec,
    DiskSpec,
    ImageLocation,
    StorageDirReport,
    StorageImageReport,
    VolumeInfo,
)

#: Writes a consistent copy of a running domain's disk to the path given (the
#: hypervisor's live backup of that disk); the export then copies no file itself.
LiveCopy = Callable[[Path], Awaitable[None]]
#: Sends the finished copy at the path given to the storage server; its answer.
Upload = Callable[[Path], Awaitable[StorageImageReport]]


class DiskError(RuntimeError):
    """A disk or image could not be made ready."""


class VolumeNotFound(DiskError):
    """No volume with that id on this node (or its shared mount)."""


class VolumeInUse(DiskError):
    """The volume is open by a domain (here, or on another node of a shared mount)."""


class NoSpace(DiskError):
    """No storage directory has room for the volume."""


@dataclass(frozen=True)
class ImageAccess:
    """How this node reaches a storage server: ``auth`` signs each request with the node's
    key and credential, ``tls`` checks the server against the domain CA and presents the
    node's certificate."""

    auth: httpx.Auth | None = None
    tls: ssl.SSLContext | None = None


class DiskBackend(abc.ABC):
    """Images cached on this node and volumes made from them, keyed by volume (not by
    VM): a volume outlives its VM and, on a shared mount, moves between nodes.

    Two modes honour this one contract, each with a sim twin under the contract suite
    (tests/unit/test_disk_contract.py): local (several storage directories, one per
    disk of the host, new volumes in the one with the most free space) and shared (one
    mount present on every node of a pool)."""

    # -- images -------------------------------------------------------------------------

    @abc.abstractmethod
    async def ensure_image(self, image: ImageLocation, access: ImageAccess | None, *,
                           shared: bool = False) -> Path:
        """Have ``image`` in the node's cache (``shared``: in the shared mount's
        ``images/``, fetched once by whichever node needs it first, under a lock file),
        fetched from the storage server and verified; return its path. Interrupted
        downloads resume; a cached image whose checksum matches is not fetched
        again (its last use is recorded for the bounded cache)."""

    # -- volumes ------------------------------------------------------------------------

    @abc.abstractmethod
    async def ensure_volume(self, disk: DiskSpec) -> ResolvedDisk:
        """The volume ``disk.volume_id``: made when missing and ``disk.create`` (an overlay
        or copy of its cached image, or blank; thin or preallocated), in the directory
        with the most free space; :class:`VolumeNotFound` when missing and not
        ``create``; :class:`NoSpace` when no directory has room. Idempotent."""

    @abc.abstractmethod
    async def volume_info(self, volume_id: str) -> VolumeInfo:
        """The volume as it is on disk; :class:`VolumeNotFound` when absent."""

    @abc.abstractmethod
    async def delete_volume(self, volume_id: str) -> None:
        """Remove the volume and its snapshots; no error if there is none."""

    @abc.abstractmethod
    async def resize_volume(self, volume_id: str, size_gb: int, *,
                            online: bool = False) -> VolumeInfo:
        """Grow the (closed) volume's virtual size; shrinking is refused with DiskError.
        A volume open by a running domain is grown by the hypervisor instead, then this
        is called with ``online`` True: the backend only takes note of the new size."""

    @abc.abstractmethod
    async def create_snapshot(self, volume_id: str, name: str) -> VolumeInfo:
        """An internal snapshot ``name`` of the closed volume; idempotent."""

    @abc.abstractmethod
    async def revert_snapshot(self, volume_id: str, name: str) -> VolumeInfo:
        """The closed volume's content as it was at snapshot ``name``."""

    @abc.abstractmethod
    async def delete_snapshot(self, volume_id: str, name: str) -> VolumeInfo:
        """Drop snapshot ``name``; no error if there is none."""

    @abc.abstractmethod
    async def export_volume(self, volume_id: str, image_id: str, upload: Upload, *,
                            live: LiveCopy | None = None) -> StorageImageReport:
        """Copy the volume into a new image ``image_id`` (F-IMAGE): a self-contained
        qcow2 (its backing chain flattened) written to a temporary file next to the
        volume, by ``live`` when a running domain has the volume open, else from the
        closed volume; ``upload`` then sends that file to the storage server. The file
        is removed in every case, so a retried export starts afresh. Returns the
        storage server's report of the stored image. :class:`VolumeNotFound` when
        there is no such volume."""

    @abc.abstractmethod
    async def volume_ids(self) -> list[str]:
        """Every volume on this node (local) or on the shared mount (shared)."""

    # -- per VM: older disks and the cloud-init seed ------------------------------------

    @abc.abstractmethod
    async def ensure_seed(self, vm_uuid: str, spec: CloudInitSpec) -> ResolvedDisk:
        """The VM's NoCloud seed (an ISO9660 ``cidata`` volume, read-only CD), rewritten
        when ``spec`` changed."""

    @abc.abstractmethod
    async def delete_vm_files(self, vm_uuid: str) -> None:
        """Remove what the node keeps under the VM (its seed, disks of older versions);
        its volumes are deleted one by one with :meth:`delete_volume`."""

    @abc.abstractmethod
    async def vm_disk_ids(self) -> dict[str, list[str]]:
        """Every VM that has files under it on this node (seed, older disks), for
        reconciliation."""

    # -- which VM each volume is attached to (extension of the lead's contract) ----------

    @abc.abstractmethod
    async def set_attachments(self, vm_uuid: str, volumes: dict[str, str]) -> None:
        """Record the volumes plugged into VM ``vm_uuid`` (disk id -> volume id), kept
        across restarts of the agent; an empty mapping forgets the VM. The agent uses it
        to report which VM holds which volume and to find the domain of a volume."""

    @abc.abstractmethod
    async def attachments(self) -> dict[str, dict[str, str]]:
        """Every VM with volumes recorded: vm uuid -> (disk id -> volume id)."""

    async def check_free(self, volume_id: str) -> None:
        """Raise :class:`VolumeInUse` when a process elsewhere (another node of a shared
        mount) has the volume open. Call before defining or starting a domain on it when
        no domain on this node runs it. Local volumes: nothing to check."""

    async def note_open(self, volume_ids: list[str], is_open: bool) -> None:
        """A domain on this node opened (started) or closed (stopped, removed) these
        volumes. Real QEMU holds its own image lock, so the local backend ignores it;
        the sim backend keeps its lock registry with it."""

    # -- capacity -----------------------------------------------------------------------

    @abc.abstractmethod
    async def storage_report(self) -> list[StorageDirReport]:
        """Each storage directory (re-read: one added while the node runs is listed at
        once) with its use and whether it is past the alarm threshold."""

    async def capacity_gb(self) -> tuple[int, int]:
        """(total, used) space of all storage directories, in GiB."""
        dirs = await self.storage_report()
        gib = 1024**3
        return (sum(d.total_bytes for d in dirs) // gib, sum(d.used_bytes for d in dirs) // gib)
