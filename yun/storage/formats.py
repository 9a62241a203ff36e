"""Detect and vet the format of an uploaded image before the store accepts it.

``qemu-img info`` calls ANY file it does not recognise "raw", so its answer alone
would let a text file (or an HTML error page) in as a disk. The rules:

* qcow2, vmdk, vdi, vhdx and vpc are accepted as qemu-img detects them;
* an ISO 9660 image is recognised by ``CD001`` at byte 0x8001 and called "iso";
* "raw" is accepted only when the uploader declared ``format=raw`` and the size is
  a non-zero multiple of 512 (a sector);
* a declared format that differs from the detected one is refused;
* images referring to other files (backing file, qcow2 external data file, vmdk
  extents outside the file) are refused: on a node they could make a VM read a host
  file. Encrypted images are refused (no VM could open them without a secret);
* formats qemu-img can check are checked, and corrupt images refused.
"""

from __future__ import annotations

import asyncio
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from yun.util import qemu_img

log = logging.getLogger("yun.storage.formats")

# Every format an image may have in the store (and in ImageLocation.format).
ACCEPTED_FORMATS = frozenset(qemu_img.IMAGE_FORMATS | {"iso"})

# Names people use for the same thing; qemu-img calls VHD "vpc".
_ALIASES = {"vhd": "vpc", "img": "raw"}

ISO9660_MAGIC = b"CD001"
ISO9660_OFFSET = 0x8001  # the first volume descriptor is at sector 16 (2048-byte sectors)
SECTOR = 512


class ImageFormatError(ValueError):
    """The file is not an image the store accepts; the message says why, for the uploader."""


@dataclass(frozen=True)
class DetectedImage:
    """An uploaded file that passed every check."""

    format: str
    size: int
    virtual_size: int


def normalize_format(declared: str | None) -> str | None:
    """The canonical name of a declared format (None when none was declared).

    Raises :class:`ImageFormatError` for a format the store does not accept.
    """
    if declared is None or not declared.strip():
        return None
    name = declared.strip().lower()
    name = _ALIASES.get(name, name)
    if name not in ACCEPTED_FORMATS:
        raise ImageFormatError(
            f"unknown image format {declared!r}; accepted: {', '.join(sorted(ACCEPTED_FORMATS))}"
        )
    return name


def is_iso9660(path: Path) -> bool:
    """Whether the file carries the ISO 9660 volume descriptor signature."""
    with path.open("rb") as f:
        f.seek(ISO9660_OFFSET)
        return f.read(len(ISO9660_MAGIC)) == ISO9660_MAGIC


async def detect_format(path: Path, declared: str | None = None) -> DetectedImage:
    """Find the format of the file at ``path`` and vet it against ``declared``.

    Raises :class:`ImageFormatError` with a message meant for the uploader when the
    file is not an acceptable image.
    """
    want = normalize_format(declared)
    size = await asyncio.to_thread(os.path.getsize, path)
    if size == 0:
        raise ImageFormatError("not a disk image: the file is empty")
    try:
        info = await qemu_img.info(path)
    except qemu_img.QemuImgError as exc:
        raise ImageFormatError(f"not a disk image: qemu-img cannot read it ({exc})") from exc

    if info.format != "raw":
        fmt = info.format
        if fmt not in ACCEPTED_FORMATS:
            raise ImageFormatError(
                f"image format {fmt} is not accepted; accepted: "
                f"{', '.join(sorted(ACCEPTED_FORMATS))}"
            )
    elif await asyncio.to_thread(is_iso9660, path):
        fmt = "iso"
    else:
        # qemu-img found no format: only the uploader's word makes it a raw disk.
        if want is None:
            raise ImageFormatError(
                "not a disk image: qemu-img found no image format "
                "(declare format=raw to upload a raw disk)"
            )
        if want != "raw":
            raise ImageFormatError(
                f"declared {want} but qemu-img found no {want} image in the file"
            )
        if size % SECTOR:
            raise ImageFormatError(
                f"not a raw disk: its size ({size} bytes) is not a multiple of {SECTOR}"
            )
        fmt = "raw"

    if want is not None and want != fmt:
        raise ImageFormatError(f"declared {want} but the file is {fmt}")

    if fmt in ("raw", "iso"):
        return DetectedImage(format=fmt, size=size, virtual_size=size)

    _refuse_references(info, path)
    try:
        await qemu_img.check(path, fmt=fmt)
    except qemu_img.ImageCorrupt as exc:
        raise ImageFormatError(f"corrupt {fmt} image: {exc}") from exc
    except qemu_img.QemuImgError as exc:
        raise ImageFormatError(f"{fmt} image cannot be checked: {exc}") from exc
    return DetectedImage(format=fmt, size=size, virtual_size=info.virtual_size)


def _refuse_references(info: qemu_img.ImageInfo, path: Path) -> None:
    """Refuse images that point at other files or need a secret."""
    if info.backing_file:
        raise ImageFormatError(
            f"{info.format} image has a backing file ({info.backing_file}); "
            "upload a standalone image (qemu-img convert flattens it)"
        )
    if info.data_file:
        raise ImageFormatError(
            f"{info.format} image has an external data file ({info.data_file}); "
            "upload a standalone image"
        )
    # A sparse vmdk names itself as its only extent; a descriptor naming other files
    # (monolithicFlat, split extents) would read whatever path it names on the host.
    own = path.resolve()
    foreign = [e for e in info.extents if (path.parent / e).resolve() != own]
    if foreign:
        raise ImageFormatError(
            f"{info.format} image refers to other files ({', '.join(foreign)}); "
            "upload a single-file (monolithicSparse or streamOptimized) vmdk"
        )
    if info.encrypted:
        raise ImageFormatError(f"{info.format} image is encrypted; upload an unencrypted image")
