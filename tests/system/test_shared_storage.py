"""Shared storage (F-STO-SHARED) on two real node hosts: one VM disk on a directory both
hosts have, run by one host at a time.

Two node hosts (each its own namespace and libvirtd) have the same shared directory, as
the nodes of a shared pool have their NFS or CephFS mount. A storage server in shared
mode (its real image store) publishes the test guest there; each host's real disk
backend takes the image in place, and the VM's root volume is an overlay on it on the
shared directory. While host 1 runs the VM, host 2's backend refuses the volume (QEMU's
own image lock, probed) and a QEMU started on host 2 regardless cannot open it; once
host 1's VM is stopped, host 2 boots the same disk (its boot counter, kept on that disk,
says so). Everything (domains, files, libvirtds, namespaces) is removed afterwards, also
when the test fails.
"""

from __future__ import annotations

import shutil
import tempfile
import time
import uuid as uuidlib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from tests.system.conftest import need_root
from tests.system.test_libvirt_driver import force_remove, wait_console
from yun.node.hypervisor.base import HypervisorError, ResolvedDisk
from yun.node.storage.base import VolumeInUse
from yun.node.storage.local import LocalDiskBackend
from yun.proto.messages import DiskSpec, DomainSpec, ImageLocation
from yun.storage.store import ImageStore
from yun.testing.guest import READY_MARKER, ensure_guest_image
from yun.testing.netns import Topology
from yun.testing.nodehost import NodeHost

pytestmark = pytest.mark.system


@pytest.fixture(scope="module")
def hosts() -> Iterator[tuple[NodeHost, NodeHost]]:
    need_root("libvirtd", "virtlogd", "qemu-system-x86_64", "qemu-img")
    with Topology() as topo:
        one, two = topo.add_host("node1"), topo.add_host("node2")
        with NodeHost(one.ns.name, name="shared-1") as n1, \
                NodeHost(two.ns.name, name="shared-2") as n2:
            yield n1, n2


@pytest.fixture
def mount() -> Iterator[Path]:
    """The "shared mount": a directory outside the hosts' private mounts."""
    path = Path(tempfile.mkdtemp(prefix="yun-shared-", dir="/var/tmp"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


async def chunks(path: Path) -> AsyncIterator[bytes]:
    with path.open("rb") as f:
        while data := f.read(1 << 20):
            yield data


def domain_disks(root: ResolvedDisk) -> list[ResolvedDisk]:
    return [root, ResolvedDisk("cdrom", None, "raw", device="cdrom", read_only=True)]


async def test_a_shared_volume_runs_on_one_node_at_a_time(
        hosts: tuple[NodeHost, NodeHost], mount: Path) -> None:
    n1, n2 = hosts
    image = ensure_guest_image()
    store = ImageStore(mount / "storage-server", publish_dir=mount / "images")
    image_id, vm, volume_id = (str(uuidlib.uuid4()) for _ in range(3))
    stored = (await store.put(image_id, chunks(image), name="guest")).record
    assert stored is not None
    where = ImageLocation(image_id=image_id, url="https://192.0.2.1:9/unused",
                          sha256=stored.sha256, size=stored.size, format=stored.format)
    backends = [LocalDiskBackend(n.disk_dir / "local", shared_storage=mount,
                                 node=n.name) for n in (n1, n2)]
    spec = DiskSpec(disk_id="root", size_gb=1, image_id=image_id, image_sha256=stored.sha256,
                    image_format=stored.format, volume_id=volume_id, storage="shared")
    domain = DomainSpec(uuid=vm, name="shared", vcpus=1, memory_mb=192)
    try:
        async with n1.libvirt_driver() as d1, n2.libvirt_driver() as d2:
            # Host 1: the image is taken where the storage server put it (no fetch: the
            # URL above leads nowhere), the volume made on the mount, the VM booted.
            base = await backends[0].ensure_image(where, None, shared=True)
            assert base == mount / "images" / f"{image_id}.qcow2"
            disk = await backends[0].ensure_volume(spec)
            assert disk.shared and disk.path == mount / "volumes" / f"{volume_id}.qcow2"
            await backends[0].check_free(volume_id)
            await d1.ensure_defined(domain, domain_disks(disk), [])
            await d1.start(vm)
            await wait_console(d1, vm, READY_MARKER)

            # Host 2 sees the same volume and is refused it while host 1 runs it.
            assert await backends[1].ensure_image(where, None, shared=True) == base
            again = await backends[1].ensure_volume(spec.model_copy(update={"create": False}))
            assert again.path == disk.path
            with pytest.raises(VolumeInUse, match="open by a QEMU process"):
                await backends[1].check_free(volume_id)
            # A QEMU started on host 2 all the same cannot open it (the lock itself).
            await d2.ensure_defined(domain, domain_disks(again), [])
            with pytest.raises(HypervisorError, match='Failed to get "write" lock'):
                await d2.start(vm)

            # Host 1 stops the VM: host 2 may open the volume and boots the same disk.
            await d1.destroy(vm)
            await d1.undefine(vm)
            started = time.monotonic()
            await backends[1].check_free(volume_id)
            await d2.start(vm)
            await wait_console(d2, vm, READY_MARKER)
            print(f"\nthe shared disk booted on host 2 in {time.monotonic() - started:.0f} s")
            assert "boots=2" in await d2.console_log(vm, 1 << 20), \
                "the boot counter on the shared disk says it booted once before"
            with pytest.raises(VolumeInUse):
                await backends[0].check_free(volume_id)
            await d2.destroy(vm)
            await d2.undefine(vm)
    finally:
        for host in (n1, n2):
            force_remove(host, vm)
        for backend in backends:
            await backend.aclose()
