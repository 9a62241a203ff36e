"""One contract, both disk backends: the sim backend and the local backend (qcow2 files
made by qemu-img in a temporary directory) answer the same calls the same way, so a
flow tested on sim nodes behaves alike on real ones. Image downloads are covered by
tests/unit/test_local_disks.py; the network twins need root networking (bridges,
dnsmasq) and are held to their contract by the system tests.
"""

from __future__ import annotations

import uuid as uuidlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from yun.node.storage.base import DiskBackend, DiskError
from yun.node.storage.local import LocalDiskBackend
from yun.node.storage.sim import SimDiskBackend
from yun.proto.messages import DiskSpec, ImageLocation


@pytest.fixture(params=["sim", "local"])
async def disks(request: pytest.FixtureRequest, tmp_path: Path
                ) -> AsyncIterator[DiskBackend]:
    if request.param == "sim":
        yield SimDiskBackend(tmp_path, total_gb=100)
        return
    backend = LocalDiskBackend(tmp_path / "disks", owner=None)
    try:
        yield backend
    finally:
        await backend.aclose()


def blank(disk_id: str = "root", size_gb: int = 1) -> DiskSpec:
    return DiskSpec(disk_id=disk_id, size_gb=size_gb)


async def test_blank_volume_is_made_once_and_listed(disks: DiskBackend) -> None:
    vm = str(uuidlib.uuid4())
    first = await disks.ensure_disk(vm, blank())
    again = await disks.ensure_disk(vm, blank())  # idempotent: the same volume
    assert first == again
    assert (first.disk_id, first.format, first.bus) == ("root", "qcow2", "virtio")
    assert vm in first.path.parts and first.path.name == "root.qcow2"
    await disks.ensure_disk(vm, blank("data", 2))
    assert (await disks.vm_disk_ids())[vm] == ["data", "root"]


async def test_delete_removes_every_volume_and_absent_is_fine(disks: DiskBackend) -> None:
    keep, drop = str(uuidlib.uuid4()), str(uuidlib.uuid4())
    await disks.ensure_disk(keep, blank())
    await disks.ensure_disk(drop, blank())
    await disks.delete_disks(drop)
    await disks.delete_disks(drop)  # already gone: no error
    held = await disks.vm_disk_ids()
    assert drop not in held and held[keep] == ["root"]


async def test_bad_names_are_refused_before_anything_is_made(disks: DiskBackend) -> None:
    vm = str(uuidlib.uuid4())
    with pytest.raises(DiskError, match="VM uuid"):
        await disks.ensure_disk("../etc", blank())
    with pytest.raises(DiskError, match="invalid disk id"):
        await disks.ensure_disk(vm, blank("../x"))
    with pytest.raises(DiskError, match="VM uuid"):
        await disks.delete_disks("not-a-uuid")
    assert vm not in await disks.vm_disk_ids()


async def test_a_disk_of_an_uncached_image_is_refused(disks: DiskBackend) -> None:
    vm, image = str(uuidlib.uuid4()), str(uuidlib.uuid4())
    spec = DiskSpec(disk_id="root", size_gb=1, image_id=image, image_sha256="0" * 64,
                    image_format="qcow2")
    with pytest.raises(DiskError, match=rf"image {image} is not cached.*ensure_image first"):
        await disks.ensure_disk(vm, spec)
    assert vm not in await disks.vm_disk_ids()


@pytest.mark.parametrize(("field", "value", "message"), [
    ("format", "exe", "unsupported format"),
    ("sha256", "nope", "invalid sha256"),
    ("size", 0, "invalid size"),
    ("url", "file:///etc/shadow", "non-HTTP url"),
])
async def test_a_bad_image_location_is_refused(disks: DiskBackend, field: str,
                                               value: object, message: str) -> None:
    location = {"image_id": str(uuidlib.uuid4()), "url": "http://127.0.0.1:9/x",
                "sha256": "a" * 64, "size": 1024, "format": "qcow2", field: value}
    with pytest.raises(DiskError, match=message):
        await disks.ensure_image(ImageLocation(**location), None)  # type: ignore[arg-type]


async def test_capacity_is_total_and_used_gib(disks: DiskBackend) -> None:
    total, used = await disks.capacity_gb()
    assert total > 0 and used >= 0
