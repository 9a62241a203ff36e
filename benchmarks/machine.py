"""What a benchmark ran on, for the figures it prints (shared by the benchmarks)."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path


def cpu_model() -> str:
    """The CPU model as /proc/cpuinfo names it."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return "?"


def memory_gib() -> float:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1024**3
