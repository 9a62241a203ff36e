"""Builder of a real Debian 12 cloud guest for system tests: cloud-init, sshd, DHCP.

The project's own test guest (:mod:`yun.testing.guest`) is a busybox system that
mimics what a cloud image does with a NoCloud seed. This one *is* a cloud image: a
``debootstrap --variant=minbase`` of Debian 12 (bookworm) with

* ``linux-image-cloud-amd64`` and an initramfs-tools initramfs holding only the
  virtio modules the root disk needs (no resume device: the initramfs does not
  wait for one);
* ``cloud-init`` limited to the NoCloud data source (``datasource_list: [ NoCloud,
  None ]``): it never probes metadata services, and runs a short module list (no
  locale generation, no apt) so a TCG boot stays short; ``ed25519`` host keys only
  (RSA key generation takes seconds under TCG);
* ``openssh-server`` (cloud-init's default user ``debian`` gets the seed's keys);
* systemd-networkd taking DHCP on the first NIC (``eth0``: ``net.ifnames=0``),
  ``systemd-networkd-wait-online`` bounded to a few seconds, and the timers and
  units a throw-away VM has no use for masked;
* extlinux on an MBR disk, made with the test guest's helpers
  (:func:`yun.testing.guest.write_boot_disk`); serial console on ``ttyS0``.

Documentation, manual pages and translations are kept out by a ``dpkg``
``path-exclude`` file written before the packages are unpacked.

Nothing is downloaded when tests run: ``scripts/setup.sh`` builds the image once
from the apt mirror this machine's apt uses, into the test guest's cache directory
(``/var/cache/yun/test-guest``) under its own key and lock. Tests call
:func:`ensure_debian_image`, which returns the cached image, and builds it only when
its key changed (minutes, and it needs the mirror).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from yun.testing.guest import (
    DEFAULT_CACHE_DIR,
    FILES_DIR,
    MBR_BIN,
    GuestBuildError,
    locked,
    prune_builds,
    remove_stale_builds,
    render_extlinux_conf,
    update_link,
    version_key,
    write_boot_disk,
)
from yun.util.run import CommandError, run

log = logging.getLogger("yun.testing.debian_guest")

#: Bump when the build changes in a way the hash of this file does not show.
BUILDER_VERSION = 1

SUITE = "bookworm"
ROOT_LABEL = "debroot"
DISK_SIZE_MIB = 2048  # virtual size; the qcow2 file holds only what is used
NAME_PREFIX = "debian-12-"
LOCK_NAME = ".debian.lock"
BUILD_PREFIX = ".debian-build-"  # never matches the test guest's ".build-*"
KEEP_BUILDS = 2
DEFAULT_USER = "debian"  # cloud-init's default user on Debian
APT_SOURCES = (Path("/etc/apt/sources.list"), Path("/etc/apt/sources.list.d"))
KEYRING = Path("/usr/share/keyrings/debian-archive-keyring.gpg")

#: Packages on top of minbase (their dependencies come along, except those only
#: reached through a virtual package, which debootstrap does not resolve: hence
#: python3-cffi-backend, for python3-cryptography's "python3-cffi-backend-api-*").
PACKAGES = (
    "systemd-sysv", "udev", "dbus", "kmod", "iproute2", "netbase",
    "initramfs-tools", "linux-image-cloud-amd64",
    "cloud-init", "python3-cffi-backend", "openssh-server", "sudo",
)

#: Kept out of every package: what a test VM never reads.
DPKG_EXCLUDES = """\
# Written by yun.testing.debian_guest: keep the image small.
path-exclude=/usr/share/doc/*
path-include=/usr/share/doc/*/copyright
path-exclude=/usr/share/man/*
path-exclude=/usr/share/info/*
path-exclude=/usr/share/locale/*
path-include=/usr/share/locale/locale.alias
path-exclude=/usr/share/lintian/*
path-exclude=/usr/share/linda/*
"""

#: Modules the initramfs needs to find the root disk (the cloud kernel builds them as
#: modules); ``MODULES=list`` keeps everything else out of it.
INITRAMFS_MODULES = ("virtio_pci", "virtio_blk", "virtio_scsi", "sd_mod", "ext4")

#: Units a short-lived test VM has no use for; they cost seconds under TCG.
MASKED_UNITS = (
    "apt-daily.timer", "apt-daily-upgrade.timer", "e2scrub_all.timer",
    "e2scrub_reap.service", "fstrim.timer", "dpkg-db-backup.timer",
    "getty@tty1.service", "systemd-journal-flush.service",
)

KERNEL_ARGS = (
    f"root=LABEL={ROOT_LABEL}", "rw",
    "console=ttyS0,115200n8",
    "net.ifnames=0",  # the first NIC is eth0, whatever its PCI slot
    "noresume",  # no swap to resume from: do not wait for one
    "mitigations=off",  # a throw-away test VM; the mitigations slow TCG down
    "random.trust_cpu=on",  # entropy at once for sshd and cloud-init
    "panic=10",
)

CLOUD_CFG = """\
# Written by yun.testing.debian_guest: NoCloud only, short module lists for TCG.
datasource_list: [ NoCloud, None ]
# The image takes DHCP on eth0 itself (systemd-networkd).
network: {config: disabled}
ssh_genkeytypes: [ed25519]
ssh_deletekeys: true
ssh_pwauth: false
cloud_init_modules:
  - seed_random
  - bootcmd
  - write_files
  - resizefs
  - disk_setup
  - mounts
  - set_hostname
  - update_hostname
  - update_etc_hosts
  - users_groups
  - ssh
cloud_config_modules:
  - set_passwords
  - timezone
  - runcmd
cloud_final_modules:
  - scripts_vendor
  - scripts_per_once
  - scripts_per_boot
  - scripts_per_instance
  - scripts_user
  - ssh_authkey_fingerprints
  - keys_to_console
  - final_message
"""

NETWORK_UNIT = """\
# Written by yun.testing.debian_guest: DHCP on the first NIC.
[Match]
Name=eth0

[Network]
DHCP=ipv4
LinkLocalAddressing=no
IPv6AcceptRA=no
"""

WAIT_ONLINE_DROPIN = """\
# Written by yun.testing.debian_guest: cloud-init waits for this; never long.
[Service]
ExecStart=
ExecStart=/lib/systemd/systemd-networkd-wait-online --any --timeout=15
"""

INITRAMFS_CONF = """\
# Written by yun.testing.debian_guest.
MODULES=list
COMPRESS=gzip
RESUME=none
"""

JOURNALD_CONF = """\
# Written by yun.testing.debian_guest: a test VM's journal lives in RAM.
[Journal]
Storage=volatile
"""

#: What the guest prints on its serial console when cloud-init is done.
CLOUD_INIT_DONE = "Cloud-init v."  # "... finished at ..." by final_message


# --------------------------------------------------------------------------- pure parts


def parse_apt_sources(texts: Iterable[str]) -> list[tuple[str, list[str], list[str]]]:
    """``(uri, suites, components)`` of every ``deb`` source in one-line
    (``sources.list``) or deb822 (``*.sources``) files' texts."""
    found: list[tuple[str, list[str], list[str]]] = []
    for text in texts:
        for line in text.splitlines():
            line = line.split("#", 1)[0].strip()
            m = re.match(r"^deb\s+(?:\[[^\]]*\]\s+)?(\S+)\s+(\S+)\s*(.*)$", line)
            if m:
                found.append((m.group(1), [m.group(2)], m.group(3).split()))
        for stanza in re.split(r"\n\s*\n", text):
            fields: dict[str, str] = {}
            for line in stanza.splitlines():
                if line.lstrip().startswith("#"):
                    continue
                key, sep, value = line.partition(":")
                if sep and not line[:1].isspace() and key.strip():
                    fields[key.strip().lower()] = value.strip()
            if "uris" not in fields or "deb" not in fields.get("types", "").split():
                continue
            if fields.get("enabled", "yes").lower() == "no":
                continue
            for uri in fields["uris"].split():
                found.append((uri, fields.get("suites", "").split(),
                              fields.get("components", "").split()))
    return found


def find_mirror(texts: Iterable[str], suite: str = SUITE) -> str:
    """The URI of the Debian archive serving ``suite`` (not -updates or -security)
    with its ``main`` component, from apt's source files' texts.

    Raises :class:`GuestBuildError` when no source has it.
    """
    for uri, suites, components in parse_apt_sources(texts):
        if suite in suites and "main" in components:
            return uri.rstrip("/")
    raise GuestBuildError(
        f"no apt source serves Debian {suite} main (read {', '.join(map(str, APT_SOURCES))})"
    )


def host_mirror() -> str:
    """The Debian mirror of this machine's apt (``YUN_DEBIAN_MIRROR`` overrides it)."""
    if os.environ.get("YUN_DEBIAN_MIRROR"):
        return os.environ["YUN_DEBIAN_MIRROR"].rstrip("/")
    texts: list[str] = []
    for source in APT_SOURCES:
        files = sorted(source.glob("*.list")) + sorted(source.glob("*.sources")) \
            if source.is_dir() else [source]
        for f in files:
            with contextlib.suppress(OSError):
                texts.append(f.read_text(errors="replace"))
    return find_mirror(texts)


def compute_cache_key(mirror: str, builder_digest: str, boot_digests: Sequence[str],
                      builder_version: int = BUILDER_VERSION) -> str:
    """A short stable key for one build: the mirror, the package list, the kernel
    command line, the builder's source and the boot loader files."""
    h = hashlib.sha256()
    h.update(f"debian-guest\0{builder_version}\0{SUITE}\0{mirror}\0".encode())
    h.update("\0".join(PACKAGES).encode() + b"\0" + " ".join(KERNEL_ARGS).encode() + b"\0")
    h.update(builder_digest.encode())
    for digest in boot_digests:
        h.update(b"\0" + digest.encode())
    return h.hexdigest()[:16]


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def cache_key(mirror: str) -> str:
    """The cache key of a build from ``mirror`` on this host."""
    extlinux = shutil.which("extlinux")
    boot = [_sha256(MBR_BIN) if MBR_BIN.is_file() else "absent",
            _sha256(Path(extlinux)) if extlinux else "absent",
            _sha256(FILES_DIR / "extlinux.conf")]
    return compute_cache_key(mirror, _sha256(Path(__file__)), boot)


def newest_kernel(boot_dir: Path) -> str:
    """The version of the newest ``vmlinuz-*`` in ``boot_dir`` having an initrd."""
    versions = [p.name.removeprefix("vmlinuz-") for p in boot_dir.glob("vmlinuz-*")
                if (boot_dir / f"initrd.img-{p.name.removeprefix('vmlinuz-')}").is_file()]
    if not versions:
        raise GuestBuildError(f"no kernel with an initrd in {boot_dir}")
    return max(versions, key=version_key)


def debootstrap_log_tail(log_file: Path, lines: int = 15) -> str:
    """The last ``lines`` lines of debootstrap's own log (it names the failing
    package there, not on stderr), or a note that there is none."""
    try:
        text = log_file.read_text(errors="replace")
    except OSError:
        return f"(no {log_file})"
    return "\n".join(text.splitlines()[-lines:])


# --------------------------------------------------------------------------- build steps


def _write(root: Path, rel: str, text: str, mode: int = 0o644) -> None:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(mode)


@contextlib.contextmanager
def _proc_mounted(root: Path) -> Iterator[None]:
    """/proc in the chroot for update-initramfs; always unmounted."""
    (root / "proc").mkdir(exist_ok=True)
    run(["mount", "-t", "proc", "proc", str(root / "proc")], timeout=30)
    try:
        yield
    finally:
        if run(["umount", str(root / "proc")], timeout=60, check=False).returncode != 0:
            run(["umount", "--lazy", str(root / "proc")], timeout=60, check=False)


def _configure(root: Path) -> str:
    """Turn the debootstrapped tree into a fast-booting NoCloud image; its kernel version."""
    _write(root, "etc/fstab", f"LABEL={ROOT_LABEL} / ext4 rw,errors=remount-ro 0 0\n")
    _write(root, "etc/hostname", "debian\n")
    _write(root, "etc/hosts", "127.0.0.1 localhost\n127.0.1.1 debian\n"
                              "::1 localhost ip6-localhost ip6-loopback\n")
    _write(root, "etc/cloud/cloud.cfg.d/90-yun.cfg", CLOUD_CFG)
    _write(root, "etc/systemd/network/20-eth0.network", NETWORK_UNIT)
    _write(root, "etc/systemd/system/systemd-networkd-wait-online.service.d/yun.conf",
           WAIT_ONLINE_DROPIN)
    _write(root, "etc/systemd/journald.conf.d/yun.conf", JOURNALD_CONF)
    _write(root, "etc/initramfs-tools/conf.d/yun.conf", INITRAMFS_CONF)
    _write(root, "etc/initramfs-tools/modules", "\n".join(INITRAMFS_MODULES) + "\n")
    run(["systemctl", f"--root={root}", "enable", "systemd-networkd.service"], timeout=60)
    run(["systemctl", f"--root={root}", "mask", *MASKED_UNITS], timeout=60)
    with _proc_mounted(root):
        run(["chroot", str(root), "update-initramfs", "-u", "-k", "all"], timeout=600)
    # Every VM gets its own host keys (cloud-init makes them), machine id and logs.
    for key in (root / "etc/ssh").glob("ssh_host_*"):
        key.unlink()
    (root / "etc/machine-id").write_text("")
    (root / "var/lib/dbus/machine-id").unlink(missing_ok=True)
    _write(root, "etc/resolv.conf", "")
    # A server has no graphical target to reach.
    run(["systemctl", f"--root={root}", "set-default", "multi-user.target"], timeout=60)
    # debootstrap's first stage unpacks the base packages without dpkg, so the
    # excludes did not apply to them: remove what they brought.
    for junk in ("var/cache/apt/archives", "var/lib/apt/lists", "var/log",
                 "usr/share/doc", "usr/share/man", "usr/share/info", "usr/share/locale"):
        for path in (root / junk).glob("*"):
            # Keep the copyright files (the dpkg excludes kept them too).
            if junk == "usr/share/doc" and (path / "copyright").is_file():
                for extra in path.iterdir():
                    if extra.name != "copyright":
                        (shutil.rmtree if extra.is_dir() else Path.unlink)(extra)
                continue
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            elif path.name not in ("lock", "locale.alias"):
                path.unlink()
    return newest_kernel(root / "boot")


def build_image(mirror: str, workdir: Path, qcow2: Path) -> str:
    """debootstrap Debian 12 from ``mirror`` in ``workdir``, configure it and write
    the bootable disk to ``qcow2``. Returns the guest's kernel version. Needs root."""
    if os.geteuid() != 0:
        raise GuestBuildError("building the Debian guest needs root (debootstrap, mount)")
    for tool, package in (("debootstrap", "debootstrap"), ("mkfs.ext4", "e2fsprogs"),
                          ("losetup", "util-linux"), ("extlinux", "extlinux"),
                          ("qemu-img", "qemu-utils")):
        if shutil.which(tool) is None:
            raise GuestBuildError(f"{tool} not found: install {package}")
    if not MBR_BIN.is_file():
        raise GuestBuildError(f"{MBR_BIN} missing: install syslinux-common")
    root = workdir / "root"
    # Before debootstrap unpacks anything, so that no package's docs land.
    _write(root, "etc/dpkg/dpkg.cfg.d/01-yun-nodoc", DPKG_EXCLUDES)
    argv = ["debootstrap", "--variant=minbase", f"--include={','.join(PACKAGES)}",
            "--components=main"]
    if KEYRING.is_file():
        argv.append(f"--keyring={KEYRING}")
    try:
        run([*argv, SUITE, str(root), mirror], timeout=3600)
    except CommandError as exc:
        raise GuestBuildError(
            f"debootstrap of Debian {SUITE} from {mirror} failed ({exc}); its log: "
            f"{debootstrap_log_tail(root / 'debootstrap/debootstrap.log')}") from exc
    try:
        kernel = _configure(root)
    except CommandError as exc:
        raise GuestBuildError(f"configuring the Debian guest failed: {exc}") from exc
    boot = root / "boot/extlinux"
    boot.mkdir(parents=True, exist_ok=True)
    (boot / "extlinux.conf").write_text(render_extlinux_conf(
        (FILES_DIR / "extlinux.conf").read_text(), f"/boot/vmlinuz-{kernel}",
        f"/boot/initrd.img-{kernel}", KERNEL_ARGS))
    # Compressed: the cache holds a third of the bytes; QEMU inflates clusters on the
    # host side (not emulated), and every boot writes to an overlay anyway.
    write_boot_disk(root, workdir, qcow2, size_mib=DISK_SIZE_MIB, label=ROOT_LABEL,
                    disk_id_seed=f"debian-{kernel}", compress=True)
    return kernel


# --------------------------------------------------------------------------- the cache


def _paths(cache_dir: Path | None) -> tuple[Path, str, Path, Path]:
    cache_dir = Path(cache_dir) if cache_dir is not None else DEFAULT_CACHE_DIR
    key = cache_key(host_mirror())
    return (cache_dir, key, cache_dir / f"{NAME_PREFIX}{key}.qcow2",
            cache_dir / f"{NAME_PREFIX}{key}.json")


def cached_debian_image(cache_dir: Path | None = None) -> Path | None:
    """The cached image for the current key, or None: never builds (tests use this, as
    they may not download anything; scripts/setup.sh builds the image)."""
    _, _, qcow2, manifest = _paths(cache_dir)
    return qcow2 if manifest.is_file() and qcow2.is_file() else None


def ensure_debian_image(cache_dir: Path | None = None) -> Path:
    """Path of the cached Debian 12 cloud guest qcow2, built first if its key changed.

    Never modify the returned file: boot it through an overlay. The build needs root
    and the Debian mirror of this machine's apt (scripts/setup.sh runs it); raises
    :class:`GuestBuildError` when it cannot be done.
    """
    cache_dir, key, qcow2, manifest = _paths(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    mirror = host_mirror()

    def ready() -> bool:
        return manifest.is_file() and qcow2.is_file()

    if ready():
        return qcow2
    with locked(cache_dir, LOCK_NAME):
        if not ready():  # another process may have built it while we waited
            remove_stale_builds(cache_dir, f"{BUILD_PREFIX}*")
            started = time.monotonic()
            log.info("building Debian guest", extra={"key": key, "mirror": mirror})
            with tempfile.TemporaryDirectory(prefix=BUILD_PREFIX, dir=cache_dir) as tmp:
                kernel = build_image(mirror, Path(tmp), qcow2)
            seconds = round(time.monotonic() - started, 1)
            manifest.write_text(json.dumps({
                "key": key, "suite": SUITE, "mirror": mirror, "kernel_version": kernel,
                "packages": list(PACKAGES), "builder_version": BUILDER_VERSION,
                "build_seconds": seconds, "qcow2": qcow2.name,
                "qcow2_bytes": qcow2.stat().st_size,
                "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            }, indent=2) + "\n")
            log.info("Debian guest built", extra={"key": key, "seconds": seconds,
                                                  "path": str(qcow2)})
            update_link(cache_dir, "debian-12.qcow2", qcow2.name)
            prune_builds(cache_dir, NAME_PREFIX, KEEP_BUILDS, suffixes=(".qcow2", ".json"))
    return qcow2


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m yun.testing.debian_guest [--cache-dir DIR]``: build (or find) the
    image and print its path."""
    parser = argparse.ArgumentParser(prog="python -m yun.testing.debian_guest",
                                     description="build (or find in the cache) the "
                                                 "Debian 12 cloud guest image")
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help=f"cache directory (default {DEFAULT_CACHE_DIR})")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        print(ensure_debian_image(args.cache_dir))
    except GuestBuildError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
