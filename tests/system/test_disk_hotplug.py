"""Disk hot-plug, online resize, a CD changed by hand, a live disk copy and the cloud-init
seed, on a real
libvirtd + QEMU (TCG) guest driven through the libvirt driver directly (no control
server): what the driver does, the guest sees.

The test guest runs a root shell on its serial console: commands are typed there and
their output read back from the console log. Everything (domain, files, the node host's
libvirtd and namespace) is removed afterwards, also when the test fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import secrets
import shutil
import time
import uuid as uuidlib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import libvirt
import pytest

from tests.system.conftest import need_root
from tests.system.test_libvirt_driver import force_remove, overlay, wait_console
from yun.node.hypervisor.base import SEED_DISK_ID, ResolvedDisk
from yun.node.hypervisor.libvirt.driver import LibvirtDriver
from yun.node.storage.seed import write_seed
from yun.proto.messages import CloudInitSpec, DomainSpec
from yun.testing.guest import READY_MARKER
from yun.testing.netns import Topology
from yun.testing.nodehost import NodeHost
from yun.util.run import run

pytestmark = pytest.mark.system

MIB = 1024 * 1024


@pytest.fixture(scope="module")
def nodehost() -> Iterator[NodeHost]:
    need_root("libvirtd", "virtlogd", "qemu-system-x86_64", "qemu-img", "genisoimage")
    with Topology() as topo:
        host = topo.add_host("node1")
        with NodeHost(host.ns.name, name="hotplug") as nh:
            yield nh


@pytest.fixture
async def driver(nodehost: NodeHost) -> AsyncIterator[LibvirtDriver]:
    async with nodehost.libvirt_driver() as drv:
        yield drv


@contextlib.contextmanager
def serial(nodehost: NodeHost, vm: str) -> Iterator[libvirt.virStream]:
    """The guest's serial console, open for typing (QEMU notices a newly opened pty on
    its next poll, and what was typed into a closed one is lost: keep it open)."""
    conn = libvirt.open(nodehost.libvirt_uri)
    stream = conn.newStream(0)
    try:
        conn.lookupByUUIDString(vm).openConsole(None, stream, libvirt.VIR_DOMAIN_CONSOLE_FORCE)
        time.sleep(2)
        yield stream
    finally:
        with contextlib.suppress(libvirt.libvirtError):
            stream.abort()
        conn.close()


async def guest_sh(driver: LibvirtDriver, stream: libvirt.virStream, vm: str, command: str,
                   timeout: float = 60) -> str:
    """Type ``echo TAG=$(command)`` on the guest's console and return its output (newlines
    as spaces). The typed line never matches: ``$(`` follows the tag there."""
    tag = "Y" + secrets.token_hex(3)
    pattern = re.compile(rf"(?:^|\n){tag}=(?!\$\()([^\r\n]*)\r?\n")
    line = f"echo {tag}=$({command} 2>&1|tr '\\n' ' ')"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        await asyncio.to_thread(stream.send, f"\r{line}\r".encode())
        until = min(deadline, time.monotonic() + 15)
        while time.monotonic() < until:
            found = pattern.search(await driver.console_log(vm, 1 << 20))
            if found:
                print(f"guest$ {command} -> {found.group(1)!r}")
                return found.group(1).strip()
            await asyncio.sleep(0.5)
    tail = (await driver.console_log(vm, 3000))[-3000:]
    raise AssertionError(f"the guest never answered {command!r}:\n{tail}")


async def wait_for(driver: LibvirtDriver, stream: libvirt.virStream, vm: str, command: str,
                   wanted: str, timeout: float = 30) -> str:
    """Run ``command`` in the guest until its output is ``wanted`` (devices appear and go
    a moment after QEMU is done with them)."""
    deadline = time.monotonic() + timeout
    out = ""
    while time.monotonic() < deadline:
        out = await guest_sh(driver, stream, vm, command)
        if out == wanted:
            return out
        await asyncio.sleep(1)
    raise AssertionError(f"guest: {command!r} gave {out!r}, not {wanted!r}")


def marker_iso(directory: Path, image_id: str, token: str) -> Path:
    """An ISO named as the node's image cache names one (``<image id>.iso``) holding
    ``marker.txt`` with ``token``."""
    files = directory / f"iso-{image_id}"
    files.mkdir()
    (files / "marker.txt").write_text(token + "\n")
    path = directory / f"{image_id}.iso"
    run(["genisoimage", "-quiet", "-V", "YUNMARK", "-J", "-R", "-o", str(path), str(files)])
    shutil.rmtree(files)
    return path


def first_bytes(qcow2: Path, tmp: Path, count: int) -> bytes:
    """The first ``count`` bytes the guest sees on disk image ``qcow2``."""
    raw = tmp / f"{qcow2.stem}.raw"
    run(["qemu-img", "convert", "-U", "-O", "raw", str(qcow2), str(raw)], timeout=120)
    try:
        with raw.open("rb") as f:
            return f.read(count)
    finally:
        raw.unlink()


async def test_disk_hotplug_resize_cd_and_live_copy(nodehost: NodeHost, driver: LibvirtDriver,
                                                    tmp_path: Path) -> None:
    vm = str(uuidlib.uuid4())
    image_id = str(uuidlib.uuid4())
    token = secrets.token_hex(6)
    files = [overlay(nodehost, vm)]
    data = nodehost.disk_dir / f"{vm}-data.qcow2"
    run(["qemu-img", "create", "-q", "-f", "qcow2", str(data), f"{64 * MIB}"])
    iso = marker_iso(nodehost.disk_dir, image_id, token)
    copy = nodehost.disk_dir / f"{vm}-copy.qcow2"
    files += [data, iso, copy]
    seed = nodehost.disk_dir / f"{vm}-seed.iso"
    files.append(seed)
    hostname = f"seeded-{token[:6]}"
    spec = DomainSpec(uuid=vm, name="hotplug", vcpus=1, memory_mb=256)
    disks = [ResolvedDisk("root", files[0], "qcow2"),
             ResolvedDisk("cdrom", None, "raw", device="cdrom", read_only=True),
             ResolvedDisk(SEED_DISK_ID, seed, "raw", device="cdrom", read_only=True)]
    started = time.monotonic()
    try:
        # The NoCloud seed as the node writes it: the guest (no NIC, so no DHCP name)
        # takes its hostname and instance id from it.
        await write_seed(seed, CloudInitSpec(instance_id=vm, hostname=hostname))
        await driver.ensure_defined(spec, disks, [])
        await driver.start(vm)
        await wait_console(driver, vm, READY_MARKER)
        info = await driver.get_domain(vm)
        assert info is not None and info.disks == ["root"] and info.cdrom_image is None

        with serial(nodehost, vm) as stream:
            assert await guest_sh(driver, stream, vm, "hostname") == hostname
            assert await guest_sh(driver, stream, vm, "cat /run/yun-guest/instance-id") == vm
            # Hot-plug: a new block device, written by the guest.
            assert await guest_sh(driver, stream, vm, "ls /sys/block | grep -c vd") == "1"
            await driver.attach_disk(vm, ResolvedDisk("vol-1", data, "qcow2"))
            info = await driver.get_domain(vm)
            assert info is not None and info.disks == ["root", "vol-1"]
            await wait_for(driver, stream, vm, "cat /sys/block/vdb/size", str(64 * MIB // 512))
            await guest_sh(driver, stream, vm,
                           f"printf yun-{token} | dd of=/dev/vdb bs=512 conv=sync,fsync")

            # Online resize of the attached disk: the guest sees the new size.
            await driver.resize_disk(vm, "vol-1", 128 * MIB)
            with pytest.raises(Exception, match="only growing"):
                await driver.resize_disk(vm, "vol-1", 32 * MIB)
            await wait_for(driver, stream, vm, "cat /sys/block/vdb/size", str(128 * MIB // 512))

            # A consistent copy of the running guest's disk (F-IMAGE).
            await driver.backup_disk(vm, "vol-1", copy)
            assert run(["qemu-img", "info", "-U", "--output=json", str(copy)]).stdout.count(
                '"format": "qcow2"') == 1

            # Unplugged: gone from the guest and from the domain.
            await driver.detach_disk(vm, "vol-1")
            info = await driver.get_domain(vm)
            assert info is not None and info.disks == ["root"]
            await wait_for(driver, stream, vm, "ls /sys/block | grep -c vd", "1")

            # A CD inserted by hand: the guest reads the file on it; ejected: no medium.
            await driver.change_media(vm, "cdrom", iso)
            info = await driver.get_domain(vm)
            assert info is not None and info.cdrom_image == image_id
            await wait_for(driver, stream, vm,
                           "mount -r /dev/sr0 /mnt&&cat /mnt/marker.txt;umount /mnt", token)
            await driver.change_media(vm, "cdrom", None)
            info = await driver.get_domain(vm)
            assert info is not None and info.cdrom_image is None
            await wait_for(driver, stream, vm,
                           "mount -r /dev/sr0 /mnt&&echo mounted&&umount /mnt||echo none",
                           "none")
        print(f"guest time: {time.monotonic() - started:.0f} s")

        # What the guest wrote is in the volume's file, and in the live copy.
        wanted = f"yun-{token}".encode()
        assert first_bytes(data, tmp_path, len(wanted)) == wanted
        assert first_bytes(copy, tmp_path, len(wanted)) == wanted

        # Stopped, the definition keeps what the running guest was changed to.
        await driver.destroy(vm)
        info = await driver.get_domain(vm)
        assert info is not None and info.disks == ["root"] and info.cdrom_image is None
    finally:
        await driver.undefine(vm)
        force_remove(nodehost, vm)
        for path in files:
            path.unlink(missing_ok=True)
