"""Pure parts of the test guest builder and of the bare-QEMU helper (no root, no QEMU)."""

from __future__ import annotations

import os
import shutil
import stat
import struct
from pathlib import Path

import pytest

from yun.testing import guest
from yun.testing.guest import (
    BuildInputs,
    CpioEntry,
    GuestBuildError,
    compute_cache_key,
    is_static_elf,
    kernel_args,
    mbr_sector,
    newc_archive,
    parse_busybox_version,
    parse_guest_info,
    parse_serial_ip,
    render_extlinux_conf,
    resolve_modules,
    version_key,
)
from yun.testing.qemu import qemu_argv
from yun.util.run import run

MODULES_DEP = """\
kernel/drivers/virtio/virtio.ko:
kernel/drivers/virtio/virtio_ring.ko:
kernel/drivers/virtio/virtio_pci.ko: kernel/drivers/virtio/virtio.ko VIRTIO_RING
kernel/drivers/block/virtio_blk.ko: kernel/drivers/virtio/virtio.ko VIRTIO_RING
kernel/drivers/char/hw_random/virtio-rng.ko: kernel/drivers/virtio/virtio.ko
kernel/fs/fat/fat.ko:
kernel/fs/fat/vfat.ko: kernel/fs/fat/fat.ko
""".replace("VIRTIO_RING", "kernel/drivers/virtio/virtio_ring.ko")
MODULES_BUILTIN = "kernel/fs/ext4/ext4.ko\nkernel/drivers/acpi/button.ko\n"


# ---------------------------------------------------------------- cache key and versions


def test_cache_key_is_stable_and_ignores_digest_order() -> None:
    digests = [("kernel", "aa"), ("busybox", "bb")]
    one = compute_cache_key("6.1.0-1-cloud-amd64", "1.35.0", 1, digests)
    assert one == compute_cache_key("6.1.0-1-cloud-amd64", "1.35.0", 1, list(reversed(digests)))
    assert len(one) == 16 and int(one, 16) >= 0


@pytest.mark.parametrize(
    "change",
    [
        {"kernel_version": "6.1.0-2-cloud-amd64"},
        {"busybox_version": "1.36.1"},
        {"builder_version": 2},
        {"digests": [("kernel", "aa"), ("busybox", "bc")]},
        {"digests": [("kernel", "aa"), ("busybox", "bb"), ("files/etc/inittab", "cc")]},
    ],
)
def test_cache_key_changes_with_every_input(change: dict[str, object]) -> None:
    base: dict[str, object] = {
        "kernel_version": "6.1.0-1-cloud-amd64",
        "busybox_version": "1.35.0",
        "builder_version": 1,
        "digests": [("kernel", "aa"), ("busybox", "bb")],
    }
    assert compute_cache_key(**base) != compute_cache_key(**{**base, **change})  # type: ignore[arg-type]


def test_parse_busybox_version() -> None:
    banner = "BusyBox v1.35.0 (Debian 1:1.35.0-4+deb12u1+b1) multi-call binary.\nBusyBox is ..."
    assert parse_busybox_version(banner) == "1.35.0 (Debian 1:1.35.0-4+deb12u1+b1)"
    assert parse_busybox_version("BusyBox v1.36.1 multi-call binary.") == "1.36.1"
    with pytest.raises(GuestBuildError):
        parse_busybox_version("toybox 0.8")


def test_version_key_orders_numerically() -> None:
    versions = ["6.1.0-9-cloud-amd64", "6.1.0-56-cloud-amd64", "6.1.0-10-cloud-amd64"]
    assert max(versions, key=version_key) == "6.1.0-56-cloud-amd64"
    assert sorted(["6.1.0-rc1", "6.1.0-1"], key=version_key)  # text vs number: no TypeError


# ---------------------------------------------------------------- kernel modules


def test_resolve_modules_puts_dependencies_first_once() -> None:
    order = resolve_modules(MODULES_DEP, MODULES_BUILTIN, ["virtio_pci", "virtio_blk"], ["vfat"])
    names = [Path(p).name for p in order]
    assert names == ["virtio.ko", "virtio_ring.ko", "virtio_pci.ko", "virtio_blk.ko",
                     "fat.ko", "vfat.ko"]


