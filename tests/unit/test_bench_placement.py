"""The DB mode of benchmarks/placement.py, run small: every placement and report goes
through (nothing refused or failed), and the figures it prints are there."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_db_mode_places_and_reports_on_sqlite() -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "placement.py"), "--db", "sqlite",
         "--nodes", "30", "--pools", "3", "--vms", "200", "--placements", "40",
         "--concurrency", "20", "--report-interval", "0.5"],
        env=env, capture_output=True, text=True, timeout=300, check=True).stdout
    assert "seeded 30 nodes in 3 pools, 90 inventory rows, 200 placed VMs" in out
    for run in ("no reports", "every node reporting"):
        line = next(li for li in out.splitlines() if li.startswith(f"placements, {run}"))
        assert re.search(r": 40 placed in .* refused 0, failed 0$", line), line
    reports = next(li for li in out.splitlines() if li.startswith("reports alone"))
    assert reports.startswith("reports alone: 30 in ") and "failed 0" in reports
    assert re.search(r"VmHWM \d+ MiB, VmRSS \d+ MiB", out)
