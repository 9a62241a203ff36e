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


async def test_image_then_overlay_then_delete() -> None:
    sim = SimDiskBackend(total_gb=100)
    loc = location()
    await sim.ensure_image(loc, None)
    await sim.ensure_image(loc, None)
    assert sim.downloads == 1

    vm = str(uuid.uuid4())
    spec = DiskSpec(disk_id="root", size_gb=10, image_id=loc.image_id, image_sha256=loc.sha256,
                    image_format="qcow2")
    disk = await sim.ensure_disk(vm, spec)
    assert (disk.disk_id, disk.format) == ("root", "qcow2")
    assert disk.path.name == "root.qcow2" and vm in str(disk.path)
    assert await sim.ensure_disk(vm, spec) == disk  # idempotent
    await sim.ensure_disk(vm, DiskSpec(disk_id="data", size_gb=5))
    assert await sim.vm_disk_ids() == {vm: ["data", "root"]}
    assert await sim.capacity_gb() == (100, 15)

    await sim.delete_disks(vm)
    await sim.delete_disks(vm)
    assert await sim.vm_disk_ids() == {}
    assert await sim.capacity_gb() == (100, 0)


async def test_same_validation_as_the_local_backend() -> None:
    sim = SimDiskBackend()
    for bad in (location(image_id="../etc"), location(format="dmg"), location(sha256="nope"),
                location(size=0), location(url="file:///etc/passwd")):
        with pytest.raises(DiskError):
            await sim.ensure_image(bad, None)
    vm = str(uuid.uuid4())
    with pytest.raises(DiskError, match="not cached on this node"):
        await sim.ensure_disk(vm, DiskSpec(disk_id="root", size_gb=1, image_id=str(uuid.uuid4()),
                                           image_format="qcow2"))
    with pytest.raises(DiskError, match="invalid disk id"):
        await sim.ensure_disk(vm, DiskSpec(disk_id="a/b", size_gb=1))
    with pytest.raises(DiskError, match="invalid VM uuid"):
        await sim.ensure_disk("vm-1", DiskSpec(disk_id="root", size_gb=1))

    loc = location()
    await sim.ensure_image(loc, None)
    with pytest.raises(DiskError, match="has sha256"):
        await sim.ensure_image(loc.model_copy(update={"sha256": "cd" * 32}), None)
    with pytest.raises(DiskError, match="has sha256"):
        await sim.ensure_disk(vm, DiskSpec(disk_id="root", size_gb=1, image_id=loc.image_id,
                                           image_sha256="cd" * 32, image_format="qcow2"))


async def test_fail_next_injects_one_failure_per_call() -> None:
    sim = SimDiskBackend()
    vm = str(uuid.uuid4())
    sim.fail_next("ensure_disk")
    sim.fail_next("ensure_disk", OSError("disk full"))
    with pytest.raises(DiskError, match="injected failure of ensure_disk"):
        await sim.ensure_disk(vm, DiskSpec(disk_id="root", size_gb=1))
    with pytest.raises(OSError, match="disk full"):
        await sim.ensure_disk(vm, DiskSpec(disk_id="root", size_gb=1))
    await sim.ensure_disk(vm, DiskSpec(disk_id="root", size_gb=1))
    assert await sim.vm_disk_ids() == {vm: ["root"]}

    sim.fail_next("ensure_image")
    with pytest.raises(DiskError):
        await sim.ensure_image(location(), None)
    assert sim.downloads == 0
    with pytest.raises(ValueError, match="unknown operation"):
        sim.fail_next("format_everything")


async def test_a_thousand_nodes_in_one_process() -> None:
    started = time.monotonic()
    nodes = [SimDiskBackend() for _ in range(1000)]
    loc = location()
    for node in nodes:
        await node.ensure_image(loc, None)
        await node.ensure_disk(
            str(uuid.uuid4()),
            DiskSpec(disk_id="root", size_gb=20, image_id=loc.image_id, image_format="qcow2"),
        )
    assert [(await n.capacity_gb())[1] for n in nodes] == [20] * 1000
    assert time.monotonic() - started < 5
