"""Format detection of uploaded files, on real small images made with qemu-img."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from yun.storage.formats import ImageFormatError, detect_format, normalize_format
from yun.util import qemu_img
from yun.util.run import run

MIB = 1024 * 1024


def make(tmp_path: Path, name: str, fmt: str, size: str = "1M", *opts: str) -> Path:
    path = tmp_path / name
    run(["qemu-img", "create", "-q", "-f", fmt, *opts, str(path), size])
    return path


def fake_iso(tmp_path: Path) -> Path:
    path = tmp_path / "fake.iso"
    data = bytearray(64 * 1024)
    data[0x8000] = 1  # primary volume descriptor type, then the standard identifier
    data[0x8001:0x8006] = b"CD001"
    path.write_bytes(bytes(data))
    return path


# --- accepted -------------------------------------------------------------------


async def test_qcow2_is_detected(tmp_path: Path) -> None:
    path = make(tmp_path, "disk.qcow2", "qcow2", "2G")
    found = await detect_format(path)
    assert found.format == "qcow2"
    assert found.virtual_size == 2 * 1024**3
    assert found.size == path.stat().st_size


@pytest.mark.parametrize("fmt", ["vmdk", "vdi", "vhdx", "vpc"])
async def test_other_disk_formats_are_detected(tmp_path: Path, fmt: str) -> None:
    path = make(tmp_path, f"disk.{fmt}", fmt)
    found = await detect_format(path)
    assert found.format == fmt
    assert found.virtual_size >= MIB


async def test_declared_format_matching_is_accepted(tmp_path: Path) -> None:
    path = make(tmp_path, "disk.qcow2", "qcow2")
    assert (await detect_format(path, "QCOW2")).format == "qcow2"


async def test_raw_accepted_only_when_declared(tmp_path: Path) -> None:
    path = tmp_path / "disk.img"
    path.write_bytes(os.urandom(MIB))
    found = await detect_format(path, "raw")
    assert (found.format, found.size, found.virtual_size) == ("raw", MIB, MIB)
    with pytest.raises(ImageFormatError, match=r"declare format=raw"):
        await detect_format(path)
    with pytest.raises(ImageFormatError, match=r"declared qcow2 but qemu-img found no qcow2"):
        await detect_format(path, "qcow2")


async def test_raw_must_be_whole_sectors(tmp_path: Path) -> None:
    path = tmp_path / "odd.img"
    path.write_bytes(b"\0" * 1000)
    with pytest.raises(ImageFormatError, match=r"not a multiple of 512"):
        await detect_format(path, "raw")


async def test_iso_by_signature(tmp_path: Path) -> None:
    path = fake_iso(tmp_path)
    found = await detect_format(path)
    assert found.format == "iso"
    assert found.virtual_size == path.stat().st_size
    assert (await detect_format(path, "iso")).format == "iso"
    with pytest.raises(ImageFormatError, match=r"declared raw but the file is iso"):
        await detect_format(path, "raw")


# --- refused --------------------------------------------------------------------


async def test_text_file_is_not_an_image(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_text("hello, this is not a disk\n")
    with pytest.raises(ImageFormatError) as err:
        await detect_format(path)
    assert str(err.value) == (
        "not a disk image: qemu-img found no image format "
        "(declare format=raw to upload a raw disk)"
    )


async def test_empty_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "empty"
    path.touch()
    with pytest.raises(ImageFormatError, match="empty"):
        await detect_format(path, "raw")


async def test_declared_format_differing_is_refused(tmp_path: Path) -> None:
    path = make(tmp_path, "disk.vmdk", "vmdk")
    with pytest.raises(ImageFormatError, match=r"^declared qcow2 but the file is vmdk$"):
        await detect_format(path, "qcow2")


def test_unknown_declared_format_is_refused() -> None:
    with pytest.raises(ImageFormatError, match="unknown image format 'dmg'"):
        normalize_format("dmg")
    assert normalize_format("") is None
    assert normalize_format("vhd") == "vpc"


async def test_qcow2_with_backing_file_is_refused(tmp_path: Path) -> None:
    base = make(tmp_path, "base.qcow2", "qcow2")
    path = make(tmp_path, "overlay.qcow2", "qcow2", "1M", "-b", str(base), "-F", "qcow2")
    with pytest.raises(ImageFormatError, match=r"has a backing file .*base\.qcow2"):
        await detect_format(path)


async def test_qcow2_pointing_at_a_host_file_is_refused(tmp_path: Path) -> None:
    # The attack: an image whose backing file is a host file, named without format.
    path = tmp_path / "evil.qcow2"
    run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", "/etc/hostname", "-F", "raw",
         str(path), "1M"])
    with pytest.raises(ImageFormatError, match="backing file"):
        await detect_format(path)


async def test_vmdk_with_external_extent_is_refused(tmp_path: Path) -> None:
    path = make(tmp_path, "flat.vmdk", "vmdk", "1M", "-o", "subformat=monolithicFlat")
    with pytest.raises(ImageFormatError, match="refers to other files"):
        await detect_format(path)


async def test_truncated_qcow2_is_refused(tmp_path: Path) -> None:
    whole = make(tmp_path, "whole.qcow2", "qcow2", "64M")
    # Cut inside the refcount structures: the header still parses, the check fails.
    cut = tmp_path / "cut.qcow2"
    cut.write_bytes(whole.read_bytes()[:100_000])
    with pytest.raises(ImageFormatError, match=r"^corrupt qcow2 image: .*corruption"):
        await detect_format(cut)


async def test_header_only_garbage_qcow2_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "bad.qcow2"
    path.write_bytes(b"QFI\xfb" + b"\xff" * 508)
    with pytest.raises(ImageFormatError):
        await detect_format(path)


# --- qemu_img wrappers ----------------------------------------------------------


async def test_qemu_img_wrappers(tmp_path: Path) -> None:
    base = tmp_path / "base.qcow2"
    await qemu_img.create_blank(base, 16 * MIB)
    info = await qemu_img.info(base)
    assert (info.format, info.virtual_size, info.backing_file) == ("qcow2", 16 * MIB, None)
    assert (await qemu_img.check(base)).supported

    overlay = tmp_path / "overlay.qcow2"
    await qemu_img.create_overlay(base, overlay, 32 * MIB)
    info = await qemu_img.info(overlay)
    assert info.backing_file == str(base)
    assert info.backing_format == "qcow2"
    assert info.virtual_size == 32 * MIB

    same = tmp_path / "same.qcow2"
    await qemu_img.create_overlay(base, same)
    assert (await qemu_img.info(same)).virtual_size == 16 * MIB

    raw = tmp_path / "disk.raw"
    await qemu_img.create_blank(raw, MIB, fmt="raw")
    assert raw.stat().st_size == MIB
    assert not (await qemu_img.check(raw, fmt="raw")).supported


async def test_qemu_img_errors_are_clear(tmp_path: Path) -> None:
    with pytest.raises(qemu_img.QemuImgError, match=r"qemu-img info .*missing"):
        await qemu_img.info(tmp_path / "missing")
    with pytest.raises(qemu_img.QemuImgError, match="size must be positive"):
        await qemu_img.create_blank(tmp_path / "zero.qcow2", 0)
