"""The simulated disk backend: the local backend's contract, in memory."""

from __future__ import annotations

import time
import uuid
from typing import Any

import pytest

from yun.node.storage.base import DiskError
from yun.node.storage.sim import SimDiskBackend
from yun.proto.messages import DiskSpec, ImageLocation


def location(**update: Any) -> ImageLocation:
    return ImageLocation(
        image_id=str(uuid.uuid4()), url="http://storage:7730/internal/v1/images/x/data",
        sha256="ab" * 32, size=1 << 20, format="qcow2",
    ).model_copy(update=update)


def vol(size_gb: int = 1, **kw: Any) -> DiskSpec:
    return DiskSpec(disk_id=kw.pop("disk_id", "root"), size_gb=size_gb,
                    volume_id=str(uuid.uuid4()), **kw)


async def test_image_then_overlay_then_delete() -> None:
    sim = SimDiskBackend(total_gb=100)
    loc = location()
    await sim.ensure_image(loc, None)
    await sim.ensure_image(loc, None)
    assert sim.downloads == 1

    spec = vol(10, image_id=loc.image_id, image_sha256=loc.sha256, image_format="qcow2")
    disk = await sim.ensure_volume(spec)
    assert (disk.disk_id, disk.format) == ("root", "qcow2")
    assert disk.path is not None and disk.path.name == f"{spec.volume_id}.qcow2"
    assert await sim.ensure_volume(spec) == disk  # idempotent
    thick = vol(5, disk_id="data", thin=False)
    await sim.ensure_volume(thick)
    assert await sim.volume_ids() == sorted([str(spec.volume_id), str(thick.volume_id)])
    # Thin counts what it takes (a qcow2 header), thick its whole size.
    assert await sim.capacity_gb() == (100, 5)

    await sim.delete_volume(str(thick.volume_id))
    await sim.delete_volume(str(thick.volume_id))
    assert await sim.volume_ids() == [spec.volume_id]
    assert await sim.capacity_gb() == (100, 0)


async def test_same_validation_as_the_local_backend() -> None:
    sim = SimDiskBackend()
    for bad in (location(image_id="../etc"), location(format="dmg"), location(sha256="nope"),
                location(size=0), location(url="file:///etc/passwd")):
        with pytest.raises(DiskError):
            await sim.ensure_image(bad, None)
    with pytest.raises(DiskError, match="not cached on this node"):
        await sim.ensure_volume(vol(image_id=str(uuid.uuid4()), image_format="qcow2"))
    with pytest.raises(DiskError, match="invalid disk id"):
        await sim.ensure_volume(vol(disk_id="a/b"))
    with pytest.raises(DiskError, match="invalid volume id"):
        await sim.ensure_volume(DiskSpec(disk_id="root", size_gb=1, volume_id="vm-1"))

    loc = location()
    await sim.ensure_image(loc, None)
    with pytest.raises(DiskError, match="has sha256"):
        await sim.ensure_image(loc.model_copy(update={"sha256": "cd" * 32}), None)
    with pytest.raises(DiskError, match="has sha256"):
        await sim.ensure_volume(vol(image_id=loc.image_id, image_sha256="cd" * 32,
                                    image_format="qcow2"))


async def test_fail_next_injects_one_failure_per_call() -> None:
    sim = SimDiskBackend()
    spec = vol()
    sim.fail_next("ensure_volume")
    sim.fail_next("ensure_volume", OSError("disk full"))
    with pytest.raises(DiskError, match="injected failure of ensure_volume"):
        await sim.ensure_volume(spec)
    with pytest.raises(OSError, match="disk full"):
        await sim.ensure_volume(spec)
    await sim.ensure_volume(spec)
    assert await sim.volume_ids() == [spec.volume_id]

    sim.fail_next("ensure_image")
    with pytest.raises(DiskError):
        await sim.ensure_image(location(), None)
    assert sim.downloads == 0
    with pytest.raises(ValueError, match="unknown operation"):
        sim.fail_next("format_everything")


async def test_the_image_cache_is_bounded_and_keeps_images_in_use() -> None:
    sim = SimDiskBackend(image_cache_gb=2.5 / 1024)  # room for two 1 MiB images
    a, b, c = location(), location(), location()
    await sim.ensure_image(a, None)
    await sim.ensure_volume(vol(image_id=a.image_id, image_format="qcow2"))
    await sim.ensure_image(b, None)
    await sim.ensure_image(c, None)
    # b was the least recently used image no volume is based on; a is pinned.
    assert set(sim.images) == {a.image_id, c.image_id}


async def test_a_thousand_nodes_in_one_process() -> None:
    started = time.monotonic()
    nodes = [SimDiskBackend() for _ in range(1000)]
    loc = location()
    for node in nodes:
        await node.ensure_image(loc, None)
        await node.ensure_volume(vol(20, image_id=loc.image_id, image_format="qcow2",
                                     thin=False))
    assert [(await n.capacity_gb())[1] for n in nodes] == [20] * 1000
    assert time.monotonic() - started < 5