def test_resolve_modules_skips_builtin_and_absent_optional() -> None:
    order = resolve_modules(
        MODULES_DEP, MODULES_BUILTIN, ["button", "ext4"], ["ahci", "virtio_rng"]
    )
    # virtio-rng.ko is found under its module name virtio_rng; button/ext4 are built in.
    assert [Path(p).name for p in order] == ["virtio.ko", "virtio-rng.ko"]


def test_resolve_modules_refuses_a_missing_required_module() -> None:
    with pytest.raises(GuestBuildError, match="virtio_net"):
        resolve_modules(MODULES_DEP, MODULES_BUILTIN, ["virtio_net"])


def test_resolve_modules_on_this_hosts_cloud_kernel() -> None:
    dirs = sorted(Path("/lib/modules").glob("*-cloud-amd64"))
    if not dirs:
        pytest.skip("linux-image-cloud-amd64 not installed")
    order = resolve_modules(
        (dirs[-1] / "modules.dep").read_text(),
        (dirs[-1] / "modules.builtin").read_text(),
        guest.REQUIRED_MODULES,
        guest.OPTIONAL_MODULES,
    )
    names = [Path(p).name for p in order]
    assert names.index("virtio.ko") < names.index("virtio_pci.ko") < names.index("virtio_blk.ko")
    assert len(names) == len(set(names))


# ---------------------------------------------------------------- boot configuration


def test_extlinux_conf_boots_the_disk_with_serial_console() -> None:
    template = (guest.FILES_DIR / "extlinux.conf").read_text()
    conf = render_extlinux_conf(template, "/boot/vmlinuz", "/boot/initrd.img", kernel_args())
    assert "@" not in conf
    append = next(line for line in conf.splitlines() if line.strip().startswith("APPEND"))
    assert f"root=LABEL={guest.ROOT_LABEL}" in append
    # The last console= becomes /dev/console, where the markers go: the serial port.
    consoles = [a for a in append.split() if a.startswith("console=")]
    assert consoles[0] == "console=tty0" and consoles[-1].startswith("console=ttyS0")
    assert "LINUX /boot/vmlinuz" in conf and "INITRD /boot/initrd.img" in conf


def test_live_kernel_args_have_no_root() -> None:
    args = kernel_args(live=True, extra=["loglevel=3"])
    assert "yun.live" in args and not any(a.startswith("root=") for a in args)
    assert args[-1] == "loglevel=3"


def test_mbr_sector_has_one_active_linux_partition() -> None:
    mbr = mbr_sector(b"\xfa" * 440, 2048, 260096, 0x12345678)
    assert len(mbr) == 512 and mbr[:440] == b"\xfa" * 440 and mbr[510:] == b"\x55\xaa"
    assert struct.unpack_from("<I", mbr, 440)[0] == 0x12345678
    boot, ptype, start, count = struct.unpack_from("<B3xB3xII", mbr, 446)
    assert (boot, ptype, start, count) == (0x80, 0x83, 2048, 260096)
    assert mbr[462:510] == bytes(48)  # the other three entries are empty
    with pytest.raises(ValueError):
        mbr_sector(bytes(441), 2048, 1, 0)


def _read_newc(data: bytes) -> list[tuple[str, int, bytes, tuple[int, int]]]:
    out: list[tuple[str, int, bytes, tuple[int, int]]] = []
    pos = 0
    while True:
        assert data[pos:pos + 6] == b"070701"
        fields = [int(data[pos + 6 + 8 * i: pos + 14 + 8 * i], 16) for i in range(13)]
        namesize, filesize = fields[11], fields[6]
        name_start = pos + 110
        name = data[name_start: name_start + namesize - 1].decode()
        pos = name_start + namesize
        pos += -pos % 4
        body = data[pos: pos + filesize]
        pos += filesize
        pos += -pos % 4
        if name == "TRAILER!!!":
            assert pos == len(data)
            return out
        out.append((name, fields[1], body, (fields[9], fields[10])))


