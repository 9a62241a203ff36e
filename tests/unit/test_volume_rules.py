"""Pure rules of volumes and storage on the control server: when a node's storage
report is written, which alarms flip, volumes only grow, backing needs shared storage,
and the disk a volume is to its VM's domain."""

from __future__ import annotations

from typing import Any

import pytest

from yun.control.db.models import PoolRow, VolumeRow
from yun.control.flows.volumes import disk_spec
from yun.control.services.nodes import storage_changed, storage_dirs, threshold_flips
from yun.control.services.pools import check_storage, pool_warnings
from yun.control.services.volumes import check_grow
from yun.proto.errors import Unprocessable

GIB = 1 << 30


def d(path: str = "/a", used: int = 10 * GIB, over: bool = False, **more: Any
      ) -> dict[str, Any]:
    return {"path": path, "shared": False, "total_bytes": 100 * GIB, "used_bytes": used,
            "volumes": 0, "allocated_bytes": 0, "over_threshold": over, **more}


def test_storage_is_written_only_when_it_changed_enough() -> None:
    assert storage_changed(None, [d()])
    assert not storage_changed([d()], [d()])
    # Small moves of usage are not worth a write; a full percent of the size is.
    assert not storage_changed([d()], [d(used=10 * GIB + (100 << 20))])
    assert storage_changed([d()], [d(used=11 * GIB)])
    assert storage_changed([d()], [d(over=True)])
    assert storage_changed([d()], [d(volumes=1)])
    assert storage_changed([d()], [d(), d("/b")])
    assert storage_changed([d(), d("/b")], [d()])


def test_threshold_flips_raise_and_clear_once() -> None:
    assert threshold_flips([d()], [d()]) == []
    assert [(x["path"], over) for x, over in threshold_flips([d()], [d(over=True)])] == [
        ("/a", True)]
    assert [(x["path"], over) for x, over in threshold_flips([d(over=True)], [d()])] == [
        ("/a", False)]
    # A new directory over already raises; a new one under raises nothing.
    assert [x["path"] for x, _ in threshold_flips([d()], [d(), d("/b", over=True)])] == ["/b"]
    assert threshold_flips(None, [d()]) == []


def test_storage_dirs_show_the_percent_used() -> None:
    [shown] = storage_dirs([d(used=85 * GIB, over=True)])
    assert (shown.used_percent, shown.over_threshold) == (85.0, True)
    assert storage_dirs([{**d(), "total_bytes": 0, "used_bytes": 0}])[0].used_percent == 0.0


def test_volumes_only_grow() -> None:
    check_grow(2, 3, "d1")
    for wanted in (2, 1):
        with pytest.raises(Unprocessable, match="only grow"):
            check_grow(2, wanted, "d1")


def test_backing_needs_shared_storage_and_warns() -> None:
    check_storage("shared", True)
    check_storage("local", False)
    with pytest.raises(Unprocessable, match="storage_mode shared"):
        check_storage("local", True)
    pool = PoolRow(storage_mode="shared", backing=True, thin=True, memory_ratio=1.0, ha=False)
    [warning] = pool_warnings(pool)
    assert "IOPS" in warning and "breaks every VM" in warning
    pool.backing = False
    assert pool_warnings(pool) == []


def test_a_root_disk_is_made_and_a_data_disk_must_exist() -> None:
    root = VolumeRow(uuid="r", disk_id="root", kind="root", size_gb=5, thin=False,
                     storage_mode="shared")
    spec = disk_spec(root)
    assert (spec.volume_id, spec.create, spec.thin, spec.storage, spec.size_gb) == (
        "r", True, False, "shared", 5)
    data = VolumeRow(uuid="v", disk_id="vol-v", kind="data", size_gb=2, thin=True,
                     storage_mode="local")
    spec = disk_spec(data)
    assert (spec.disk_id, spec.create, spec.storage, spec.image_id) == (
        "vol-v", False, "local", None)


def test_a_shared_root_disk_overlays_the_base_only_in_a_backing_pool() -> None:
    """F-BACKING: overlays on one read-only base in a shared pool with backing images;
    a full copy in a shared pool without; an overlay on the node's cached image in
    local storage (the cache keeps an image while a volume stands on it)."""
    def root(mode: str) -> VolumeRow:
        return VolumeRow(uuid="r", disk_id="root", kind="root", size_gb=5, thin=True,
                         storage_mode=mode)

    def pool(mode: str, backing: bool) -> PoolRow:
        return PoolRow(storage_mode=mode, backing=backing, thin=True, memory_ratio=1.0,
                       ha=False)

    assert disk_spec(root("shared"), None, pool("shared", True)).backing is True
    assert disk_spec(root("shared"), None, pool("shared", False)).backing is False
    assert disk_spec(root("local"), None, pool("local", False)).backing is True
    assert disk_spec(root("local")).backing is True
