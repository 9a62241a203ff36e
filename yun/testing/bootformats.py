"""Byte formats the test guest builder writes itself: an MBR, a newc cpio archive, and
the check that a binary is a static ELF (so it runs in an initramfs with no libraries)."""

from __future__ import annotations

import struct
from collections.abc import Iterable
from dataclasses import dataclass

SECTOR = 512


def mbr_sector(boot_code: bytes, start: int, sectors: int, disk_id: int) -> bytes:
    """An MBR with ``boot_code`` and one active Linux partition of ``sectors`` at ``start``.

    CHS fields hold the "use LBA" marker (0xFE 0xFF 0xFF): no BIOS we boot on uses them.
    """
    if len(boot_code) > 440:
        raise ValueError("MBR boot code is at most 440 bytes")
    mbr = bytearray(SECTOR)
    mbr[: len(boot_code)] = boot_code
    struct.pack_into("<I", mbr, 440, disk_id)
    chs = b"\xfe\xff\xff"
    struct.pack_into("<B3sB3sII", mbr, 446, 0x80, chs, 0x83, chs, start, sectors)
    mbr[510:512] = b"\x55\xaa"
    return bytes(mbr)


@dataclass(frozen=True)
class CpioEntry:
    """One member of a newc cpio archive (an initramfs)."""

    name: str  # without a leading slash
    mode: int  # including the file type bits (stat.S_IFREG | 0o755 ...)
    data: bytes = b""
    rdev: tuple[int, int] = (0, 0)


def newc_archive(entries: Iterable[CpioEntry], mtime: int = 0) -> bytes:
    """Serialise ``entries`` as a newc ("070701") cpio archive, as the kernel unpacks it.

    Written here rather than with cpio(1) so that device nodes (``/dev/console``)
    need no mknod and the archive is reproducible.
    """
    out = bytearray()

    def pad() -> None:
        out.extend(b"\0" * (-len(out) % 4))

    def member(ino: int, name: str, mode: int, data: bytes, rdev: tuple[int, int]) -> None:
        encoded = name.encode() + b"\0"
        fields = (ino, mode, 0, 0, 1, mtime, len(data), 0, 0, rdev[0], rdev[1], len(encoded), 0)
        out.extend(b"070701" + b"".join(b"%08x" % f for f in fields))
        out.extend(encoded)
        pad()
        out.extend(data)
        pad()

    ino = 1
    for entry in entries:
        member(ino, entry.name.lstrip("/"), entry.mode, entry.data, entry.rdev)
        ino += 1
    member(0, "TRAILER!!!", 0, b"", (0, 0))
    return bytes(out)


def is_static_elf(head: bytes) -> bool:
    """True when an x86-64 ELF image (its first 4 KiB) has no program interpreter.

    A dynamically linked busybox (package ``busybox``) would find no libc in the guest.
    """
    if head[:4] != b"\x7fELF" or head[4] != 2:  # ELFCLASS64
        return False
    phoff = struct.unpack_from("<Q", head, 0x20)[0]
    phentsize, phnum = struct.unpack_from("<HH", head, 0x36)
    for i in range(phnum):
        off = phoff + i * phentsize
        if off + 4 > len(head):
            break
        if struct.unpack_from("<I", head, off)[0] == 3:  # PT_INTERP
            return False
    return True


# --------------------------------------------------------------------------- host inputs
