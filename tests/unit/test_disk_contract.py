"""One contract suite for both disk backends keyed by volume: the sim twin and the local
backend (qcow2 files made by the real qemu-img in tmpfs mounts, so each storage
directory is a file system of its own size, as the disks of a host are).

What differs between the two is only how a test touches the "hardware": how a guest
writes into a volume (qemu-io on the file, or the sim's content marker), how a disk is
added to the host (a tmpfs mounted under the storage glob, or a simulated directory),
and how a domain elsewhere holds a shared volume open (a real, paused
qemu-system-x86_64 with the file as its drive, or the sim's lock registry).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import shutil
import subprocess
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from yun.node.storage.base import (
    DiskBackend,
    DiskError,
    NoSpace,
    VolumeInUse,
    VolumeNotFound,
)
from yun.node.storage.local import LocalDiskBackend
from yun.node.storage.sim import SimDiskBackend, SimSharedMount, exported_content
from yun.proto.messages import CloudInitSpec, DiskSpec, ImageLocation, StorageImageReport

GIB = 1024**3
MIB = 1024**2


def _mount_tmpfs(path: Path, size_mb: int) -> None:
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mb}m,mode=0700", "tmpfs",
                    str(path)], check=True)


async def _run(argv: list[str]) -> None:
    await asyncio.to_thread(subprocess.run, argv, check=True, capture_output=True)


class Harness:
    """A backend under test and the hands that play the host and the guests."""

    kind: str
    backend: DiskBackend
    peer: DiskBackend  # another node on the same shared mount
    storage: Path  # where storage directories are added (the storage glob's parent)

    async def cache_image(self) -> DiskSpec:
        """A 1 GiB qcow2 image in the node's cache; the DiskSpec fields naming it."""
        raise NotImplementedError

    def add_dir(self, name: str, size_mb: int) -> str:
        raise NotImplementedError

    def fill(self, path: str, nbytes: int) -> None:
        raise NotImplementedError

    async def write(self, volume_id: str, pattern: int) -> None:
        raise NotImplementedError

    async def holds(self, volume_id: str, pattern: int) -> bool:
        raise NotImplementedError

    def hold_open(self, volume_id: str) -> contextlib.AbstractAsyncContextManager[None]:
        """The volume open by a domain of the *peer* node for the block's duration."""
        raise NotImplementedError

    async def copy_holds(self, path: Path, pattern: int) -> bool:
        """Whether the exported image at ``path`` carries what :meth:`write` wrote."""
        raise NotImplementedError

    async def cleanup(self) -> None:
        pass


class SimHarness(Harness):
    kind = "sim"

    def __init__(self, tmp: Path) -> None:
        self.storage = tmp / "disks"
        self.mount = SimSharedMount(tmp / "shared", total_gb=20)
        self.sim = SimDiskBackend(tmp, dirs={str(self.storage / "d0"): 20}, node="node-a",
                                  shared=self.mount, alarm_percent=85)
        self.other = SimDiskBackend(tmp / "b", node="node-b", shared=self.mount)
        self.backend, self.peer = self.sim, self.other

    async def cache_image(self) -> DiskSpec:
        image_id = str(uuid.uuid4())
        loc = ImageLocation(image_id=image_id, url="http://storage/x", sha256="ab" * 32,
                            size=GIB, format="qcow2")
        await self.sim.ensure_image(loc, None)
        await self.sim.ensure_image(loc, None, shared=True)
        return DiskSpec(disk_id="root", size_gb=1, image_id=image_id, image_sha256=loc.sha256,
                        image_format="qcow2")

    def add_dir(self, name: str, size_mb: int) -> str:
        path = str(self.storage / name)
        self.sim.add_dir(path, size_mb / 1024)
        return path

    def fill(self, path: str, nbytes: int) -> None:
        self.sim.fill(path, nbytes)

    async def write(self, volume_id: str, pattern: int) -> None:
        self.sim.write(volume_id, f"pattern {pattern}")

    async def holds(self, volume_id: str, pattern: int) -> bool:
        return self.sim.read(volume_id) == f"pattern {pattern}"

    async def copy_holds(self, path: Path, pattern: int) -> bool:
        return await exported_content(path) == f"pattern {pattern}"

    @contextlib.asynccontextmanager
    async def hold_open(self, volume_id: str) -> AsyncIterator[None]:
        await self.other.note_open([volume_id], True)
        try:
            yield
        finally:
            await self.other.note_open([volume_id], False)