def test_newc_archive_round_trips() -> None:
    entries = [
        CpioEntry("bin", stat.S_IFDIR | 0o755),
        CpioEntry("/bin/sh", stat.S_IFLNK | 0o777, b"busybox"),
        CpioEntry("init", stat.S_IFREG | 0o755, b"#!/bin/sh\necho odd-length\n"),
        CpioEntry("dev/console", stat.S_IFCHR | 0o600, rdev=(5, 1)),
    ]
    data = newc_archive(entries)
    assert len(data) % 4 == 0
    got = _read_newc(data)
    assert [g[0] for g in got] == ["bin", "bin/sh", "init", "dev/console"]
    assert got[2][2] == b"#!/bin/sh\necho odd-length\n" and got[2][1] == stat.S_IFREG | 0o755
    assert got[1][2] == b"busybox" and stat.S_ISLNK(got[1][1])
    assert got[3][3] == (5, 1) and stat.S_ISCHR(got[3][1])
    assert newc_archive(entries) == data  # reproducible


def _elf(with_interp: bool) -> bytes:
    head = bytearray(4096)
    head[:5] = b"\x7fELF\x02"
    struct.pack_into("<Q", head, 0x20, 64)  # e_phoff
    struct.pack_into("<HH", head, 0x36, 56, 2)  # e_phentsize, e_phnum
    struct.pack_into("<I", head, 64, 1)  # PT_LOAD
    struct.pack_into("<I", head, 64 + 56, 3 if with_interp else 1)
    return bytes(head)


def test_is_static_elf() -> None:
    assert is_static_elf(_elf(with_interp=False))
    assert not is_static_elf(_elf(with_interp=True))
    assert not is_static_elf(b"#!/bin/sh\n" + bytes(100))
    if Path("/bin/busybox").is_file():
        assert is_static_elf(Path("/bin/busybox").read_bytes()[:4096])


# ---------------------------------------------------------------- what the guest says


def test_parse_guest_info() -> None:
    text = "hostname=vm-1\nuptime=12\nboots=2\ntoken=ab12\nips=eth0:10.0.2.15\nnot a fact\n"
    info = parse_guest_info(text)
    assert info == {"hostname": "vm-1", "uptime": "12", "boots": "2", "token": "ab12",
                    "ips": "eth0:10.0.2.15"}


def test_parse_serial_ip_takes_the_last_announcement() -> None:
    log = ("[ 1.0] boot\r\nYUN-GUEST-IP 10.0.2.15\r\nYUN-GUEST-READY\r\n"
           "x YUN-GUEST-IP 1.1.1.1\r\n\r\nYUN-GUEST-IP 10.77.0.5\r\n")
    assert parse_serial_ip(log) == "10.77.0.5"
    assert parse_serial_ip("YUN-GUEST-BOOT\n") is None


# ---------------------------------------------------------------- guest files


def _scripts() -> list[Path]:
    return [p for p in sorted(guest.FILES_DIR.rglob("*"))
            if p.is_file() and p.read_bytes().startswith(b"#!")]


def test_guest_scripts_are_posix_sh_and_parse() -> None:
    scripts = _scripts()
    assert any(p.name == "rcS" for p in scripts) and any(p.name == "init" for p in scripts)
    busybox = shutil.which("busybox")
    for script in scripts:
        assert script.read_text().startswith("#!/bin/sh\n"), script
        if busybox:
            run([busybox, "sh", "-n", str(script)], timeout=10)


def test_inittab_powers_off_cleanly() -> None:
    inittab = (guest.FILES_DIR / "rootfs/etc/inittab").read_text()
    assert "::sysinit:/etc/init.d/rcS" in inittab and "::shutdown:/etc/init.d/rcK" in inittab
    handler = guest.FILES_DIR / "rootfs/etc/acpi/PWRF/00000080"
    assert "poweroff" in handler.read_text()


# ---------------------------------------------------------------- the cache (build faked)


