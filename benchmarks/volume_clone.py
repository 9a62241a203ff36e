#!/usr/bin/env python3
"""Time to a VM's root volume from an image: an overlay on the base against a full copy.

F-BACKING: in a shared pool with backing images, a VM's root volume is a qcow2 overlay
on one read-only base; without, it is the image copied whole. This benchmark builds
the node's real disk backend (``LocalDiskBackend``, real ``qemu-img``) on this host's
disk, puts a qcow2 image with ``--data-gib`` GiB of written (non-zero) data of a
``--size-gib`` virtual size into its cache (the cache fill itself is not timed: it is
the same download for both), then, in the same run:

* ``overlay``: ``ensure_volume`` of a new volume with ``backing=True``, ``--rounds``
  times, and the same for an image ten times smaller (the time must not depend on the
  image's size);
* ``full copy``: ``ensure_volume`` with ``backing=False`` (``qemu-img convert``), once
  per round.

Each volume is made durable (``sync`` of its file) inside the timed span, as the node
would need before a domain starts on it. The domain's boot that follows is the same in
both cases and is not part of the figures (see benchmarks/boot.py for it). Prints the
median of each and the ratio. Goal: overlay < 100 ms whatever the image size.

Run: ``.venv/bin/python benchmarks/volume_clone.py`` (about a minute; needs
``--size-gib`` + ``--data-gib`` free on the ``--dir`` file system, twice the data).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.machine import cpu_model, memory_gib
from yun.node.storage.local import LocalDiskBackend
from yun.proto.messages import DiskSpec

GIB = 1 << 30


def make_image(path: Path, size_gib: int, data_gib: float) -> None:
    """A qcow2 of ``size_gib`` virtual GiB whose first ``data_gib`` GiB are written with
    a byte pattern (written clusters, which a copy must carry, unlike zeros)."""
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), f"{size_gib}G"],
                   check=True)
    data = int(data_gib * GIB)
    step = GIB
    for offset in range(0, data, step):
        length = min(step, data - offset)
        subprocess.run(["qemu-io", "-f", "qcow2", "-c",
                        f"write -P 0x5a {offset} {length}", str(path)],
                       check=True, capture_output=True)


def cache(backend: LocalDiskBackend, src: Path) -> tuple[str, Path]:
    """Put ``src`` where the backend keeps a downloaded image (hard link, no copy)."""
    image_id = str(uuid.uuid4())
    target = backend.image_path(image_id, "qcow2")
    target.parent.mkdir(parents=True, exist_ok=True)
    os.link(src, target)
    return image_id, target


async def make_volume(backend: LocalDiskBackend, image_id: str, size_gib: int,
                      backing: bool) -> float:
    spec = DiskSpec(disk_id="root", size_gb=size_gib, image_id=image_id,
                    image_format="qcow2", volume_id=str(uuid.uuid4()), backing=backing)
    start = time.perf_counter()
    disk = await backend.ensure_volume(spec)
    assert disk.path is not None
    await asyncio.to_thread(subprocess.run, ["sync", str(disk.path)], check=True)
    elapsed = time.perf_counter() - start
    await backend.delete_volume(str(spec.volume_id))
    return elapsed


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-gib", type=int, default=10, help="image virtual size")
    parser.add_argument("--data-gib", type=float, default=10.0, help="data written in it")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dir", type=Path, default=Path("/var/tmp"),
                        help="file system to run on (default /var/tmp: a disk, not tmpfs)")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="yun-bench-clone-", dir=args.dir))
    backend = LocalDiskBackend(root / "node", owner=None)
    try:
        big, small = root / "big.qcow2", root / "small.qcow2"
        started = time.perf_counter()
        make_image(big, args.size_gib, args.data_gib)
        make_image(small, max(1, args.size_gib // 10), args.data_gib / 10)
        built = time.perf_counter() - started
        big_id, _ = cache(backend, big)
        small_id, _ = cache(backend, small)
        overlay_big, overlay_small, copies = [], [], []
        for _ in range(args.rounds):
            overlay_big.append(await make_volume(backend, big_id, args.size_gib, True))
            overlay_small.append(await make_volume(backend, small_id, args.size_gib, True))
            copies.append(await make_volume(backend, big_id, args.size_gib, False))
        ms = [statistics.median(x) * 1000 for x in (overlay_big, overlay_small, copies)]
        print(f"machine: {cpu_model()}, {os.cpu_count()} cores, {memory_gib():.1f} GiB, "
              f"{platform.system()} {platform.release()}; "
              f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC")
        print(f"image: {args.size_gib} GiB qcow2 with {args.data_gib:g} GiB written "
              f"(built in {built:.0f} s, not timed); on {args.dir}; rounds: {args.rounds} "
              "(median)")
        print(f"overlay on the base:        {ms[0]:9.1f} ms   (goal < 100 ms)")
        print(f"overlay, image 10x smaller: {ms[1]:9.1f} ms")
        print(f"full copy:                  {ms[2]:9.1f} ms   "
              f"({args.data_gib * GIB / (ms[2] / 1000) / 1e6:.0f} MB/s)")
        print(f"full copy / overlay:        {ms[2] / ms[0]:9.0f}x")
    finally:
        await backend.aclose()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    asyncio.run(main())
