#!/usr/bin/env python3
"""The idle cost of N simulated nodes: CPU and memory of sim-nodes, domain and control.

Starts the same deployment as ``create_throughput.py`` (domain, control, storage and
gateway as separate processes on 127.0.0.1, then ``yun serve sim-nodes --count N``), with
heartbeats and reports every ``--interval`` seconds (10 by default), waits until the
control server lists all N nodes up, then measures for ``--seconds`` (60 by default) the
CPU seconds per second and the RSS of sim-nodes, domain and control, and prints them
with the RSS per node of the sim-nodes process. No VM is created: this is what the
simulator and the control plane pay for the nodes alone.

Run it under the shared benchmark lock:
``flock /tmp/yun-bench.lock .venv/bin/python benchmarks/sim_nodes_idle.py --nodes 1000``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
from create_throughput import (  # benchmarks/create_throughput.py
    Deployment,
    bring_up,
    machine,
    run_then_stop,
    start_deployment,
)

MEASURED = ("sim-nodes", "domain", "control")


def set_intervals(config: Path, interval: float) -> None:
    """Heartbeats (the domain tells every member its interval) and node reports every
    ``interval`` seconds: at 10,000 nodes the benchmark's 2 s heartbeat would be the load.
    The domain's presence TTL becomes three intervals (its default, 6 s, is shorter than
    a 10 s heartbeat: every member would be declared gone between two heartbeats)."""
    text = config.read_text()
    text = text.replace("[domain]\n", f"[domain]\nttl = {3 * interval}\n", 1)
    text = re.sub(r"^heartbeat_interval = .*$", f"heartbeat_interval = {interval}", text,
                  flags=re.M)
    text = re.sub(r"^report_interval = .*$", f"report_interval = {interval}", text, flags=re.M)
    config.write_text(text)


async def measure(dep: Deployment, args: argparse.Namespace) -> dict[str, Any]:
    async with httpx.AsyncClient(base_url=dep.api_url, timeout=60) as api:
        started = time.monotonic()
        await bring_up(dep, api, args.nodes, args.startup_timeout)
        up_after = time.monotonic() - started
        print(f"{args.nodes} nodes up after {up_after:.1f} s", flush=True)
        # Let the start's burst (joins, first reports) settle for one interval.
        await asyncio.sleep(args.interval)
        before = {n: dep.services[n].cpu_seconds() for n in MEASURED}
        t0 = time.monotonic()
        await asyncio.sleep(args.seconds)
        elapsed = time.monotonic() - t0
        cpu = {n: (dep.services[n].cpu_seconds() - before[n]) / elapsed for n in MEASURED}
        mem = {n: dep.services[n].memory_kib() for n in MEASURED}
        page = (await api.get("/api/v1/nodes", params={"q": "status=up", "limit": 1,
                                                        "count": "true"})).json()
    return {"nodes": args.nodes, "interval_s": args.interval, "up_after_s": round(up_after, 1),
            "measured_s": round(elapsed, 1), "nodes_up_at_end": int(page["total"]),
            "cpu_per_s": {n: round(v, 3) for n, v in cpu.items()},
            "rss_kib": {n: m["VmRSS"] for n, m in mem.items()},
            "peak_rss_kib": {n: m["VmHWM"] for n, m in mem.items()},
            "sim_rss_kib_per_node": round(mem["sim-nodes"]["VmRSS"] / args.nodes, 1)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="benchmarks/sim_nodes_idle.py",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, default=1000, help="sim nodes (default 1000)")
    parser.add_argument("--interval", type=float, default=10.0,
                        help="heartbeat and report interval in s (default 10)")
    parser.add_argument("--seconds", type=float, default=60.0,
                        help="length of the measurement in s (default 60)")
    parser.add_argument("--startup-timeout", type=float, default=600.0,
                        help="seconds the nodes may take to come up (default 600)")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    parser.add_argument("--keep-logs", type=Path, default=None, metavar="DIR",
                        help="copy the services' logs and config to DIR before cleaning up")
    args = parser.parse_args(argv)
    if args.nodes < 1 or args.seconds <= 0 or args.interval <= 0:
        parser.error("--nodes, --seconds and --interval must be positive")
    print(machine(), flush=True)
    root = Path(tempfile.mkdtemp(prefix="yun-bench-idle-"))
    dep = start_deployment(root, args.nodes, 16, 32768)
    set_intervals(root / "yun.toml", args.interval)
    result = run_then_stop(root, dep, args.keep_logs,
                           lambda: asyncio.run(measure(dep, args)))
    if result is None:
        return 130
    print(json.dumps(result, indent=2))
    print(machine())
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0 if result["nodes_up_at_end"] >= args.nodes else 1


if __name__ == "__main__":
    sys.exit(main())