def fake_inputs(tmp_path: Path, kernel_bytes: bytes = b"kernel") -> BuildInputs:
    """Build inputs made of small files (the build itself is faked or needs none of
    their content): what the cache keys on."""
    (tmp_path / "in").mkdir(exist_ok=True)
    kernel = tmp_path / "in/vmlinuz"
    kernel.write_bytes(kernel_bytes)
    busybox = tmp_path / "in/busybox"
    busybox.write_bytes(b"busybox")
    return BuildInputs(kernel=kernel, kernel_version="6.1.0-1-cloud-amd64",
                       modules_dir=tmp_path / "in", busybox=busybox, busybox_version="1.35.0",
                       mbr=busybox, files_dir=guest.FILES_DIR)


def test_ensure_guest_image_builds_once_per_inputs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    builds: list[Path] = []

    def fake_build(
        inputs: BuildInputs, workdir: Path, qcow2: Path, iso: Path | None = None
    ) -> None:
        assert workdir.is_dir() and workdir.parent == qcow2.parent
        builds.append(qcow2)
        qcow2.write_bytes(b"QFI\xfb")
        if iso is not None:
            iso.write_bytes(b"iso")

    inputs = {"now": fake_inputs(tmp_path)}
    monkeypatch.setattr(guest, "find_inputs", lambda: inputs["now"])
    monkeypatch.setattr(guest, "build_image", fake_build)
    # The installer ISO is built beside the ISO (when the host can): its own test
    # is in test_guest_installer.py.
    monkeypatch.setattr(guest, "build_installer_iso",
                        lambda _i, _w, _q, iso: iso.write_bytes(b"installer") and 1)
    cache = tmp_path / "cache"

    first = guest.ensure_guest_image(cache)
    assert first.is_file() and first.parent == cache and first.suffix == ".qcow2"
    assert guest.ensure_guest_image(cache) == first
    assert len(builds) == 1
    assert (cache / "yun-guest.qcow2").resolve() == first.resolve()
    assert not list(cache.glob(".build-*"))  # the work directory is gone

    inputs["now"] = fake_inputs(tmp_path, b"a newer kernel")
    second = guest.ensure_guest_image(cache)
    assert second != first and len(builds) == 2
    assert (cache / "yun-guest.qcow2").resolve() == second.resolve()


def test_prune_keeps_the_newest_and_the_young_builds(tmp_path: Path) -> None:
    def build(i: int, mtime: float | None) -> None:
        for suffix in (".qcow2", ".json"):
            p = tmp_path / f"yun-guest-{i:016x}{suffix}"
            p.write_text("x")
            os.utime(p, None if mtime is None else (mtime, mtime))

    for i in range(4):
        build(i, 1000 + i)  # long ago
    build(8, None)  # just now: may back a running VM
    build(9, None)
    guest._prune(tmp_path, 1)
    assert sorted(p.name for p in tmp_path.glob("*.qcow2")) == [
        f"yun-guest-{8:016x}.qcow2", f"yun-guest-{9:016x}.qcow2"]


# ---------------------------------------------------------------- bare QEMU command line


def test_qemu_argv_is_tcg_virtio_and_loopback_only(tmp_path: Path) -> None:
    argv = qemu_argv(disk=tmp_path / "d.qcow2", serial_log=tmp_path / "s.log",
                     qmp_socket=tmp_path / "q.sock", http_port=40123, dhcp_hostname="vm-7")
    joined = " ".join(argv)
    assert argv[argv.index("-accel") + 1] == "tcg" and "kvm" not in joined
    assert f"file={tmp_path / 'd.qcow2'},if=virtio,format=qcow2" in joined
    assert "hostfwd=tcp:127.0.0.1:40123-:80" in joined and ",hostname=vm-7" in joined
    assert "virtio-net-pci" in joined and f"file:{tmp_path / 's.log'}" in joined
    assert argv[argv.index("-boot") + 1] == "c"


def test_qemu_argv_iso_boot(tmp_path: Path) -> None:
    argv = qemu_argv(disk=None, serial_log=tmp_path / "s.log", qmp_socket=tmp_path / "q.sock",
                     http_port=1, cdrom=tmp_path / "g.iso", boot_cdrom=True)
    assert "if=virtio" not in " ".join(argv)
    assert f"file={tmp_path / 'g.iso'},if=ide,media=cdrom,readonly=on" in argv
    assert argv[argv.index("-boot") + 1] == "d"
