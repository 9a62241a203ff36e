"""Async wrappers over ``qemu-img`` with ``--output=json``.

Every call goes through :func:`yun.util.run.run_async` (an argv list, never a
shell). ``info`` and ``check`` may be run on files uploaded by users, so they run
under ``prlimit`` with a memory and CPU cap: a crafted image header can make
qemu-img allocate huge tables or spin (OpenStack's CVE-2015-5162), and that must
cost a refused upload, not the host.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from yun.util.run import CommandError, Result, run_async

log = logging.getLogger("yun.util.qemu_img")

QEMU_IMG = "qemu-img"

# Disk image formats Yun accepts as images; QEMU reads each of them as a backing file.
IMAGE_FORMATS = frozenset({"qcow2", "vmdk", "vdi", "vhdx", "vpc", "raw"})

# Limits for qemu-img on untrusted files: 1 GiB of address space and 30 s of CPU are
# far above what any real image needs for its header (the figures OpenStack uses).
_UNTRUSTED_AS_BYTES = 1024**3
_UNTRUSTED_CPU_SECONDS = 30

# `qemu-img check` exit codes (qemu-img(1)).
_CHECK_OK = 0
_CHECK_FAILED = 1
_CHECK_CORRUPT = 2
_CHECK_LEAKS = 3
_CHECK_UNSUPPORTED = 63


class QemuImgError(RuntimeError):
    """qemu-img failed, or answered something that cannot be understood."""


class ImageCorrupt(QemuImgError):
    """``qemu-img check`` found corruptions in the image."""


@dataclass(frozen=True)
class ImageInfo:
    """What ``qemu-img info`` says of one file."""

    path: Path
    format: str
    virtual_size: int
    actual_size: int
    backing_file: str | None = None
    backing_format: str | None = None
    # qcow2 external data file: like a backing file, a reference to another file.
    data_file: str | None = None
    # vmdk extents: the files holding the data (the image itself for sparse vmdk).
    extents: tuple[str, ...] = ()
    encrypted: bool = False
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)


@dataclass(frozen=True)
class CheckResult:
    """What ``qemu-img check`` found; ``supported`` is False for formats it cannot check."""

    supported: bool
    corruptions: int = 0
    leaks: int = 0
    check_errors: int = 0


# glibc gives each thread that allocates an arena of its own, reserving 64 MiB of
# address space each (up to 8 per core): qemu-img's I/O threads, more of them on a busy
# host, then took the capped address space (convert failed one run in four under 512 MiB,
# and on a loaded host under 1 GiB: "qemu_thread_create: Resource temporarily
# unavailable"). Two arenas keep the cap a measure of what the image makes it allocate.
_ARENA_LIMIT = {"MALLOC_ARENA_MAX": "2"}


def _limited(argv: list[str], cpu_seconds: int = _UNTRUSTED_CPU_SECONDS,
             as_bytes: int = _UNTRUSTED_AS_BYTES) -> list[str]:
    """``argv`` under prlimit when it is available (it is part of util-linux)."""
    prlimit = shutil.which("prlimit")
    if prlimit is None:
        return argv
    return [
        prlimit,
        f"--as={as_bytes}",
        f"--cpu={cpu_seconds}",
        "--",
        *argv,
    ]


async def _run_limited(argv: list[str], *, timeout: float, check: bool = True,
                       cpu_seconds: int = _UNTRUSTED_CPU_SECONDS,
                       as_bytes: int = _UNTRUSTED_AS_BYTES) -> Result:
    """Run qemu-img ``argv`` under the caps of :func:`_limited`, its malloc arenas
    bounded (:data:`_ARENA_LIMIT`)."""
    return await run_async(_limited(argv, cpu_seconds, as_bytes), timeout=timeout,
                           check=check, env={**os.environ, **_ARENA_LIMIT})


def _parse_json(text: str, what: str) -> dict[str, Any]:
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise QemuImgError(f"qemu-img {what} printed no JSON: {text[:200]!r}") from exc
    if not isinstance(data, dict):
        raise QemuImgError(f"qemu-img {what} printed unexpected JSON: {text[:200]!r}")
    return data


async def info(path: Path, *, fmt: str | None = None, time_limit: float = 60.0) -> ImageInfo:
    """Describe the image at ``path``; ``fmt`` forces a format instead of probing.

    Runs with ``--force-share`` because it only reads metadata: a base image held
    open by a running VM must not make the call fail on QEMU's image lock.
    """
    argv = [QEMU_IMG, "info", "--output=json", "--force-share"]
    if fmt:
        argv += ["-f", fmt]
    argv.append(str(path))
    try:
        result = await _run_limited(argv, timeout=time_limit)
    except CommandError as exc:
        raise QemuImgError(f"qemu-img info {path} failed: {exc}") from exc
    data = _parse_json(result.stdout, "info")
    specific = data.get("format-specific") or {}
    spec_data = specific.get("data") or {}
    extents = tuple(
        str(e.get("filename", "")) for e in spec_data.get("extents", []) if isinstance(e, dict)
    )
    try:
        return ImageInfo(
            path=Path(path),
            format=str(data["format"]),
            virtual_size=int(data["virtual-size"]),
            actual_size=int(data.get("actual-size", 0)),
            backing_file=data.get("full-backing-filename") or data.get("backing-filename"),
            backing_format=data.get("backing-filename-format"),
            data_file=spec_data.get("data-file"),
            extents=extents,
            encrypted=bool(data.get("encrypted")) or "encrypt" in spec_data,
            raw=data,
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise QemuImgError(f"qemu-img info {path}: missing field {exc}") from exc


async def check(path: Path, *, fmt: str | None = None, time_limit: float = 600.0) -> CheckResult:
    """Check the image's metadata for consistency.

    Raises :class:`ImageCorrupt` when qemu-img finds corruptions and
    :class:`QemuImgError` when the check itself could not run. Leaked clusters are
    harmless (space only) and are reported, not raised. Call this only on images
    without a backing file: qemu-img check opens the backing chain.
    """
    argv = [QEMU_IMG, "check", "--output=json"]
    if fmt:
        argv += ["-f", fmt]
    argv.append(str(path))
    try:
        result = await _run_limited(argv, timeout=time_limit, check=False)
    except CommandError as exc:  # could not start, or timed out
        raise QemuImgError(f"qemu-img check {path} failed: {exc}") from exc
    if result.returncode == _CHECK_UNSUPPORTED:
        return CheckResult(supported=False)
    if result.returncode not in (_CHECK_OK, _CHECK_CORRUPT, _CHECK_LEAKS, _CHECK_FAILED):
        raise QemuImgError(
            f"qemu-img check {path} exited {result.returncode}: {_tail(result.stderr)}"
        )
    data: dict[str, Any] = {}
    if result.stdout.strip():
        try:
            data = _parse_json(result.stdout, "check")
        except QemuImgError:
            if result.returncode == _CHECK_OK:
                raise
    corruptions = int(data.get("corruptions", 0))
    if result.returncode == _CHECK_CORRUPT or corruptions:
        raise ImageCorrupt(
            f"{path.name}: qemu-img check found {corruptions or 'some'} corruption(s)"
        )
    if result.returncode == _CHECK_FAILED:
        raise QemuImgError(f"{path.name}: qemu-img could not check it: {_tail(result.stderr)}")
    return CheckResult(
        supported=True,
        corruptions=corruptions,
        leaks=int(data.get("leaks", 0)),
        check_errors=int(data.get("check-errors", 0)),
    )


async def create_overlay(
    base: Path,
    path: Path,
    size_bytes: int | None = None,
    *,
    backing_format: str | None = None,
    preallocation: str | None = None,
    time_limit: float = 120.0,
) -> None:
    """Create a qcow2 at ``path`` backed by ``base`` (absolute path, explicit ``-F``);
    ``preallocation`` ("falloc" or "full") allocates its whole size on disk (thick).

    The backing format is always written into the overlay so QEMU never probes the
    base (a probed raw base could be mistaken for another format). ``size_bytes``
    grows the overlay beyond the base's virtual size; None keeps the base's size.
    """
    base = _absolute(base)
    if backing_format is None:
        backing_format = (await info(base)).format
    argv = [
        QEMU_IMG, "create", "-q", "-f", "qcow2",
        "-b", str(base), "-F", backing_format,
    ]
    if preallocation is not None:
        # qcow2 refuses preallocating an overlay unless its L2 entries track
        # subclusters (extended_l2): only then can allocated-but-unwritten space fall
        # through to the backing file.
        argv += ["-o", f"preallocation={_prealloc(preallocation)},extended_l2=on"]
    argv.append(str(path))
    if size_bytes is not None:
        argv.append(str(int(size_bytes)))
    try:
        await run_async(argv, timeout=time_limit)
    except CommandError as exc:
        raise QemuImgError(f"cannot create overlay {path} of {base}: {exc}") from exc
    log.debug("overlay created", extra={"path": str(path), "base": str(base)})


async def create_blank(
    path: Path, size_bytes: int, fmt: str = "qcow2", *, preallocation: str | None = None,
    time_limit: float = 120.0,
) -> None:
    """Create an empty image of ``size_bytes`` (thin for qcow2 unless ``preallocation``,
    "falloc" or "full", allocates it all on disk)."""
    if size_bytes <= 0:
        raise QemuImgError(f"cannot create {path}: size must be positive, not {size_bytes}")
    argv = [QEMU_IMG, "create", "-q", "-f", fmt]
    if preallocation is not None:
        argv += ["-o", f"preallocation={_prealloc(preallocation)}"]
    argv += [str(path), str(int(size_bytes))]
    try:
        await run_async(argv, timeout=time_limit)
    except CommandError as exc:
        raise QemuImgError(f"cannot create {fmt} image {path}: {exc}") from exc


def _prealloc(mode: str) -> str:
    if mode not in ("falloc", "full"):
        raise QemuImgError(f"unknown preallocation {mode!r}: falloc or full")
    return mode


async def resize(path: Path, size_bytes: int, *, fmt: str = "qcow2",
                 preallocation: str | None = None, time_limit: float = 120.0) -> None:
    """Grow the closed image at ``path`` to ``size_bytes`` (``preallocation`` allocates
    the new part). Fails (a lock error) while a QEMU has it open."""
    argv = [QEMU_IMG, "resize", "-q", "-f", fmt]
    if preallocation is not None:
        argv.append(f"--preallocation={_prealloc(preallocation)}")
    argv += [str(path), str(int(size_bytes))]
    try:
        await run_async(argv, timeout=time_limit)
    except CommandError as exc:
        raise QemuImgError(f"cannot resize {path}: {exc}") from exc


async def snapshot(path: Path, action: str, name: str, *, time_limit: float = 300.0) -> None:
    """An internal snapshot of the closed qcow2 at ``path``: ``action`` "create",
    "apply" (revert to it) or "delete". Fails (a lock error) while a QEMU has it open."""
    flags = {"create": "-c", "apply": "-a", "delete": "-d"}
    if action not in flags:
        raise QemuImgError(f"unknown snapshot action {action!r}")
    argv = [QEMU_IMG, "snapshot", "-q", flags[action], name, str(path)]
    try:
        await run_async(argv, timeout=time_limit)
    except CommandError as exc:
        raise QemuImgError(f"cannot {action} snapshot {name!r} of {path}: {exc}") from exc


async def write_locked_by(path: Path, *, time_limit: float = 60.0) -> str | None:
    """None when no process holds QEMU's write lock on the image at ``path``; else
    qemu-img's message (``Failed to get shared "write" lock``). ``qemu-img info``
    without ``--force-share`` takes the same locks a reader would: it fails exactly
    while a QEMU elsewhere (another node of a shared mount) has the image open."""
    argv = [QEMU_IMG, "info", "--output=json", str(path)]
    result = await run_async(argv, timeout=time_limit, check=False)
    if result.returncode == 0:
        return None
    message = result.stderr.strip()
    if "lock" in message:
        return message
    raise QemuImgError(f"qemu-img info {path} failed: {_tail(message)}")


def is_lock_error(exc: BaseException) -> bool:
    """Whether qemu-img failed because another process holds the image's lock."""
    texts = [str(exc)]
    if isinstance(exc.__cause__, CommandError):
        texts.append(exc.__cause__.stderr)
    return any(("Failed to get" in t and "lock" in t) or "Is another process using" in t
               for t in texts)


