"""The test guest image really boots under bare QEMU (TCG) and behaves as promised.

Boots to ``YUN-GUEST-READY``, answers HTTP through a port forwarded on 127.0.0.1,
powers off by itself on the ACPI power button with its file system clean, keeps its
disk state across power-off and reboot, reads a NoCloud seed, takes the DHCP host
name, and boots from its ISO too.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from yun.testing.guest import (
    HALTED_MARKER,
    READY_MARKER,
    SHUTDOWN_MARKER,
    ensure_guest_image,
    ensure_guest_iso,
)
from yun.testing.qemu import QemuGuest, boot_guest
from yun.util.run import run

pytestmark = pytest.mark.system

BOOT_TIMEOUT = 120.0  # TCG; a boot takes about 5 s on an idle machine
POWEROFF_TIMEOUT = 60.0


def _need_root_and_qemu() -> None:
    if os.geteuid() != 0:
        pytest.skip("building the test guest needs root")
    for tool in ("qemu-system-x86_64", "qemu-img", "extlinux", "mkfs.ext4"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} not installed")


@pytest.fixture(scope="module")
def image() -> Path:
    """The cached guest image (built on first use, in a few seconds)."""
    _need_root_and_qemu()
    started = time.monotonic()
    path = ensure_guest_image()
    print(f"guest image {path} ready in {time.monotonic() - started:.2f} s")
    return path


@pytest.fixture
def guests() -> Iterator[list[QemuGuest]]:
    """Guests a test boots; each is killed afterwards whatever happened."""
    started: list[QemuGuest] = []
    yield started
    for g in started:
        g.stop()


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _overlay(image: Path, path: Path) -> Path:
    run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(image), "-F", "qcow2", str(path)])
    return path


def _power_off(g: QemuGuest) -> None:
    """Press the ACPI power button and expect QEMU to exit by itself, cleanly."""
    since = g.serial_size()
    g.powerdown()
    assert g.wait_exit(POWEROFF_TIMEOUT) == 0, g.serial_text()[-2000:]
    tail = g.serial_text()[since:]
    assert SHUTDOWN_MARKER in tail and HALTED_MARKER in tail, tail


def _fs_state(disk: Path, workdir: Path) -> str:
    """The root file system's ext4 state in a (powered off) qcow2 disk."""
    raw = workdir / "check.raw"
    run(["qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(disk), str(raw)], timeout=60)
    try:
        # The partition starts at 1 MiB; e2fsprogs reads it in place with ?offset=.
        out = run(["dumpe2fs", "-h", f"{raw}?offset={1 << 20}"], timeout=30).stdout
    finally:
        raw.unlink(missing_ok=True)
    state = re.search(r"^Filesystem state:\s*(.+)$", out, re.MULTILINE)
    features = re.search(r"^Filesystem features:\s*(.+)$", out, re.MULTILINE)
    assert state and features, out
    return state.group(1).strip() + (" needs_recovery" if "needs_recovery" in features.group(1)
                                     else "")


def test_boot_http_powerdown_and_disk_state_survives(
    image: Path, tmp_path: Path, guests: list[QemuGuest]
) -> None:
    image_digest = _sha256(image)
    disk = _overlay(image, tmp_path / "disk.qcow2")

    # First boot: READY with the announced address, HTTP facts through the forward.
    started = time.monotonic()
    g = boot_guest(disk, writable=True, workdir=tmp_path / "boot1", timeout=BOOT_TIMEOUT)
    guests.append(g)
    print(f"first boot to {READY_MARKER}: {time.monotonic() - started:.2f} s")
    assert g.guest_ip == "10.0.2.15"  # QEMU user networking's first lease
    info = g.info()
    assert info["hostname"] == "yun-guest" and info["hostname_source"] == "default"
    assert int(info["uptime"]) >= 0
    assert info["boots"] == "1"
    token = info["token"]
    assert re.fullmatch(r"[0-9a-f]{32}", token)
    assert info["disks"] == "vda" and info["ips"] == "eth0:10.0.2.15"

    # The ACPI power button (libvirt's virDomainShutdown) powers the guest off.
    _power_off(g)
    assert _fs_state(disk, tmp_path) == "clean"

    # Second boot of the same disk: the counter moved on, the token stayed.
    g = boot_guest(disk, writable=True, workdir=tmp_path / "boot2", timeout=BOOT_TIMEOUT)
    guests.append(g)
    info = g.info()
    assert info["boots"] == "2" and info["token"] == token

    # A graceful reboot (Ctrl-Alt-Del, handled by init) keeps the state as well.
    since = g.serial_size()
    keys = [{"type": "qcode", "data": k} for k in ("ctrl", "alt", "delete")]
    g.qmp("send-key", {"keys": keys})
    g.wait_for(READY_MARKER, BOOT_TIMEOUT, since=since)
    assert HALTED_MARKER in g.serial_text()[since:]
    info = g.info()
    assert info["boots"] == "3" and info["token"] == token
    _power_off(g)

    assert _sha256(image) == image_digest  # the cached image was never written


def test_nocloud_seed_and_dhcp_hostname(
    image: Path, tmp_path: Path, guests: list[QemuGuest]
) -> None:
    if shutil.which("genisoimage") is None:
        pytest.skip("genisoimage not installed")
    seed_dir = tmp_path / "seed"
    seed_dir.mkdir()
    (seed_dir / "meta-data").write_text("instance-id: iid-yun-42\nlocal-hostname: seeded-vm\n")
    (seed_dir / "user-data").write_text("#!/bin/sh\necho user-data-ran-$(hostname)\n")
    seed = tmp_path / "seed.iso"
    run(["genisoimage", "-quiet", "-o", str(seed), "-V", "cidata", "-R", "-J",
         str(seed_dir / "meta-data"), str(seed_dir / "user-data")])

    g = boot_guest(image, cdrom=seed, workdir=tmp_path / "seeded", timeout=BOOT_TIMEOUT)
    guests.append(g)
    info = g.info()
    assert info["hostname"] == "seeded-vm" and info["hostname_source"] == "seed"
    assert info["instance_id"] == "iid-yun-42"
    assert info["userdata_rc"] == "0"
    assert g.http_get("/user-data.log").strip() == "user-data-ran-seeded-vm"
    assert "local-hostname: seeded-vm" in g.http_get("/seed/meta-data")
    g.stop()

    # DHCP option 12 wins over the seed.
    g = boot_guest(image, cdrom=seed, dhcp_hostname="dhcp-named", workdir=tmp_path / "dhcp",
                   timeout=BOOT_TIMEOUT)
    guests.append(g)
    info = g.info()
    assert info["hostname"] == "dhcp-named" and info["hostname_source"] == "dhcp"


def test_iso_boots_from_ram(tmp_path: Path, guests: list[QemuGuest]) -> None:
    _need_root_and_qemu()
    if not Path("/usr/lib/ISOLINUX/isolinux.bin").is_file():
        pytest.skip("isolinux not installed")
    iso = ensure_guest_iso()
    g = boot_guest(None, cdrom=iso, boot_cdrom=True, workdir=tmp_path / "iso",
                   timeout=BOOT_TIMEOUT)
    guests.append(g)
    assert "YUN-GUEST-LIVE" in g.serial_text()
    info = g.info()
    assert info["boots"] == "1" and info["disks"] == "" and info["hostname"] == "yun-guest"
    _power_off(g)


def test_hot_plugged_disk_and_nic_are_reported(
    image: Path, tmp_path: Path, guests: list[QemuGuest]
) -> None:
    extra = tmp_path / "extra.qcow2"
    run(["qemu-img", "create", "-q", "-f", "qcow2", str(extra), "64M"])
    g = boot_guest(image, workdir=tmp_path / "hotplug", timeout=BOOT_TIMEOUT)
    guests.append(g)
    g.qmp("blockdev-add", {"driver": "qcow2", "node-name": "extra",
                           "file": {"driver": "file", "filename": str(extra)}})
    g.qmp("device_add", {"driver": "virtio-blk-pci", "drive": "extra", "id": "extra-disk"})
    g.qmp("netdev_add", {"type": "user", "id": "net1"})
    g.qmp("device_add", {"driver": "virtio-net-pci", "netdev": "net1", "id": "extra-nic"})

    def until(predicate: str, present: bool) -> dict[str, str]:
        deadline = time.monotonic() + 60
        while True:
            info = g.info()
            facts = info["disks"] + " " + info["ips"]
            if (predicate in facts) == present or time.monotonic() > deadline:
                return info
            time.sleep(0.5)

    info = until("vdb", True)
    assert info["disks"] == "vda,vdb"
    info = until("eth1:", True)  # the guest's NIC watcher started DHCP on it
    assert "eth1:10.0.2.15" in info["ips"]
    g.qmp("device_del", {"id": "extra-disk"})
    g.qmp("device_del", {"id": "extra-nic"})
    assert until("vdb", False)["disks"] == "vda"
    assert until("eth1:", False)["ips"] == "eth0:10.0.2.15"
