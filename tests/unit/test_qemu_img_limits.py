"""qemu-img under its address-space cap (yun.util.qemu_img): the cap must bound what an
image makes qemu-img allocate, not how many I/O threads a busy host makes it start.

Found in a CI run with the test streams side by side: a stopped VM's image capture
failed with ``qemu_thread_create: Resource temporarily unavailable`` (its ``qemu-img
convert`` under the 1 GiB cap); glibc's per-thread malloc arenas (64 MiB of address
space each) had taken the cap. ``-m 16 -W`` (more requests in flight) makes qemu-img
start as many threads as that loaded host did: without the arena limit, 10 of 10 such
runs failed here under the cap; with it, none.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from yun.util.qemu_img import QEMU_IMG, _run_limited
from yun.util.run import run

pytestmark = pytest.mark.skipif(
    shutil.which(QEMU_IMG) is None or shutil.which("qemu-io") is None
    or shutil.which("prlimit") is None,
    reason="needs qemu-img, qemu-io and prlimit (scripts/setup.sh installs them)")


async def test_a_convert_with_many_io_threads_fits_the_address_space_cap(
        tmp_path: Path) -> None:
    source = tmp_path / "source.qcow2"
    run([QEMU_IMG, "create", "-q", "-f", "qcow2", str(source), "2G"])
    run(["qemu-io", "-c", "write -P 0x5a 0 256M", str(source)])
    for attempt in range(3):
        target = tmp_path / f"copy{attempt}.qcow2"
        result = await _run_limited(
            [QEMU_IMG, "convert", "-q", "-m", "16", "-W", "-f", "qcow2", "-O", "qcow2",
             str(source), str(target)], timeout=120, check=False)
        assert result.returncode == 0, result.stderr
        assert target.stat().st_size > 256 * 1024**2
