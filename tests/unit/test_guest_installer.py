"""The test guest's installer ISO (F-ISO) without QEMU: the payload the builder writes,
and the guest's own ``install`` script run by the host's busybox against disk files."""

from __future__ import annotations

import gzip
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.unit.test_guest_build import fake_inputs
from yun.testing import guest
from yun.testing.guest import (
    INSTALL_CHUNK,
    BuildInputs,
    GuestBuildError,
    kernel_args,
    write_install_payload,
)

MIB = 1 << 20
SCRIPT = guest.FILES_DIR / "rootfs/usr/libexec/yun-guest/install"
BUSYBOX = shutil.which("busybox")


def _image(path: Path, mib: int, data_at: dict[int, bytes]) -> bytes:
    """A raw image of ``mib`` MiB, zeros but for ``data_at`` (MiB index -> bytes there)."""
    image = bytearray(mib * MIB)
    for index, data in data_at.items():
        image[index * MIB:index * MIB + len(data)] = data
    path.write_bytes(image)
    return bytes(image)


# ---------------------------------------------------------------- the builder's payload


def test_payload_holds_the_non_zero_chunks_in_order(tmp_path: Path) -> None:
    image = _image(tmp_path / "disk.raw", 8, {0: b"\xfa MBR", 3: b"x" * MIB,
                                               7: b"\0" * 100 + b"end"})
    count = write_install_payload(tmp_path / "disk.raw", tmp_path / "out")
    assert count == 3
    lines = (tmp_path / "out/manifest").read_text().splitlines()
    assert lines[0] == f"yun-install {guest.INSTALL_FORMAT} {8 * MIB} {INSTALL_CHUNK}"
    assert lines[1:] == ["0", "3", "7"]
    stream = gzip.decompress((tmp_path / "out/disk.gz").read_bytes())
    assert stream == image[0:MIB] + image[3 * MIB:4 * MIB] + image[7 * MIB:8 * MIB]


def test_payload_is_reproducible(tmp_path: Path) -> None:
    _image(tmp_path / "disk.raw", 2, {1: b"data"})
    write_install_payload(tmp_path / "disk.raw", tmp_path / "a")
    write_install_payload(tmp_path / "disk.raw", tmp_path / "b")
    assert (tmp_path / "a/disk.gz").read_bytes() == (tmp_path / "b/disk.gz").read_bytes()


def test_payload_refuses_a_partial_chunk(tmp_path: Path) -> None:
    (tmp_path / "odd.raw").write_bytes(b"x" * (MIB + 1))
    with pytest.raises(GuestBuildError, match=r"odd\.raw.*whole number"):
        write_install_payload(tmp_path / "odd.raw", tmp_path / "out")


def test_installer_kernel_args_run_live_when_nothing_is_installed() -> None:
    args = kernel_args(install=True)
    assert args[:2] == ["yun.live", "yun.install"]
    assert not any(a.startswith("root=") for a in args)
    assert "yun.install" not in kernel_args(live=True) and "yun.install" not in kernel_args()


def test_init_runs_the_installer_only_with_yun_install_and_powers_off_after() -> None:
    init = (guest.FILES_DIR / "initramfs/init").read_text()
    hook = init[init.index('if [ -n "$install" ]'):init.index("find_root() {")]
    assert "/usr/libexec/yun-guest/install" in hook and "poweroff -f" in hook
    assert "yun.install) install=1" in init


# ---------------------------------------------------------------- the guest's script


@pytest.fixture
def payload(tmp_path: Path) -> tuple[Path, bytes]:
    """The payload of a 4 MiB image with data in MiBs 0, 2 and 3; and the image."""
    image = _image(tmp_path / "image.raw", 4, {0: b"\xfa boot", 2: os.urandom(MIB),
                                               3: b"tail" * 10})
    write_install_payload(tmp_path / "image.raw", tmp_path / "payload")
    return tmp_path / "payload", image


def _install(tmp_path: Path, payload_dir: Path, *disks: Path) -> tuple[int, str]:
    """Run the guest's install script under busybox (its applets, as in the guest)."""
    if BUSYBOX is None:
        pytest.skip("busybox not installed")
    console = tmp_path / "console"
    console.write_text("")
    env = {"PATH": "/usr/bin:/bin", "TMPDIR": str(tmp_path),
           "YUN_INSTALL_PAYLOAD": str(payload_dir),
           "YUN_INSTALL_DISKS": " ".join(str(d) for d in disks),
           "YUN_INSTALL_CONSOLE": str(console)}
    done = subprocess.run([BUSYBOX, "sh", str(SCRIPT)], env=env, capture_output=True,
                          timeout=60, check=False)
    return done.returncode, console.read_text()


def _disk(path: Path, mib: int, head: bytes = b"") -> Path:
    with path.open("wb") as f:
        f.truncate(mib * MIB)
        f.write(head)
    return path