class LocalHarness(Harness):
    kind = "local"

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.storage = tmp / "disks"
        self.mounts: list[Path] = []
        self.add_dir("d0", 20 * 1024)
        shared = tmp / "shared"
        _mount_tmpfs(shared, 20 * 1024)
        self.mounts.append(shared)
        self.images = tmp / "images"
        self.local = LocalDiskBackend(str(self.storage / "*"), image_cache_dir=self.images,
                                      shared_storage=shared, node="node-a", owner=None)
        self.other = LocalDiskBackend(tmp / "b", shared_storage=shared, node="node-b",
                                      owner=None)
        self.backend, self.peer = self.local, self.other

    async def cache_image(self) -> DiskSpec:
        # What ensure_image leaves after a verified download (the download itself is
        # tested against a real storage server in test_local_disks.py).
        image_id = str(uuid.uuid4())
        spec = None
        for shared in (False, True):
            path = self.local.image_path(image_id, "qcow2", shared=shared)
            await _run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), "1G"])
            await _run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x11 0 64k", str(path)])
            sha = hashlib.sha256(path.read_bytes()).hexdigest()
            path.with_name(path.name + ".sha256").write_text(sha + "\n")
            spec = DiskSpec(disk_id="root", size_gb=1, image_id=image_id, image_sha256=sha,
                            image_format="qcow2")
        assert spec is not None
        return spec.model_copy(update={"image_sha256": None})

    def add_dir(self, name: str, size_mb: int) -> str:
        path = self.storage / name
        _mount_tmpfs(path, size_mb)
        self.mounts.append(path)
        return str(path)

    def fill(self, path: str, nbytes: int) -> None:
        filler = Path(path) / "filler"
        if nbytes == 0:
            filler.unlink(missing_ok=True)
            return
        with filler.open("wb") as f:
            f.write(b"\0" * nbytes)

    async def _path(self, volume_id: str) -> str:
        return (await self.local.volume_info(volume_id)).path

    async def write(self, volume_id: str, pattern: int) -> None:
        await asyncio.to_thread(subprocess.run, [
            "qemu-io", "-f", "qcow2", "-c", f"write -P {pattern} 0 64k",
            await self._path(volume_id)], check=True, capture_output=True)

    async def holds(self, volume_id: str, pattern: int) -> bool:
        done = await asyncio.to_thread(subprocess.run, [
            "qemu-io", "-f", "qcow2", "-c", f"read -P {pattern} 0 64k",
            await self._path(volume_id)], capture_output=True, text=True)
        return done.returncode == 0 and "Pattern verification failed" not in done.stdout

    async def copy_holds(self, path: Path, pattern: int) -> bool:
        done = await asyncio.to_thread(subprocess.run, [
            "qemu-io", "-f", "qcow2", "-c", f"read -P {pattern} 0 64k", str(path)],
            capture_output=True, text=True)
        return done.returncode == 0 and "Pattern verification failed" not in done.stdout

    @contextlib.asynccontextmanager
    async def hold_open(self, volume_id: str) -> AsyncIterator[None]:
        # A real QEMU, paused before the guest runs (no OS needed), with the volume as
        # its drive: it holds QEMU's image lock as a running domain on another node does.
        path = await self._path(volume_id)
        proc = await asyncio.create_subprocess_exec(
            "qemu-system-x86_64", "-S", "-nographic", "-nodefaults", "-accel", "tcg",
            "-m", "64", "-monitor", "none", "-serial", "none",
            "-drive", f"file={path},format=qcow2,if=virtio",
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
        try:
            for _ in range(300):  # until QEMU has opened the file (at most 30 s)
                probe = await asyncio.to_thread(subprocess.run, [
                    "qemu-img", "info", path], capture_output=True, text=True)
                if "lock" in probe.stderr:
                    break
                assert proc.returncode is None, await proc.stderr.read()  # type: ignore[union-attr]
                await asyncio.sleep(0.1)
            else:
                raise AssertionError("QEMU never locked the volume")
            yield
        finally:
            proc.terminate()
            await proc.wait()

    async def cleanup(self) -> None:
        await self.local.aclose()
        await self.other.aclose()
        for path in reversed(self.mounts):
            await asyncio.to_thread(subprocess.run, ["umount", "-l", str(path)], check=False)


def _local_possible() -> str | None:
    if os.geteuid() != 0:
        return "needs root to mount tmpfs storage directories"
    for tool in ("qemu-img", "qemu-io", "qemu-system-x86_64"):
        if shutil.which(tool) is None:
            return f"needs {tool}"
    return None


@pytest.fixture(params=["sim", "local"])
async def h(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Harness]:
    if request.param == "sim":
        yield SimHarness(tmp_path)
        return
    reason = _local_possible()
    if reason is not None:
        pytest.skip(reason)
    harness = LocalHarness(tmp_path)
    try:
        yield harness
    finally:
        await harness.cleanup()


def vol(size_gb: int = 1, **kw: object) -> DiskSpec:
    return DiskSpec(disk_id=str(kw.pop("disk_id", "data")), size_gb=size_gb,
                    volume_id=str(uuid.uuid4()), **kw)  # type: ignore[arg-type]


@pytest.fixture
def caplog_storage(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    caplog.set_level(logging.INFO, logger="yun.node.storage")
    yield caplog


# -- volumes -------------------------------------------------------------------------------


async def test_a_blank_volume_is_made_once_listed_and_deleted(h: Harness) -> None:
    spec = vol(2)
    first = await h.backend.ensure_volume(spec)
    again = await h.backend.ensure_volume(spec)  # idempotent: the same volume
    assert first == again
    assert (first.disk_id, first.format, first.device, first.shared) == (
        "data", "qcow2", "disk", False)
    assert first.path is not None and first.path.name == f"{spec.volume_id}.qcow2"
    assert first.path.parent.name == "volumes"
    info = await h.backend.volume_info(str(spec.volume_id))
    assert (info.size_gb, info.thin, info.backing_image_id, info.snapshots) == (2, True, None, [])
    assert info.directory == str(h.storage / "d0")
    assert await h.backend.volume_ids() == [spec.volume_id]

    await h.backend.delete_volume(str(spec.volume_id))
    await h.backend.delete_volume(str(spec.volume_id))  # already gone: no error
    assert await h.backend.volume_ids() == []
    with pytest.raises(VolumeNotFound, match=str(spec.volume_id)):
        await h.backend.volume_info(str(spec.volume_id))


async def test_a_missing_volume_not_to_be_created_is_not_found(h: Harness) -> None:
    spec = vol(create=False)
    with pytest.raises(VolumeNotFound, match="not made blank"):
        await h.backend.ensure_volume(spec)
    assert await h.backend.volume_ids() == []


async def test_thin_takes_almost_nothing_and_thick_its_whole_size(h: Harness) -> None:
    thin, thick = vol(10), vol(1, thin=False)
    await h.backend.ensure_volume(thin)
    await h.backend.ensure_volume(thick)
    thin_info = await h.backend.volume_info(str(thin.volume_id))
    thick_info = await h.backend.volume_info(str(thick.volume_id))
    assert thin_info.thin and thin_info.size_gb == 10
    assert thin_info.allocated_bytes < MIB
    assert not thick_info.thin and thick_info.allocated_bytes >= GIB
    report = {d.path: d for d in await h.backend.storage_report()}
    d0 = report[str(h.storage / "d0")]
    assert d0.volumes == 2 and d0.allocated_bytes >= GIB
    assert d0.allocated_bytes < GIB + 4 * MIB


async def test_an_overlay_of_a_cached_image_grows_to_its_size(h: Harness) -> None:
    image = await h.cache_image()
    spec = image.model_copy(update={"volume_id": str(uuid.uuid4()), "size_gb": 3})
    disk = await h.backend.ensure_volume(spec)
    info = await h.backend.volume_info(str(spec.volume_id))
    assert (info.size_gb, info.backing_image_id) == (3, image.image_id)
    assert info.allocated_bytes < MIB  # an overlay: the image's data stays in the base
    assert disk.path is not None
    # A second volume of the same image is another overlay of the same cached file.
    other = image.model_copy(update={"volume_id": str(uuid.uuid4())})
    await h.backend.ensure_volume(other)
    assert (await h.backend.volume_info(str(other.volume_id))).size_gb == 1


async def test_a_full_copy_of_a_cached_image_has_no_base(h: Harness) -> None:
    image = await h.cache_image()
    spec = image.model_copy(update={"volume_id": str(uuid.uuid4()), "size_gb": 2,
                                    "backing": False})
    await h.backend.ensure_volume(spec)
    info = await h.backend.volume_info(str(spec.volume_id))
    assert (info.size_gb, info.backing_image_id) == (2, None)
    await h.write(str(spec.volume_id), 7)
    assert await h.holds(str(spec.volume_id), 7)


async def test_an_iso_or_an_uncached_image_is_never_a_disk(h: Harness) -> None:
    iso = vol(image_id=str(uuid.uuid4()), image_format="iso")
    with pytest.raises(DiskError, match="is an ISO, which is never a disk"):
        await h.backend.ensure_volume(iso)
    uncached = vol(image_id=str(uuid.uuid4()), image_format="qcow2")
    with pytest.raises(DiskError, match=r"not cached on this node.*ensure_image first"):
        await h.backend.ensure_volume(uncached)
    assert await h.backend.volume_ids() == []


async def test_bad_ids_are_refused_before_anything_is_made(h: Harness) -> None:
    with pytest.raises(DiskError, match="volume id"):
        await h.backend.ensure_volume(DiskSpec(disk_id="d", size_gb=1, volume_id="../etc"))
    with pytest.raises(DiskError, match="no volume id"):
        await h.backend.ensure_volume(DiskSpec(disk_id="d", size_gb=1))
    with pytest.raises(DiskError, match="invalid disk id"):
        await h.backend.ensure_volume(vol(disk_id="../x"))
    with pytest.raises(DiskError, match="volume id"):
        await h.backend.delete_volume("not-a-uuid")
    with pytest.raises(DiskError, match="VM uuid"):
        await h.backend.delete_vm_files("..")
    assert await h.backend.volume_ids() == []


async def test_resize_grows_and_never_shrinks(h: Harness) -> None:
    spec = vol(1)
    await h.backend.ensure_volume(spec)
    vid = str(spec.volume_id)
    assert (await h.backend.resize_volume(vid, 4)).size_gb == 4
    assert (await h.backend.volume_info(vid)).size_gb == 4
    with pytest.raises(DiskError, match="cannot shrink from 4 GiB to 2 GiB"):
        await h.backend.resize_volume(vid, 2)
    with pytest.raises(VolumeNotFound):
        await h.backend.resize_volume(str(uuid.uuid4()), 5)


async def test_a_snapshot_reverts_the_content(h: Harness) -> None:
    spec = vol(1)
    await h.backend.ensure_volume(spec)
    vid = str(spec.volume_id)
    await h.write(vid, 0x41)
    info = await h.backend.create_snapshot(vid, "before")
    await h.backend.create_snapshot(vid, "before")  # idempotent
    assert [s.name for s in info.snapshots] == ["before"]
    await h.write(vid, 0x42)
    assert await h.holds(vid, 0x42)
    await h.backend.revert_snapshot(vid, "before")
    assert await h.holds(vid, 0x41) and not await h.holds(vid, 0x42)
    with pytest.raises(DiskError, match="has no snapshot 'nope'"):
        await h.backend.revert_snapshot(vid, "nope")
    with pytest.raises(DiskError, match="invalid snapshot name"):
        await h.backend.create_snapshot(vid, "a b/c")
    assert (await h.backend.delete_snapshot(vid, "before")).snapshots == []
    await h.backend.delete_snapshot(vid, "before")  # already gone: no error


async def test_an_export_is_a_flattened_qcow2_copy_removed_after_its_upload(
        h: Harness) -> None:
    """F-IMAGE: a volume (an overlay of a cached image) copied into a new image: what
    the upload is handed is a standalone qcow2 holding the volume's content; the copy
    is gone afterwards, also when the upload fails."""
    image = await h.cache_image()
    spec = image.model_copy(update={"volume_id": str(uuid.uuid4())})
    await h.backend.ensure_volume(spec)
    vid = str(spec.volume_id)
    await h.write(vid, 0x5A)
    new_image = str(uuid.uuid4())
    seen: list[Path] = []

    async def upload(path: Path) -> StorageImageReport:
        seen.append(path)
        done = await asyncio.to_thread(subprocess.run, [
            "qemu-img", "info", "--output=json", str(path)],
            capture_output=True, text=True, check=True)
        info = json.loads(done.stdout)
        assert info["format"] == "qcow2" and "backing-filename" not in info, info
        assert await h.copy_holds(path, 0x5A)
        data = await asyncio.to_thread(path.read_bytes)
        return StorageImageReport(image_id=new_image, size=len(data),
                                  sha256=hashlib.sha256(data).hexdigest(), format="qcow2",
                                  virtual_size=info["virtual-size"])

    report = await h.backend.export_volume(vid, new_image, upload)
    assert report.image_id == new_image and len(seen) == 1
    assert not seen[0].exists()
    assert await h.holds(vid, 0x5A)  # the volume itself is untouched

    async def broken(path: Path) -> StorageImageReport:
        seen.append(path)
        raise ConnectionError("storage server gone")

    with pytest.raises(ConnectionError):
        await h.backend.export_volume(vid, str(uuid.uuid4()), broken)
    assert not seen[-1].exists()
    with pytest.raises(VolumeNotFound):
        await h.backend.export_volume(str(uuid.uuid4()), new_image, upload)
    with pytest.raises(DiskError, match="image id"):
        await h.backend.export_volume(vid, "../x", upload)
    assert await h.backend.volume_ids() == [vid]  # no copy taken for a volume


async def test_a_live_export_takes_the_hypervisor_copy(h: Harness) -> None:
    """The volume open by a running domain: its copy is the hypervisor's (``live``),
    written where the backend says, uploaded and removed (the sim volume has no file
    for a driver to copy: the sim twin writes its own and records the live export)."""
    spec = vol(1)
    await h.backend.ensure_volume(spec)
    vid = str(spec.volume_id)
    await h.write(vid, 0x33)
    targets: list[Path] = []

    async def live(target: Path) -> None:
        targets.append(target)
        source = (await h.backend.volume_info(vid)).path
        await _run(["qemu-img", "convert", "-f", "qcow2", "-O", "qcow2", source,
                    str(target)])

    async def upload(path: Path) -> StorageImageReport:
        assert await h.copy_holds(path, 0x33)
        return StorageImageReport(image_id=image_id, size=1, sha256="0" * 64,
                                  format="qcow2", virtual_size=GIB)

    image_id = str(uuid.uuid4())
    await h.backend.export_volume(vid, image_id, upload, live=live)
    if isinstance(h.backend, SimDiskBackend):
        assert h.backend.exports == [(vid, True)] and targets == []
    else:
        [target] = targets
        assert target.parent == Path((await h.backend.volume_info(vid)).path).parent
        assert not target.exists()


# -- directories ----------------------------------------------------------------------------


async def test_new_volumes_go_where_most_space_is_free_and_new_dirs_count_at_once(
        h: Harness) -> None:
    # d0 (20 GiB) is there; two more disks of 2 and 30 GiB are mounted.
    h.add_dir("small", 2 * 1024)
    big = h.add_dir("big", 30 * 1024)
    first = vol(1)
    await h.backend.ensure_volume(first)
    assert (await h.backend.volume_info(str(first.volume_id))).directory == big
    # A disk mounted under the storage glob while the node runs is used at once.
    bigger = h.add_dir("bigger", 40 * 1024)
    second = vol(1)
    await h.backend.ensure_volume(second)
    assert (await h.backend.volume_info(str(second.volume_id))).directory == bigger
    listed = {d.path for d in await h.backend.storage_report() if not d.shared}
    assert listed == {str(h.storage / n) for n in ("d0", "small", "big", "bigger")}
    # Larger than the free space of every directory: refused, naming the best one.
    with pytest.raises(NoSpace, match=r"50\.0 GiB do not fit.*the most free is .* in "
                                      + str(bigger)):
        await h.backend.ensure_volume(vol(50))


async def test_the_alarm_fires_past_the_threshold_and_clears(
        h: Harness, caplog_storage: pytest.LogCaptureFixture) -> None:
    small = h.add_dir("small", 16)
    assert not {d.path: d for d in await h.backend.storage_report()}[small].over_threshold
    h.fill(small, 15 * MIB)
    report = {d.path: d for d in await h.backend.storage_report()}
    assert report[small].over_threshold and report[small].used_bytes >= 15 * MIB
    warnings = [r for r in caplog_storage.records if r.levelno == logging.WARNING
                and getattr(r, "directory", None) == small]
    assert len(warnings) == 1 and warnings[0].node == "node-a"  # type: ignore[attr-defined]
    await h.backend.storage_report()  # still over: no second warning
    assert len([r for r in caplog_storage.records if r.levelno == logging.WARNING]) == 1
    h.fill(small, 0)
    assert not {d.path: d for d in await h.backend.storage_report()}[small].over_threshold
    assert any("back under" in r.getMessage() and getattr(r, "directory", None) == small
               for r in caplog_storage.records)


# -- shared mode ----------------------------------------------------------------------------


async def test_a_shared_volume_is_seen_by_every_node_and_locked_while_open(
        h: Harness) -> None:
    image = await h.cache_image()
    spec = image.model_copy(update={"volume_id": str(uuid.uuid4()), "storage": "shared"})
    vid = str(spec.volume_id)
    disk = await h.backend.ensure_volume(spec)
    assert disk.shared and disk.path is not None and "shared" in disk.path.parts
    info = await h.backend.volume_info(vid)
    assert info.backing_image_id == image.image_id
    # The other node sees it on the mount and may open it: nobody else has it.
    assert vid in await h.peer.volume_ids()
    again = await h.peer.ensure_volume(spec.model_copy(update={"create": False}))
    assert again.path == disk.path and again.shared
    await h.backend.check_free(vid)

    async with h.hold_open(vid):
        with pytest.raises(VolumeInUse, match=f"volume {vid} .*open"):
            await h.backend.check_free(vid)
        with pytest.raises(VolumeInUse):
            await h.backend.create_snapshot(vid, "s")
    # The other node's domain is gone: this node may open it now.
    await h.backend.check_free(vid)
    shared_dirs = [d for d in await h.backend.storage_report() if d.shared]
    assert len(shared_dirs) == 1 and shared_dirs[0].volumes == 1


async def test_a_local_volume_needs_no_lock_probe(h: Harness) -> None:
    spec = vol(1)
    disk = await h.backend.ensure_volume(spec)
    assert not disk.shared
    await h.backend.check_free(str(spec.volume_id))


# -- per VM ---------------------------------------------------------------------------------


async def test_seed_and_attachments_name_the_vm_until_its_files_go(h: Harness) -> None:
    vm = str(uuid.uuid4())
    spec = CloudInitSpec(instance_id=vm, hostname="web1", ssh_keys=["ssh-ed25519 AAAA x"])
    seed = await h.backend.ensure_seed(vm, spec)
    assert (seed.disk_id, seed.device, seed.read_only, seed.format) == (
        "cidata", "cdrom", True, "raw")
    assert seed.bus != "virtio" and seed.path is not None and seed.path.name == "cidata.iso"
    assert await h.backend.ensure_seed(vm, spec) == seed  # unchanged: same seed
    data = vol(1)
    await h.backend.ensure_volume(data)
    await h.backend.set_attachments(vm, {"data": str(data.volume_id)})
    assert (await h.backend.vm_disk_ids())[vm] == ["cidata", "data"]
    assert (await h.backend.attachments())[vm] == {"data": data.volume_id}

    await h.backend.set_attachments(vm, {})
    await h.backend.delete_vm_files(vm)
    await h.backend.delete_vm_files(vm)  # already gone: no error
    assert vm not in await h.backend.vm_disk_ids()
    assert vm not in await h.backend.attachments()
    # The volume outlives its VM.
    assert await h.backend.volume_ids() == [data.volume_id]


async def test_capacity_sums_the_directories(h: Harness) -> None:
    total, used = await h.backend.capacity_gb()
    # d0 (20 GiB) and the shared mount (20 GiB).
    assert total == 40 and used >= 0
