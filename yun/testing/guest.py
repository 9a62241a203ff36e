"""Builder of the project's test guest: a tiny BIOS-bootable qcow2 disk (and ISO).

Built from Debian packages only, with nothing downloaded: the host's
``linux-image-cloud-amd64`` kernel, ``busybox-static`` and extlinux. The guest

* prints ``YUN-GUEST-BOOT`` early, then ``YUN-GUEST-IP <addr>`` and
  ``YUN-GUEST-READY`` on its serial console once DHCP and HTTP are up;
* takes DHCP on every NIC (busybox udhcpc), sets its hostname from DHCP option 12,
  else from a NoCloud seed (``cidata``), else ``yun-guest``;
* serves ``GET /`` on port 80 (``hostname=``, ``uptime=``, ``boots=``, ``token=`` ...
  one per line), keeps a boot counter and a first-boot token on its disk;
* powers off cleanly on the ACPI power button (busybox acpid).

Layout of the disk: an MBR (syslinux ``mbr.bin``) with one bootable partition at
1 MiB holding an ext4 file system (label ``yunroot``) with extlinux, the kernel and
an initramfs. The cloud kernel builds virtio as modules, so the initramfs loads
them and switches to the disk; booted from the ISO (``yun.live``), the guest runs
from the initramfs itself.

The installer ISO (:func:`ensure_installer_iso`, ``yun.install``) carries the disk
image too: booted with exactly one blank virtio disk, it writes the image onto it,
prints ``YUN-GUEST-INSTALLED`` and powers off (F-ISO); with no blank disk it runs
as the live ISO does.

Images are cached under ``/var/cache/yun/test-guest`` keyed on the kernel, busybox,
the boot loader and the builder's own files, so a test run pays the build (under
a second on our machines) once. The guest's shell scripts live in ``guest_files/``.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import gzip
import hashlib
import json
import logging
import os
import re
import shutil
import stat
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from yun.testing.bootformats import (
    SECTOR,
    CpioEntry,
    is_static_elf,
    mbr_sector,
    newc_archive,
)
from yun.util.run import run

log = logging.getLogger("yun.testing.guest")

#: Bump when the build logic changes in a way the file hashes below do not see.
BUILDER_VERSION = 2

DEFAULT_CACHE_DIR = Path("/var/cache/yun/test-guest")
FILES_DIR = Path(__file__).with_name("guest_files")
ROOT_LABEL = "yunroot"
ISO_VOLUME_ID = "YUN-GUEST"
INSTALLER_VOLUME_ID = "YUN-INSTALL"
INSTALL_DIR = "yun-install"  # on the installer ISO: manifest and disk.gz
INSTALL_CHUNK = 1 << 20  # the installer writes the disk's non-zero MiBs only
INSTALL_FORMAT = 1  # version of the payload; the guest's install script checks it
DISK_SIZE_MIB = 128  # virtual size; the qcow2 file only holds what is used (~19 MiB)
PART_START_SECTOR = 2048  # 1 MiB alignment, as every partitioning tool does
MBR_BIN = Path("/usr/lib/syslinux/mbr/mbr.bin")
ISOLINUX_BIN = Path("/usr/lib/ISOLINUX/isolinux.bin")
LDLINUX_C32 = Path("/usr/lib/syslinux/modules/bios/ldlinux.c32")
BUSYBOX = Path("/bin/busybox")
INSTALLER_SUFFIX = "-installer.iso"  # yun-guest-<key>-installer.iso
KEEP_BUILDS = 3  # older cached builds are pruned ...
PRUNE_AFTER_S = 24 * 3600  # ... once a day old (running VMs may use them as backing)

#: Modules the guest cannot boot without (the cloud kernel builds them as modules).
REQUIRED_MODULES = ("virtio_pci", "virtio_blk", "virtio_net", "button", "evdev")
#: Modules loaded when the kernel has them: other buses, CD-ROM and vfat seeds, extras.
OPTIONAL_MODULES = (
    "virtio_scsi", "sd_mod", "sr_mod", "ata_piix", "ahci", "isofs", "vfat",
    "nls_cp437", "nls_ascii", "nls_utf8", "virtio_balloon", "virtio_console", "virtio_rng",
)
KERNEL_ARGS = (
    "console=tty0", "console=ttyS0,115200n8",  # the last console= is /dev/console
    "panic=10",  # a guest that cannot boot reboots instead of hanging quietly
)


#: Lines the guest prints on its serial console.
BOOT_MARKER = "YUN-GUEST-BOOT"  # first thing the initramfs says
IP_MARKER = "YUN-GUEST-IP"  # followed by the first NIC's DHCP address
READY_MARKER = "YUN-GUEST-READY"  # DHCP done (or given up) and HTTP answering
SHUTDOWN_MARKER = "YUN-GUEST-SHUTDOWN"  # init started a clean power-off or reboot
HALTED_MARKER = "YUN-GUEST-HALTED"  # file systems flushed, root read-only
INSTALLED_MARKER = "YUN-GUEST-INSTALLED"  # the installer wrote the disk; powers off next
NO_INSTALL_MARKER = "YUN-GUEST-NO-INSTALL"  # no single blank disk: runs live instead


class GuestBuildError(RuntimeError):
    """The test guest cannot be built on this host (a missing package, no root ...)."""


@dataclass(frozen=True)
class BuildInputs:
    """Everything a build reads from the host; the cache key is derived from it."""

    kernel: Path
    kernel_version: str
    modules_dir: Path
    busybox: Path
    busybox_version: str
    mbr: Path
    files_dir: Path


# --------------------------------------------------------------------------- pure parts


def version_key(version: str) -> tuple[int | str, ...]:
    """Sort key for version strings such as ``6.1.0-56-cloud-amd64`` (numbers numerically)."""
    # Keep the empty strings re.split yields: they keep text at even and numbers at
    # odd positions, so two keys never compare an int with a str.
    return tuple(int(p) if p.isdigit() else p for p in re.split(r"(\d+)", version))


def parse_busybox_version(banner: str) -> str:
    """``BusyBox v1.35.0 (Debian 1:1.35.0-4+deb12u1+b1) multi-call ...`` -> ``1.35.0 (...)``."""
    m = re.search(r"BusyBox v(\S+)(?: \(([^)]*)\))?", banner)
    if not m:
        raise GuestBuildError(f"unrecognised busybox banner: {banner[:80]!r}")
    return f"{m.group(1)} ({m.group(2)})" if m.group(2) else m.group(1)


def compute_cache_key(
    kernel_version: str,
    busybox_version: str,
    builder_version: int,
    digests: Iterable[tuple[str, str]],
) -> str:
    """A short stable key for one combination of build inputs.

    ``digests`` are ``(name, sha256)`` pairs for the files that go into the image
    (kernel, busybox, boot loader, the guest's scripts); their order does not matter.
    """
    h = hashlib.sha256()
    h.update(f"yun-guest\0{builder_version}\0{kernel_version}\0{busybox_version}\0".encode())
    for name, digest in sorted(digests):
        h.update(f"{name}\0{digest}\0".encode())
    return h.hexdigest()[:16]


def _module_name(path: str) -> str:
    return Path(path).name.removesuffix(".ko").replace("-", "_")


def resolve_modules(
    modules_dep: str,
    modules_builtin: str,
    required: Sequence[str],
    optional: Sequence[str] = (),
) -> list[str]:
    """Relative paths (from ``modules.dep``) of the modules to load, dependencies first.

    Built-in modules are skipped; a missing required module raises
    :class:`GuestBuildError`, a missing optional one is left out.
    """
    deps: dict[str, tuple[str, list[str]]] = {}
    for line in modules_dep.splitlines():
        if ":" not in line:
            continue
        path, _, rest = line.partition(":")
        deps[_module_name(path)] = (path.strip(), rest.split())
    builtin = {_module_name(p) for p in modules_builtin.split()}

    order: list[str] = []
    seen: set[str] = set()

    def visit(name: str) -> None:
        if name in seen:
            return
        seen.add(name)
        if name not in deps:
            raise GuestBuildError(f"modules.dep names {name} but has no line for it")
        _, dep_paths = deps[name]
        for dep in dep_paths:
            visit(_module_name(dep))
        order.append(deps[name][0])

    for want in [*required, *optional]:
        name = want.replace("-", "_")
        if name in builtin:
            continue
        if name not in deps:
            if want in required:
                raise GuestBuildError(f"kernel module {want} is neither built in nor available")
            continue
        visit(name)
    return order


def render_extlinux_conf(template: str, kernel: str, initrd: str, args: Sequence[str]) -> str:
    """Fill the boot loader template (``@KERNEL@``, ``@INITRD@``, ``@APPEND@``)."""
    return (
        template.replace("@KERNEL@", kernel)
        .replace("@INITRD@", initrd)
        .replace("@APPEND@", " ".join(args))
    )


def kernel_args(*, live: bool = False, install: bool = False,
                extra: Sequence[str] = ()) -> list[str]:
    """The kernel command line of the disk (``root=LABEL=...``), the ISO (``yun.live``)
    or the installer ISO (``yun.live yun.install``: live when it installs nothing)."""
    if install:
        root = ["yun.live", "yun.install"]
    else:
        root = ["yun.live"] if live else [f"root=LABEL={ROOT_LABEL}", "rw"]
    return [*root, *KERNEL_ARGS, *extra]


def write_install_payload(raw: Path, dest: Path, chunk: int = INSTALL_CHUNK) -> int:
    """Write the installer's payload for the raw disk image ``raw`` into ``dest``.

    ``dest/disk.gz`` is the gzip stream of the image's non-zero ``chunk``-sized
    pieces, in order; ``dest/manifest`` is a header line ``yun-install <format>
    <image bytes> <chunk bytes>`` and then the index of each piece, one a line (the
    guest's ``install`` script dd's piece *n* of the stream to ``index * chunk``).
    Zero pieces are left out: the image is 128 MiB, about 20 of them hold data,
    and a blank disk reads zeros anyway. Returns the number of pieces.
    """
    size = raw.stat().st_size
    if size == 0 or size % chunk:
        raise GuestBuildError(f"{raw}: {size} bytes is not a whole number of {chunk}-byte "
                              "chunks")
    dest.mkdir(parents=True, exist_ok=True)
    indexes: list[int] = []
    with raw.open("rb") as src, gzip.GzipFile(dest / "disk.gz", "wb", compresslevel=6,
                                              mtime=0) as out:
        for index in range(size // chunk):
            piece = src.read(chunk)
            if piece.count(0) == len(piece):
                continue
            out.write(piece)
            indexes.append(index)
    lines = [f"yun-install {INSTALL_FORMAT} {size} {chunk}", *map(str, indexes)]
    (dest / "manifest").write_text("\n".join(lines) + "\n")
    return len(indexes)


def parse_guest_info(text: str) -> dict[str, str]:
    """Parse the guest's ``GET /`` answer (``key=value`` lines) into a dict."""
    info: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep and key.strip():
            info[key.strip()] = value.strip()
    return info


def parse_serial_ip(serial: str) -> str | None:
    """The last address announced by ``YUN-GUEST-IP <addr>`` in a serial log, if any."""
    found = re.findall(rf"^{IP_MARKER} (\S+)\s*$", serial, flags=re.MULTILINE)
    return found[-1] if found else None


def find_inputs(
    boot_dir: Path = Path("/boot"), modules_root: Path = Path("/lib/modules")
) -> BuildInputs:
    """Locate the newest cloud kernel with its modules, busybox-static and syslinux."""
    kernels = [
        (p.name.removeprefix("vmlinuz-"), p)
        for p in boot_dir.glob("vmlinuz-*-cloud-amd64")
        if (modules_root / p.name.removeprefix("vmlinuz-") / "modules.dep").is_file()
    ]
    if not kernels:
        raise GuestBuildError(
            f"no {boot_dir}/vmlinuz-*-cloud-amd64 with modules: install linux-image-cloud-amd64"
        )
    version, kernel = max(kernels, key=lambda kv: version_key(kv[0]))
    if not os.access(kernel, os.R_OK):
        raise GuestBuildError(f"{kernel} is not readable (build as root)")
    if not BUSYBOX.is_file():
        raise GuestBuildError(f"{BUSYBOX} missing: install busybox-static")
    with BUSYBOX.open("rb") as f:
        if not is_static_elf(f.read(4096)):
            raise GuestBuildError(f"{BUSYBOX} is not statically linked: install busybox-static")
    banner = run([str(BUSYBOX), "--help"], check=False, timeout=10)
    for needed, package in ((MBR_BIN, "syslinux-common"), (LDLINUX_C32, "syslinux-common")):
        if not needed.is_file():
            raise GuestBuildError(f"{needed} missing: install {package}")
    return BuildInputs(
        kernel=kernel,
        kernel_version=version,
        modules_dir=modules_root / version,
        busybox=BUSYBOX,
        busybox_version=parse_busybox_version(banner.stdout + banner.stderr),
        mbr=MBR_BIN,
        files_dir=FILES_DIR,
    )


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _sha256_or_absent(path: str | None) -> str:
    return _sha256(Path(path)) if path and Path(path).is_file() else "absent"


def cache_key(inputs: BuildInputs) -> str:
    """The cache key of a build from ``inputs``: versions plus hashes of every file used.

    Hashing the guest's scripts means editing one rebuilds the image without anyone
    remembering to bump :data:`BUILDER_VERSION`.
    """
    digests = [
        ("kernel", _sha256(inputs.kernel)),
        ("busybox", _sha256(inputs.busybox)),
        ("mbr", _sha256(inputs.mbr)),
        ("extlinux", _sha256_or_absent(shutil.which("extlinux"))),
        ("isolinux", _sha256_or_absent(str(ISOLINUX_BIN))),
        ("builder", _sha256(Path(__file__))),
        ("bootformats", _sha256(Path(__file__).with_name("bootformats.py"))),
    ]
    for path in sorted(inputs.files_dir.rglob("*")):
        if path.is_file():
            digests.append((f"files/{path.relative_to(inputs.files_dir)}", _sha256(path)))
    return compute_cache_key(
        inputs.kernel_version, inputs.busybox_version, BUILDER_VERSION, digests
    )


# --------------------------------------------------------------------------- build steps


def _stage_rootfs(root: Path, inputs: BuildInputs) -> None:
    """Fill ``root`` with busybox, its applet links and the guest's files."""
    for d in ("bin", "sbin", "usr/bin", "usr/sbin", "dev", "proc", "sys", "run", "tmp",
              "root", "mnt", "var/lib/yun-guest", "var/log", "boot/extlinux", "lib/modules"):
        (root / d).mkdir(parents=True, exist_ok=True)
    (root / "tmp").chmod(0o1777)
    shutil.copy2(inputs.busybox, root / "bin/busybox")
    applets = run([str(inputs.busybox), "--list-full"], timeout=10).stdout.split()
    for applet in applets:
        link = root / applet
        if applet == "bin/busybox" or os.path.lexists(link):
            continue
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to("/bin/busybox")
    src = inputs.files_dir / "rootfs"
    for path in sorted(src.rglob("*")):
        dest = root / path.relative_to(src)
        if path.is_dir():
            dest.mkdir(parents=True, exist_ok=True)
            continue
        dest.parent.mkdir(parents=True, exist_ok=True)
        data = path.read_bytes()
        dest.write_bytes(data)
        # Scripts are recognised by their "#!" line: file modes do not survive every
        # way the package may be installed (wheels, sdists, copies).
        dest.chmod(0o755 if data.startswith(b"#!") else 0o644)
    (root / "www/seed").symlink_to("/run/yun-guest/seed")
    (root / "www/user-data.log").symlink_to("/var/lib/yun-guest/user-data.log")
    (root / "etc/hostname").write_text("yun-guest\n")


def _initramfs(root: Path, inputs: BuildInputs) -> bytes:
    """The gzip-compressed initramfs: the whole root tree plus /init and the modules."""
    entries: list[CpioEntry] = []
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if rel == "boot" or rel.startswith("boot/"):
            continue
        st = path.lstat()
        if stat.S_ISLNK(st.st_mode):
            entries.append(CpioEntry(rel, stat.S_IFLNK | 0o777, os.readlink(path).encode()))
        elif stat.S_ISDIR(st.st_mode):
            entries.append(CpioEntry(rel, stat.S_IFDIR | stat.S_IMODE(st.st_mode)))
        else:
            mode = stat.S_IFREG | stat.S_IMODE(st.st_mode)
            entries.append(CpioEntry(rel, mode, path.read_bytes()))
    entries.append(CpioEntry("dev/console", stat.S_IFCHR | 0o600, rdev=(5, 1)))
    entries.append(CpioEntry("newroot", stat.S_IFDIR | 0o755))
    entries.append(CpioEntry("init", stat.S_IFREG | 0o755,
                             (inputs.files_dir / "initramfs/init").read_bytes()))
    modules = resolve_modules(
        (inputs.modules_dir / "modules.dep").read_text(),
        (inputs.modules_dir / "modules.builtin").read_text(),
        REQUIRED_MODULES,
        OPTIONAL_MODULES,
    )
    entries.append(CpioEntry("lib/modules/yun", stat.S_IFDIR | 0o755))
    names = []
    for rel in modules:
        name = Path(rel).name.removesuffix(".ko")
        names.append(name)
        entries.append(CpioEntry(f"lib/modules/yun/{name}.ko", stat.S_IFREG | 0o644,
                                 (inputs.modules_dir / rel).read_bytes()))
    entries.append(CpioEntry("lib/modules/yun/load-order", stat.S_IFREG | 0o644,
                             ("\n".join(names) + "\n").encode()))
    # gzip: every kernel unpacks it; the default level keeps the build quick.
    return gzip.compress(newc_archive(entries), compresslevel=6, mtime=0)


@contextlib.contextmanager
def loop_mount(image: Path, offset: int, size: int, mountpoint: Path) -> Iterator[Path]:
    """Mount the ext4 file system at ``offset`` in ``image``; always unmount and detach."""
    device = run(["losetup", "--find", "--show", "--offset", str(offset),
                  "--sizelimit", str(size), str(image)], timeout=30).stdout.strip()
    try:
        mountpoint.mkdir(parents=True, exist_ok=True)
        run(["mount", "-t", "ext4", device, str(mountpoint)], timeout=30)
        try:
            yield mountpoint
        finally:
            if run(["umount", str(mountpoint)], timeout=60, check=False).returncode != 0:
                # Busy: detach it lazily rather than leave a mount behind.
                run(["umount", "--lazy", str(mountpoint)], timeout=60, check=False)
    finally:
        run(["losetup", "--detach", device], timeout=30, check=False)


def remove_stale_builds(cache_dir: Path, pattern: str = ".build-*") -> None:
    """Undo what a killed build left: mounts, loop devices, work directories.

    Called with the build lock of ``pattern``'s builds held, so no directory
    matching it belongs to a live build. Each image kind has its own pattern (and
    lock): the test guest's ``.build-*`` never matches another builder's work.
    """
    for stale in cache_dir.glob(pattern):
        prefix = str(stale) + "/"
        with contextlib.suppress(OSError):
            # Deepest first: a build may leave mounts inside mounts (chroot /proc).
            mounts = [line.split()[1] for line in
                      Path("/proc/mounts").read_text().splitlines()]
            for mountpoint in sorted(mounts, key=len, reverse=True):
                if mountpoint.startswith(prefix):
                    run(["umount", "--lazy", mountpoint], timeout=60, check=False)
        raw = stale / "disk.raw"
        if raw.exists():
            found = run(["losetup", "--associated", str(raw)], timeout=30, check=False)
            for line in found.stdout.splitlines():
                device = line.partition(":")[0]
                if device.startswith("/dev/loop"):
                    run(["losetup", "--detach", device], timeout=30, check=False)
        shutil.rmtree(stale, ignore_errors=True)


def write_boot_disk(
    root: Path,
    workdir: Path,
    qcow2: Path,
    *,
    size_mib: int,
    label: str,
    disk_id_seed: str,
    mbr: Path = MBR_BIN,
    compress: bool = False,
) -> None:
    """Make a BIOS-bootable qcow2 at ``qcow2`` from the staged tree ``root``.

    ``root`` must hold ``boot/extlinux/extlinux.conf`` and whatever it names. The
    disk gets an MBR with one bootable partition at 1 MiB spanning the disk, an ext4
    file system labelled ``label`` filled from ``root``, and extlinux installed on
    it. ``disk_id_seed`` makes the MBR disk id reproducible. Needs root (a loop
    mount for extlinux); the raw image is ``workdir/disk.raw``. ``compress`` makes a
    zlib-compressed qcow2 (smaller, slower to write; reads stay fast).
    """
    raw = workdir / "disk.raw"
    total = size_mib << 20
    offset = PART_START_SECTOR * SECTOR
    part_size = total - offset
    with raw.open("wb") as f:
        f.truncate(total)
        seed = hashlib.sha256(disk_id_seed.encode()).digest()
        disk_id = int.from_bytes(seed[:4], "little")
        f.write(mbr_sector(mbr.read_bytes()[:440], PART_START_SECTOR,
                           part_size // SECTOR, disk_id))
    # mke2fs writes straight into the partition (-E offset) and fills it from the
    # staged tree (-d): no mount, no copy. nodiscard: never punch the MBR's file.
    run(["mkfs.ext4", "-F", "-q", "-L", label, "-b", "4096", "-m", "1",
         "-E", f"offset={offset},nodiscard", "-d", str(root), str(raw),
         f"{part_size // 1024}k"], timeout=600)
    with loop_mount(raw, offset, part_size, workdir / "mnt") as mnt:
        # extlinux reads the loop device's offset to fill in the boot sector's
        # "hidden sectors" (partition start) itself.
        run(["extlinux", "--install", str(mnt / "boot/extlinux")], timeout=60)
    tmp = workdir / "image.qcow2"  # moved into place whole: readers never see half
    run(["qemu-img", "convert", *(["-c"] if compress else []), "-f", "raw", "-O", "qcow2",
         str(raw), str(tmp)], timeout=600)
    tmp.chmod(0o644)  # libvirt's qemu user reads it as a backing file
    os.replace(tmp, qcow2)
    raw.unlink()


def build_image(inputs: BuildInputs, workdir: Path, qcow2: Path, iso: Path | None = None) -> None:
    """Build the disk image into ``qcow2`` (and the ISO into ``iso``), using ``workdir``.

    Needs root: extlinux installs onto a mounted file system (a loop device).
    """
    if os.geteuid() != 0:
        raise GuestBuildError("building the test guest needs root (loop device, mount)")
    for tool in ("mkfs.ext4", "losetup", "mount", "extlinux", "qemu-img"):
        if shutil.which(tool) is None:
            raise GuestBuildError(f"{tool} not found")
    root = workdir / "root"
    _stage_rootfs(root, inputs)
    initrd = _initramfs(root, inputs)
    (root / "boot/initrd.img").write_bytes(initrd)
    shutil.copyfile(inputs.kernel, root / "boot/vmlinuz")
    template = (inputs.files_dir / "extlinux.conf").read_text()
    (root / "boot/extlinux/extlinux.conf").write_text(
        render_extlinux_conf(template, "/boot/vmlinuz", "/boot/initrd.img", kernel_args())
    )

    # A fixed disk id per kernel: reproducible, and nothing here relies on it.
    write_boot_disk(root, workdir, qcow2, size_mib=DISK_SIZE_MIB, label=ROOT_LABEL,
                    disk_id_seed=inputs.kernel_version, mbr=inputs.mbr)
    if iso is not None:
        build_iso(root / "boot/vmlinuz", root / "boot/initrd.img", workdir / "iso", iso, template)


def build_iso(kernel: Path, initrd: Path, staging: Path, iso: Path, template: str,
              *, args: Sequence[str] | None = None, volume_id: str = ISO_VOLUME_ID) -> None:
    """An isolinux ISO booting the guest from its initramfs (``yun.live``, no disk state).

    ``args``: another kernel command line (the installer's); whatever ``staging``
    already holds goes onto the ISO too (the installer's payload).
    """
    if not ISOLINUX_BIN.is_file() or shutil.which("genisoimage") is None:
        raise GuestBuildError("the ISO needs the isolinux and genisoimage packages")
    (staging / "isolinux").mkdir(parents=True, exist_ok=True)
    (staging / "boot").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(ISOLINUX_BIN, staging / "isolinux/isolinux.bin")
    shutil.copyfile(LDLINUX_C32, staging / "isolinux/ldlinux.c32")
    shutil.copyfile(kernel, staging / "boot/vmlinuz")
    shutil.copyfile(initrd, staging / "boot/initrd.img")
    (staging / "isolinux/isolinux.cfg").write_text(
        render_extlinux_conf(template, "/boot/vmlinuz", "/boot/initrd.img",
                             kernel_args(live=True) if args is None else args)
    )
    tmp = staging.parent / f"{staging.name}.iso"
    run(["genisoimage", "-quiet", "-o", str(tmp), "-V", volume_id, "-R", "-J",
         "-b", "isolinux/isolinux.bin", "-c", "isolinux/boot.cat", "-no-emul-boot",
         "-boot-load-size", "4", "-boot-info-table", str(staging)], timeout=60)
    tmp.chmod(0o644)
    os.replace(tmp, iso)


def build_installer_iso(inputs: BuildInputs, workdir: Path, qcow2: Path, iso: Path) -> int:
    """Build the installer ISO into ``iso``: the live ISO's kernel and initramfs booted
    with ``yun.install``, carrying the disk image ``qcow2`` as its payload.

    The payload is made from the built qcow2 itself (not rebuilt), so what the
    installer writes is exactly the image VMs clone. Returns the payload's chunks.
    """
    if shutil.which("qemu-img") is None:
        raise GuestBuildError("qemu-img not found")
    root = workdir / "installer-root"
    _stage_rootfs(root, inputs)
    staging = workdir / "installer"
    staging.mkdir(parents=True, exist_ok=True)
    initrd = workdir / "installer-initrd.img"
    initrd.write_bytes(_initramfs(root, inputs))
    raw = workdir / "installer-disk.raw"
    run(["qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(qcow2), str(raw)], timeout=600)
    chunks = write_install_payload(raw, staging / INSTALL_DIR)
    raw.unlink()
    template = (inputs.files_dir / "extlinux.conf").read_text()
    build_iso(inputs.kernel, initrd, staging, iso, template,
              args=kernel_args(install=True), volume_id=INSTALLER_VOLUME_ID)
    return chunks


# --------------------------------------------------------------------------- the cache


@contextlib.contextmanager
def locked(cache_dir: Path, name: str = ".lock") -> Iterator[None]:
    """Serialise builds: parallel test workers wait for one build instead of racing."""
    with (cache_dir / name).open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def prune_builds(
    cache_dir: Path,
    prefix: str,
    keep: int,
    min_age: float = PRUNE_AFTER_S,
    suffixes: Sequence[str] = (".qcow2", ".iso", ".json"),
) -> None:
    """Delete the builds named ``<prefix><key>`` beyond the ``keep`` newest that are
    older than ``min_age`` seconds (a build is its ``.json`` manifest plus its files).

    The age guard matters: VMs of a test run (libvirt domains too) use the cached
    qcow2 as their backing file, and a day-old build is one nobody boots any more.
    """
    manifests = sorted(cache_dir.glob(f"{prefix}*.json"), key=lambda p: p.stat().st_mtime)
    now = time.time()
    for manifest in manifests[:-keep] if keep else manifests:
        if now - manifest.stat().st_mtime < min_age:
            continue
        stem = manifest.name.removesuffix(".json")
        for suffix in suffixes:
            (cache_dir / (stem + suffix)).unlink(missing_ok=True)


def _prune(cache_dir: Path, keep: int, min_age: float = PRUNE_AFTER_S) -> None:
    """Prune the test guest's own builds (``yun-guest-<key>``)."""
    prune_builds(cache_dir, "yun-guest-", keep, min_age,
                 suffixes=(".qcow2", ".iso", INSTALLER_SUFFIX, ".json"))


def update_link(cache_dir: Path, name: str, target: str) -> None:
    """Point the stable symlink ``cache_dir/name`` at ``target`` atomically."""
    link = cache_dir / name
    tmp_link = cache_dir / f".{name}.link"
    tmp_link.unlink(missing_ok=True)
    tmp_link.symlink_to(target)
    os.replace(tmp_link, link)


def _ensure(cache_dir: Path | None, want_iso: bool, want_installer: bool = False
            ) -> tuple[Path, Path | None, Path | None]:
    cache_dir = Path(cache_dir) if cache_dir is not None else DEFAULT_CACHE_DIR
    cache_dir.mkdir(parents=True, exist_ok=True)
    inputs = find_inputs()
    key = cache_key(inputs)
    qcow2 = cache_dir / f"yun-guest-{key}.qcow2"
    iso = cache_dir / f"yun-guest-{key}.iso"
    installer = cache_dir / f"yun-guest-{key}{INSTALLER_SUFFIX}"
    manifest = cache_dir / f"yun-guest-{key}.json"
    can_iso = ISOLINUX_BIN.is_file() and shutil.which("genisoimage") is not None
    if (want_iso or want_installer) and not can_iso:
        raise GuestBuildError("the ISO needs the isolinux and genisoimage packages")

    def built() -> bool:
        return manifest.is_file() and qcow2.is_file() and (iso.is_file() or not want_iso)

    def ready() -> bool:
        return built() and (installer.is_file() or not want_installer)

    answer = (qcow2, iso if want_iso else None, installer if want_installer else None)
    if ready():
        return answer
    with locked(cache_dir):
        if built() and not ready():
            # An older build of the same key without the installer (it was removed):
            # add it from the qcow2 as it is. Never rebuild the qcow2 here, VMs of a
            # test run may use it as their backing file.
            remove_stale_builds(cache_dir)
            with tempfile.TemporaryDirectory(prefix=".build-", dir=cache_dir) as tmp:
                build_installer_iso(inputs, Path(tmp), qcow2, installer)
            log.info("built the test guest's installer ISO", extra={"key": key})
        if not ready():  # another process may have built it while we waited
            remove_stale_builds(cache_dir)
            started = time.monotonic()
            log.info("building test guest", extra={"key": key, "kernel": inputs.kernel_version})
            with tempfile.TemporaryDirectory(prefix=".build-", dir=cache_dir) as tmp:
                build_image(inputs, Path(tmp), qcow2, iso if can_iso else None)
                chunks = (build_installer_iso(inputs, Path(tmp), qcow2, installer)
                          if can_iso else None)
            info = {
                "key": key,
                "kernel_version": inputs.kernel_version,
                "busybox_version": inputs.busybox_version,
                "builder_version": BUILDER_VERSION,
                "build_seconds": round(time.monotonic() - started, 2),
                "qcow2": qcow2.name,
                "iso": iso.name if can_iso else None,
                "installer_iso": installer.name if can_iso else None,
                "installer_chunks": chunks,
                "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            }
            manifest.write_text(json.dumps(info, indent=2) + "\n")
            # A stable name for people and scripts; tests should use the keyed path.
            update_link(cache_dir, "yun-guest.qcow2", qcow2.name)
            _prune(cache_dir, KEEP_BUILDS)
    return answer


def ensure_guest_image(cache_dir: Path | None = None) -> Path:
    """Path of the cached test guest qcow2, built first if the inputs changed.

    Never modify the returned file: boot it through an overlay (qcow2 with it as
    backing file) or QEMU's snapshot mode. Raises :class:`GuestBuildError` when the
    host lacks a package or root rights.
    """
    return _ensure(cache_dir, want_iso=False)[0]


def ensure_guest_iso(cache_dir: Path | None = None) -> Path:
    """Path of the cached bootable ISO of the test guest (runs from RAM, no disk state)."""
    iso = _ensure(cache_dir, want_iso=True)[1]
    assert iso is not None
    return iso


def ensure_installer_iso(cache_dir: Path | None = None) -> Path:
    """Path of the cached installer ISO of the test guest (F-ISO).

    Booted (from its CD drive) with exactly one blank virtio disk, one whose first
    MiB is all zeros, it writes the test guest's disk image (:func:`ensure_guest_image`,
    byte for byte where it holds data) onto it, prints :data:`INSTALLED_MARKER` and
    powers off; with none, or several, it prints :data:`NO_INSTALL_MARKER` and runs
    as the live ISO does.
    """
    installer = _ensure(cache_dir, want_iso=False, want_installer=True)[2]
    assert installer is not None
    return installer


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: ``build`` prints the image's (or ISO's) path; ``boot`` tries it.

    ``python -m yun.testing.guest build [--cache-dir DIR] [--iso | --installer]``
    (``--all``: the disk, the ISO and the installer ISO, one path a line)
    ``python -m yun.testing.guest boot [--cache-dir DIR] [--iso | --installer]`` boots it
    under bare QEMU, prints the time to ``YUN-GUEST-READY`` and the guest's HTTP facts,
    then presses the power button. ``--installer`` first installs onto a blank disk.
    """
    parser = argparse.ArgumentParser(prog="python -m yun.testing.guest")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, text in (("build", "build (or find in the cache) the test guest image"),
                       ("boot", "boot the cached image under bare QEMU and power it off")):
        cmd = sub.add_parser(name, help=text)
        cmd.add_argument("--cache-dir", type=Path, default=None,
                         help=f"cache directory (default {DEFAULT_CACHE_DIR})")
        kind = cmd.add_mutually_exclusive_group()
        kind.add_argument("--iso", action="store_true", help="the ISO instead of the disk")
        kind.add_argument("--installer", action="store_true",
                          help="the installer ISO (F-ISO) instead of the disk")
        if name == "build":
            kind.add_argument("--all", action="store_true",
                              help="the disk, the ISO and the installer ISO")
    args = parser.parse_args(argv)
    try:
        if args.command == "build" and args.all:
            print("\n".join(str(p) for p in _ensure(args.cache_dir, True, True) if p))
            return 0
        if args.iso:
            path = ensure_guest_iso(args.cache_dir)
        elif args.installer:
            path = ensure_installer_iso(args.cache_dir)
        else:
            path = ensure_guest_image(args.cache_dir)
    except GuestBuildError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if args.command == "build":
        print(path)
        return 0
    if args.installer:
        return _try_installer(path)
    from yun.testing.qemu import boot_guest  # qemu imports this module

    started = time.monotonic()
    disk, cdrom = (None, path) if args.iso else (path, None)
    with boot_guest(disk, cdrom=cdrom, boot_cdrom=args.iso) as g:
        print(f"{READY_MARKER} after {time.monotonic() - started:.2f} s; "
              f"serial log {g.serial_log}; HTTP on 127.0.0.1:{g.http_port}")
        print(g.http_get("/"), end="")
        started = time.monotonic()
        g.powerdown()
        code = g.wait_exit(60)
        print(f"power button: QEMU exited {code} after {time.monotonic() - started:.2f} s")
    return 0 if code == 0 else 1


def _try_installer(installer: Path) -> int:
    """Install onto a blank 1 GiB disk under bare QEMU, then boot that disk."""
    from yun.testing.qemu import boot_guest  # qemu imports this module

    with tempfile.TemporaryDirectory(prefix="yun-install-") as tmp:
        disk = Path(tmp) / "blank.qcow2"
        run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "1G"], timeout=30)
        started = time.monotonic()
        with boot_guest(disk, writable=True, cdrom=installer, boot_cdrom=True,
                        marker=INSTALLED_MARKER, workdir=Path(tmp) / "install") as g:
            print(f"{INSTALLED_MARKER} after {time.monotonic() - started:.2f} s")
            code = g.wait_exit(60)
            print(f"installer powered off (QEMU exited {code}) after "
                  f"{time.monotonic() - started:.2f} s")
        started = time.monotonic()
        with boot_guest(disk, writable=True, workdir=Path(tmp) / "boot") as g:
            print(f"{READY_MARKER} from the installed disk after "
                  f"{time.monotonic() - started:.2f} s")
            print(g.http_get("/"), end="")
            g.powerdown()
            code = g.wait_exit(60)
    return 0 if code == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