def test_installs_onto_the_one_blank_disk(tmp_path: Path,
                                          payload: tuple[Path, bytes]) -> None:
    payload_dir, image = payload
    used = _disk(tmp_path / "vda", 8, b"an installed system")
    blank = _disk(tmp_path / "vdb", 8)
    before = used.read_bytes()
    code, console = _install(tmp_path, payload_dir, used, blank)
    assert code == 0, console
    assert f"{guest.INSTALLED_MARKER} {blank} chunks=3" in console
    written = blank.read_bytes()
    assert written[:len(image)] == image and written[len(image):] == bytes(4 * MIB)
    assert blank.stat().st_size == 8 * MIB  # conv=notrunc: the disk keeps its size
    assert used.read_bytes() == before  # a disk with data is never touched


@pytest.mark.parametrize("case", ["data", "two-blank", "too-small", "none"])
def test_no_single_blank_disk_touches_nothing(tmp_path: Path, payload: tuple[Path, bytes],
                                              case: str) -> None:
    payload_dir, _ = payload
    vda, vdb = tmp_path / "vda", tmp_path / "vdb"
    disks = {
        # One byte in the first MiB makes a disk "not blank", even past its MBR.
        "data": lambda: [_disk(vda, 8, b"\0" * (MIB - 1) + b"\1")],
        "two-blank": lambda: [_disk(vda, 8), _disk(vdb, 8)],
        "too-small": lambda: [_disk(vda, 2)],
        "none": lambda: [],
    }[case]()
    before = [d.read_bytes() for d in disks]
    code, console = _install(tmp_path, payload_dir, *disks)
    assert code == 1, console
    assert guest.NO_INSTALL_MARKER in console and guest.INSTALLED_MARKER not in console
    assert [d.read_bytes() for d in disks] == before
    if case == "too-small":
        assert "the image needs" in console
    if case == "two-blank":
        assert "2 blank virtio disks" in console


def test_a_short_payload_stream_fails_the_install(tmp_path: Path,
                                                  payload: tuple[Path, bytes]) -> None:
    payload_dir, _ = payload
    stream = gzip.decompress((payload_dir / "disk.gz").read_bytes())
    (payload_dir / "disk.gz").write_bytes(gzip.compress(stream[:2 * MIB]))  # 2 of 3 chunks
    code, console = _install(tmp_path, payload_dir, _disk(tmp_path / "vda", 8))
    assert code == 2 and "YUN-GUEST-INSTALL-FAILED" in console
    assert guest.INSTALLED_MARKER + " " not in console


def test_an_unknown_payload_format_installs_nothing(tmp_path: Path,
                                                    payload: tuple[Path, bytes]) -> None:
    payload_dir, _ = payload
    manifest = payload_dir / "manifest"
    manifest.write_text(manifest.read_text().replace("yun-install 1 ", "yun-install 9 ", 1))
    disk = _disk(tmp_path / "vda", 8)
    code, console = _install(tmp_path, payload_dir, disk)
    assert code == 1 and "unknown payload format" in console
    assert disk.read_bytes() == bytes(8 * MIB)


# ---------------------------------------------------------------- the cache



def test_a_missing_installer_is_added_without_rebuilding_the_disk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not guest.ISOLINUX_BIN.is_file() or shutil.which("genisoimage") is None:
        pytest.skip("isolinux or genisoimage not installed")
    images: list[Path] = []
    installers: list[Path] = []

    def fake_build(inputs: BuildInputs, workdir: Path, qcow2: Path,
                   iso: Path | None = None) -> None:
        images.append(qcow2)
        qcow2.write_bytes(b"QFI\xfb")
        if iso is not None:
            iso.write_bytes(b"iso")

    def fake_installer(inputs: BuildInputs, workdir: Path, qcow2: Path, iso: Path) -> int:
        assert qcow2.read_bytes() == b"QFI\xfb"  # made from the built disk image
        installers.append(iso)
        iso.write_bytes(b"installer")
        return 1

    inputs = fake_inputs(tmp_path)
    monkeypatch.setattr(guest, "find_inputs", lambda: inputs)
    monkeypatch.setattr(guest, "build_image", fake_build)
    monkeypatch.setattr(guest, "build_installer_iso", fake_installer)
    cache = tmp_path / "cache"

    installer = guest.ensure_installer_iso(cache)
    assert installer.name.endswith(guest.INSTALLER_SUFFIX) and installer.is_file()
    assert guest.ensure_guest_image(cache).read_bytes() == b"QFI\xfb"
    assert len(images) == 1 and len(installers) == 1

    qcow2 = images[0]
    stamp = qcow2.stat().st_mtime_ns, qcow2.stat().st_ino
    installer.unlink()
    assert guest.ensure_installer_iso(cache) == installer and installer.is_file()
    assert len(images) == 1 and len(installers) == 2
    assert (qcow2.stat().st_mtime_ns, qcow2.stat().st_ino) == stamp


def test_prune_removes_the_installer_with_its_build(tmp_path: Path) -> None:
    for i in range(2):
        for suffix in (".qcow2", ".json", guest.INSTALLER_SUFFIX):
            p = tmp_path / f"yun-guest-{i:016x}{suffix}"
            p.write_text("x")
            os.utime(p, (1000 + i, 1000 + i))
    guest._prune(tmp_path, 1)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        f"yun-guest-{1:016x}{s}" for s in (guest.INSTALLER_SUFFIX, ".json", ".qcow2")]
