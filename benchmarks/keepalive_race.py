#!/usr/bin/env python3
"""Diagnostics for create_throughput.py's occasional failed creates: does a request
forwarded by the gateway over a pooled connection to the control server that has been
idle for about uvicorn's keep-alive timeout (5 s) fail?

The deployment of create_throughput.py (control plane as processes, ``--nodes`` sim
nodes). Each round fills the gateway's pool of connections to the control server with
``--concurrency`` connections (as the benchmark's ``GET /api/v1/tasks`` baseline does),
leaves them idle for a gap drawn from ``--gap-min``..``--gap-max`` seconds (the benchmark's
one-at-a-time baseline lasts about that long), then sends ``--concurrency`` creates at
once through a fresh client (so the client's own connections to the gateway are new).
Every answer that is not 202 is printed with its detail, then grouped by gap.

Run: ``.venv/bin/python benchmarks/keepalive_race.py --rounds 12``.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import shutil
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from create_throughput import (
    TASK_COUNT_PATH,
    bring_up,
    failure_detail,
    new_client,
    round_trips,
    start_deployment,
    stop_services,
    upload_image,
)


async def rounds(args: argparse.Namespace, root: Path) -> int:
    dep = start_deployment(root, args.nodes, 128, 262144)  # room for every round
    try:
        async with new_client(dep, args.concurrency) as api:
            await bring_up(dep, api, args.nodes, 90)
            await upload_image(dep, api, 90)
        outcome: Counter[str] = Counter()
        by_gap: dict[str, Counter[str]] = {}
        for r in range(args.rounds):
            await round_trips(dep, TASK_COUNT_PATH, args.concurrency * 4, args.concurrency)
            gap = random.uniform(args.gap_min, args.gap_max)
            await asyncio.sleep(gap)
            async with new_client(dep, args.concurrency) as api:
                resps = await asyncio.gather(*(api.post("/api/v1/vms", json={
                    "name": f"ka-{r:02d}-{i:03d}", "image": "img", "vcpus": 1,
                    "memory_mb": 64}) for i in range(args.concurrency)))
            bad = [failure_detail(x) for x in resps if x.status_code != 202]
            for detail in bad:
                print(f"  round {r} (idle {gap:.2f} s): {detail}", flush=True)
            outcome.update("202" if x.status_code == 202 else str(x.status_code)
                           for x in resps)
            by_gap.setdefault(f"{gap:.1f}", Counter()).update(
                ["failed"] * len(bad) + ["202"] * (len(resps) - len(bad)))
            await asyncio.sleep(1.0)  # let the round's creates run before the next pool
        print(f"answers: {dict(outcome)}")
        for label, counts in sorted(by_gap.items()):
            print(f"  idle {label} s: {dict(counts)}")
        return 0 if outcome.get("202", 0) == sum(outcome.values()) else 1
    finally:
        stop_services([dep.services["sim-nodes"]])
        stop_services([dep.services[n] for n in ("gateway", "storage", "control", "domain")])
        if args.keep_logs is not None:
            shutil.copytree(root / "logs", args.keep_logs, dirs_exist_ok=True)


def main() -> int:
    parser = argparse.ArgumentParser(prog="benchmarks/keepalive_race.py",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--nodes", type=int, default=10)
    parser.add_argument("--concurrency", type=int, default=50)
    parser.add_argument("--gap-min", type=float, default=4.7)
    parser.add_argument("--gap-max", type=float, default=5.3)
    parser.add_argument("--keep-logs", type=Path, default=None)
    args = parser.parse_args()
    started = time.monotonic()
    root = Path(tempfile.mkdtemp(prefix="yun-bench-ka-"))
    try:
        return asyncio.run(rounds(args, root))
    finally:
        shutil.rmtree(root, ignore_errors=True)
        print(f"wall time {time.monotonic() - started:.0f} s")


if __name__ == "__main__":
    sys.exit(main())
