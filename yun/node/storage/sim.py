"""A disk backend in memory, for simulated nodes (thousands in one process).

It keeps the contract of :class:`~yun.node.storage.local.LocalDiskBackend` — same
validation, same errors, same idempotence — without files or downloads, so flows
tested against it behave as they will on a real node. Faults are injected with
:meth:`SimDiskBackend.fail_next`; ``latency`` makes every operation take time.

Given a state file (see :mod:`yun.node.hypervisor.sim.hostfile`), its volumes and cached
images outlive its process, as files on a real node do; without one they live in memory.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from yun.node.hypervisor.base import ResolvedDisk
from yun.node.hypervisor.sim.hostfile import SimHostFile
from yun.node.storage.base import DiskBackend, DiskError, ImageAccess
from yun.node.storage.local import check_disk, check_image_location, check_uuid
from yun.proto.messages import DiskSpec, ImageLocation

log = logging.getLogger("yun.node.storage.sim")

OPERATIONS = frozenset(
    {"ensure_image", "ensure_disk", "delete_disks", "vm_disk_ids", "capacity_gb"}
)


@dataclass(frozen=True)
class _SimImage:
    sha256: str
    size: int
    format: str


@dataclass(frozen=True)
class _SimVolume:
    disk_id: str
    size_gb: int
    image_id: str | None
    bus: str


class SimDiskBackend(DiskBackend):
    """Images and volumes as dictionaries; nothing touches the disk or the network."""

    def __init__(
        self, root: Path = Path("/sim"), *, total_gb: int = 4096, latency: float = 0.0,
        state_file: Path | None = None,
    ) -> None:
        self.root = Path(root)
        self.total_gb = total_gb
        self.latency = latency
        self.images: dict[str, _SimImage] = {}
        self.volumes: dict[str, dict[str, _SimVolume]] = {}
        self.downloads = 0  # how many images were "fetched" (cache misses)
        self._faults: dict[str, list[Exception]] = {}
        self._file = SimHostFile(state_file) if state_file is not None else None
        if self._file is not None:
            self._load(self._file)

    def _load(self, file: SimHostFile) -> None:
        for image_id, data in file.section("images").items():
            self.images[image_id] = _SimImage(data["sha256"], data["size"], data["format"])
        for data in file.section("disks").values():
            self.volumes.setdefault(data["vm_uuid"], {})[data["disk_id"]] = _SimVolume(
                data["disk_id"], data["size_gb"], data.get("image_id"), data.get("bus", "virtio"))

    def _save(self) -> None:
        """Write volumes and cached images to the host's state file (when it has one)."""
        if self._file is None:
            return
        disks: dict[str, Any] = {
            f"{vm}/{v.disk_id}": {"vm_uuid": vm, **asdict(v)}
            for vm, volumes in self.volumes.items() for v in volumes.values()}
        self._file.write({"disks": disks,
                          "images": {i: asdict(img) for i, img in self.images.items()}})

    def fail_next(self, op: str, error: Exception | None = None) -> None:
        """Make the next call of ``op`` raise ``error`` (a :class:`DiskError` by default).

        Calls queue up: ``fail_next("ensure_disk")`` twice fails the next two calls.
        """
        if op not in OPERATIONS:
            raise ValueError(f"unknown operation {op!r}; one of {', '.join(sorted(OPERATIONS))}")
        self._faults.setdefault(op, []).append(error or DiskError(f"injected failure of {op}"))

    async def _enter(self, op: str) -> None:
        if self.latency:
            await asyncio.sleep(self.latency)
        pending = self._faults.get(op)
        if pending:
            raise pending.pop(0)

    def _path(self, vm_uuid: str, disk_id: str) -> Path:
        return self.root / "vms" / vm_uuid / f"{disk_id}.qcow2"

    async def ensure_image(self, image: ImageLocation, access: ImageAccess | None) -> None:
        """Record ``image`` as cached; a different checksum for a cached id is refused."""
        await self._enter("ensure_image")
        check_image_location(image)
        cached = self.images.get(image.image_id)
        if cached is not None:
            if cached.sha256 != image.sha256:
                raise DiskError(
                    f"cached image {image.image_id} has sha256 {cached.sha256} but the storage "
                    f"server says {image.sha256}"
                )
            return
        self.images[image.image_id] = _SimImage(image.sha256, image.size, image.format)
        self.downloads += 1
        self._save()

    async def ensure_disk(self, vm_uuid: str, disk: DiskSpec) -> ResolvedDisk:
        """Record the volume (idempotent); its image must have been ensured first."""
        await self._enter("ensure_disk")
        check_disk(vm_uuid, disk)
        resolved = ResolvedDisk(
            disk_id=disk.disk_id, path=self._path(vm_uuid, disk.disk_id), format="qcow2",
            bus=disk.bus,
        )
        if disk.disk_id in self.volumes.get(vm_uuid, {}):
            return resolved
        if disk.image_id is not None:
            cached = self.images.get(disk.image_id)
            if cached is None:
                raise DiskError(
                    f"disk {disk.disk_id}: image {disk.image_id} is not cached on this node "
                    "(ensure_image first)"
                )
            if disk.image_sha256 is not None and disk.image_sha256 != cached.sha256:
                raise DiskError(
                    f"disk {disk.disk_id}: cached image {disk.image_id} has sha256 "
                    f"{cached.sha256}, not {disk.image_sha256}"
                )
        self.volumes.setdefault(vm_uuid, {})[disk.disk_id] = _SimVolume(
            disk.disk_id, disk.size_gb, disk.image_id, disk.bus
        )
        self._save()
        return resolved

    async def delete_disks(self, vm_uuid: str) -> None:
        """Forget the VM's volumes; nothing to do if it has none."""
        await self._enter("delete_disks")
        check_uuid(vm_uuid, "VM uuid")
        if self.volumes.pop(vm_uuid, None) is not None:
            self._save()

    async def vm_disk_ids(self) -> dict[str, list[str]]:
        """Every VM with volumes, and its disk ids."""
        await self._enter("vm_disk_ids")
        return {vm: sorted(disks) for vm, disks in sorted(self.volumes.items()) if disks}

    async def capacity_gb(self) -> tuple[int, int]:
        """(total, used) GiB, counting each volume at its full size (thick accounting).

        ``used`` may exceed ``total``: overbooking is for the caller to notice, not hide.
        """
        await self._enter("capacity_gb")
        used = sum(v.size_gb for disks in self.volumes.values() for v in disks.values())
        return self.total_gb, used
