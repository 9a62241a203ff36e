#!/usr/bin/env python3
"""Image upload throughput through the gateway and the storage server, against ``cp``.

Starts the control plane as real processes on 127.0.0.1 (``yun.testing.procs.ProcCloud``:
domain, control, storage and gateway servers, each ``python -m yun serve ...``, SQLite,
no node), writes a ``--size-mib`` raw disk file (incompressible bytes) and then, in the
same run and on the same file system:

* ``cp``: ``cp FILE COPY && sync COPY`` (the copy made durable, as the store fsyncs);
* ``upload``: ``POST /api/v1/images?format=raw&size=N`` with the file streamed as the
  body (httpx, 1 MiB chunks, a bearer token) until the 201 answer: the gateway streams it
  to the storage server, which writes and hashes it, fsyncs it, vets its format with
  qemu-img and commits it.

Each is run ``--rounds`` times (the upload's image deleted in between); the best round
of each is compared. It prints MB/s (10^6 bytes per second) of both and their ratio
(goal: >= 0.8). Everything started is stopped and the temporary directory removed,
also on failure.

Run: ``.venv/bin/python benchmarks/image_upload.py`` (about a minute for 1 GiB).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.machine import cpu_model, memory_gib
from yun.testing.procs import ProcCloud

MIB = 1 << 20
CHUNK = MIB


def write_file(path: Path, size_mib: int) -> None:
    """``size_mib`` MiB of incompressible bytes (a random 16 MiB block, repeated)."""
    block = os.urandom(16 * MIB)
    with path.open("wb") as f:
        left = size_mib * MIB
        while left > 0:
            f.write(block[:min(left, len(block))])
            left -= min(left, len(block))
        f.flush()
        os.fsync(f.fileno())


def chunks(path: Path) -> Iterator[bytes]:
    with path.open("rb") as f:
        while data := f.read(CHUNK):
            yield data


def drop_cache(path: Path) -> None:
    """Ask the kernel to forget the file's cached pages (best effort), so both runs read
    it alike."""
    with contextlib.suppress(OSError, AttributeError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def time_cp(src: Path, dst: Path) -> float:
    dst.unlink(missing_ok=True)
    drop_cache(src)
    start = time.perf_counter()
    subprocess.run(["cp", str(src), str(dst)], check=True)
    subprocess.run(["sync", str(dst)], check=True)
    elapsed = time.perf_counter() - start
    dst.unlink()
    return elapsed


async def time_upload(cloud: ProcCloud, src: Path, size: int, name: str) -> float:
    drop_cache(src)
    async with cloud.api(timeout=3600) as api:
        start = time.perf_counter()
        resp = await api.post("/api/v1/images", params={"name": name, "format": "raw",
                                                        "size": size},
                              content=_async_chunks(src),
                              headers={"Content-Type": "application/octet-stream"})
        elapsed = time.perf_counter() - start
        if resp.status_code != 201:
            raise SystemExit(f"upload failed: {resp.status_code} {resp.text[:500]}")
        image = resp.json()
        assert image["size"] == size, image
        deleted = await api.delete(f"/api/v1/images/{image['uuid']}")
        if deleted.status_code not in (202, 204):
            raise SystemExit(f"delete failed: {deleted.status_code} {deleted.text[:300]}")
    return elapsed


async def _async_chunks(path: Path):  # type: ignore[no-untyped-def]
    it = chunks(path)
    while True:
        data = await asyncio.to_thread(next, it, b"")
        if not data:
            return
        yield data


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=1024, help="file size (MiB)")
    parser.add_argument("--rounds", type=int, default=2, help="runs of each, best kept")
    parser.add_argument("--dir", type=Path, default=None,
                        help="where the file and the servers' state go (default: a temp dir)")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="yun-bench-upload-", dir=args.dir))
    cloud = ProcCloud(nodes=0, root=root / "cloud")
    try:
        src = root / "disk.raw"
        write_file(src, args.size_mib)
        await cloud.start()
        cp_times, up_times = [], []
        size = src.stat().st_size
        for i in range(args.rounds):
            cp_times.append(time_cp(src, root / "copy.raw"))
            up_times.append(await time_upload(cloud, src, size, f"bench-{i}"))
        cp_rate = size / min(cp_times) / 1e6
        up_rate = size / min(up_times) / 1e6
        print(f"machine: {cpu_model()}, {os.cpu_count()} cores, {memory_gib():.1f} GiB, "
              f"{platform.system()} {platform.release()}; "
              f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC")
        print(f"file: {size / MIB:.0f} MiB raw, rounds: {args.rounds} (best kept)")
        print(f"cp + sync:  {cp_rate:8.1f} MB/s  (rounds: "
              f"{', '.join(f'{t:.2f}s' for t in cp_times)})")
        print(f"upload:     {up_rate:8.1f} MB/s  (rounds: "
              f"{', '.join(f'{t:.2f}s' for t in up_times)})")
        print(f"ratio upload/cp: {up_rate / cp_rate:.2f}x (goal >= 0.8x)")
    finally:
        cloud.close()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    asyncio.run(main())
