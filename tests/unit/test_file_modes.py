"""Tenants' data on disk is private: stored images, cached images and VM disks are 0600
in 0700 directories whatever the umask, and the node's are owned by QEMU's user."""

from __future__ import annotations

import asyncio
import os
import stat
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from sqlalchemy import text

from yun.control.db.session import Database
from yun.node.storage.local import LocalDiskBackend, qemu_owner
from yun.proto.messages import DiskSpec, legacy_volume_id
from yun.storage.store import ImageStore

NOBODY = (65534, 65534)
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="chown needs root")


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture(autouse=True)
def open_umask() -> Iterator[None]:
    """The most permissive umask: modes must not depend on the caller's."""
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


async def chunks(data: bytes) -> AsyncIterator[bytes]:
    yield data


def raw_image() -> bytes:
    return os.urandom(4096)


async def test_stored_images_are_private(tmp_path: Path) -> None:
    store = ImageStore(tmp_path / "storage")
    image_id = str(uuid.uuid4())
    await store.put(image_id, chunks(raw_image()), name="x", declared_format="raw")
    for directory in (store.root, store.images_dir, store.tmp_dir):
        assert mode(directory) == 0o700, directory
    files = list(store.images_dir.iterdir())
    assert {p.name for p in files} == {image_id, f"{image_id}.json"}
    assert all(mode(p) == 0o600 for p in files), {p.name: oct(mode(p)) for p in files}


async def test_a_store_left_world_readable_is_made_private(tmp_path: Path) -> None:
    store = ImageStore(tmp_path / "storage")
    image_id = str(uuid.uuid4())
    await store.put(image_id, chunks(raw_image()), name="x", declared_format="raw")
    for path in (store.root, store.images_dir):
        path.chmod(0o755)
    store.data_path(image_id).chmod(0o644)  # as an older version stored it
    reopened = ImageStore(tmp_path / "storage")
    assert mode(reopened.root) == 0o700 and mode(reopened.images_dir) == 0o700
    assert mode(reopened.data_path(image_id)) == 0o600
    assert reopened.get(image_id).sha256  # still readable by the server itself


@needs_root
async def test_node_disks_are_private_to_qemus_user(tmp_path: Path) -> None:
    backend = LocalDiskBackend(tmp_path / "node", owner=NOBODY)
    disk = await backend.ensure_volume(DiskSpec(disk_id="data", size_gb=1,
                                                volume_id=str(uuid.uuid4())))
    assert disk.path is not None
    for path in (backend.root, backend.images_dir, backend.vms_dir, disk.path.parent):
        assert mode(path) == 0o700, path
        assert (path.stat().st_uid, path.stat().st_gid) == NOBODY, path
    assert mode(disk.path) == 0o600
    assert (disk.path.stat().st_uid, disk.path.stat().st_gid) == NOBODY


@needs_root
def test_a_node_tree_left_world_readable_is_made_private(tmp_path: Path) -> None:
    backend = LocalDiskBackend(tmp_path / "node", owner=None)
    image_id = str(uuid.uuid4())
    cached = backend.image_path(image_id, "qcow2")
    cached.write_bytes(b"old")
    cached.chmod(0o644)
    vm = str(uuid.uuid4())
    vm_dir = backend.vms_dir / vm
    vm_dir.mkdir(mode=0o755)
    (vm_dir / "root.qcow2").write_bytes(b"old")
    (vm_dir / "root.qcow2").chmod(0o644)
    LocalDiskBackend(tmp_path / "node", owner=NOBODY)
    # The disk of the per-VM layout is adopted as a volume, private as well.
    adopted = backend.root / "volumes" / f"{legacy_volume_id(vm, 'root')}.qcow2"
    for path in (cached, adopted):
        assert mode(path) == 0o600 and path.stat().st_uid == NOBODY[0], path
    assert mode(vm_dir) == 0o700 and vm_dir.stat().st_uid == NOBODY[0]


@needs_root
def test_qemu_owner_follows_qemu_conf(tmp_path: Path) -> None:
    conf = tmp_path / "qemu.conf"
    conf.write_text('# user = "root"\nuser = "nobody"\ngroup = "+4242"\n')
    assert qemu_owner(conf) == (65534, 4242)
    conf.write_text('user = "no-such-user-here"\n')
    assert qemu_owner(conf) is None  # no chown to a user that does not exist


async def test_control_database_file_is_private(tmp_path: Path) -> None:
    """The SQLite database holds password hashes and API key secrets: 0600, also when an
    older version left it world-readable, and its WAL files follow."""
    old = tmp_path / "old.db"
    old.touch(mode=0o644)
    old.chmod(0o644)
    for path in (tmp_path / "new.db", old):
        db = Database(f"sqlite+aiosqlite:///{path}")
        try:
            await db.migrate()
            async with db.session() as session:  # a write makes the -wal and -shm files
                await session.execute(text("CREATE TABLE probe (x INTEGER)"))
        finally:
            await db.dispose()
        modes = await asyncio.to_thread(
            lambda p=path: {f.name: mode(f) for f in (p, *p.parent.glob(f"{p.name}-*"))})
        assert set(modes.values()) == {0o600}, modes