async def convert(
    src: Path,
    dst: Path,
    *,
    src_fmt: str,
    dst_fmt: str = "qcow2",
    preallocation: str | None = None,
    cpu_seconds: int = 3600,
    time_limit: float = 7200.0,
) -> None:
    """Convert the (untrusted, already vetted) image ``src`` of format ``src_fmt`` into a
    new standalone ``dst_fmt`` image at ``dst`` (``preallocation``: "falloc" or "full"
    allocates the whole of it on disk, thick).

    The source format is always given (never probed) and the run is under the same
    address-space cap as :func:`info`; its CPU cap is larger because converting copies
    every data cluster (``cpu_seconds``, about a minute per GiB on a slow host is ample).
    ``dst`` must not exist; a failed conversion leaves no ``dst`` behind.
    """
    if src_fmt not in IMAGE_FORMATS:
        raise QemuImgError(f"cannot convert from {src_fmt!r}: not an image format")
    argv = [QEMU_IMG, "convert", "-q", "-f", src_fmt, "-O", dst_fmt]
    if preallocation is not None:
        argv += ["-o", f"preallocation={_prealloc(preallocation)}"]
    argv += [str(src), str(dst)]
    try:
        await _run_limited(argv, timeout=time_limit, cpu_seconds=cpu_seconds)
    except CommandError as exc:
        await asyncio.to_thread(Path(dst).unlink, missing_ok=True)
        raise QemuImgError(f"qemu-img convert {src_fmt} -> {dst_fmt} failed: {exc}") from exc
    log.debug("image converted", extra={"src": str(src), "dst": str(dst),
                                        "src_format": src_fmt, "format": dst_fmt})


def _absolute(path: Path) -> Path:
    # An overlay records its backing path verbatim: a relative one would resolve
    # against the overlay's directory, not ours.
    return Path(os.path.abspath(path))


def _tail(text: str) -> str:
    lines = text.strip().splitlines()
    return lines[-1] if lines else ""
