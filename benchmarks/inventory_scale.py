#!/usr/bin/env python3
"""Inventory at scale: N sim nodes and M VMs on one control server, every node reporting.

The deployment of ``create_throughput.py`` (domain, control, storage and gateway as
separate processes on 127.0.0.1, then ``yun serve sim-nodes --count N``), with heartbeats
and node reports every ``--interval`` seconds (10) and the domain's presence TTL three
intervals, as ``sim_nodes_idle.py`` sets them. For each size of ``--nodes`` (a comma list
runs each size in a fresh deployment) the script

1. brings the cloud up and creates ``--vms-per-node`` x N VMs through the REST API with
   create_throughput's bulk create (``--concurrency`` requests in flight) and prints the
   create rate: the VMs are real records with real domains on the sim nodes;
2. lets one interval pass, then measures two phases:
   * *reports only* (``--quiet-seconds``): the control server's CPU seconds per second
     while nothing but heartbeats, node reports and the lag probes reach it: what the
     inventory costs it;
   * *reads* (``--seconds``): the same, with ``--readers`` keep-alive connections
     reading the API as fast as it answers (``GET /api/v1/vms?limit=50`` and
     ``GET /api/v1/vms/<uuid>`` in turn, over a minimal asyncio HTTP client: httpx would
     spend more CPU per request than the gateway);
   in both, every second the control server's RSS (VmRSS) is sampled; the handling time
   of node reports comes from its ``/metrics`` (``yun_node_report_duration_seconds``:
   wall time per report, awaits included, so an upper bound of its CPU);
3. every ``--lag-every`` seconds powers a running VM off *behind the control server's
   back*: the VM's uuid is written to ``sim-poweroff`` in its sim host's directory (the
   sim driver's test hook, read at the node's next report, no event sent), then the API
   is polled every 0.2 s until the VM shows ``stopped``: the state-propagation lag, in
   seconds and in report intervals;
4. prints a table per size (goals of issue 10 beside the figures) and, labelled as such,
   an extrapolation to ``--target-nodes`` / ``--target-vms`` (10,000 / 100,000) from the
   per-node slopes between the smallest and largest size (from zero with one size).

Creating 100,000 VMs through the API takes most of an hour at today's rate; the script
does it all the same (no seeding of the database behind the API: the VMs must be real).
The sim-nodes process costs about 3 ms of CPU per node per 10 s, so 10,000 nodes need a
bigger machine than the 2-core one the figures in docs/BENCHMARKS.md come from.

Run it under the shared benchmark lock:
``flock /tmp/yun-bench.lock .venv/bin/python benchmarks/inventory_scale.py --nodes 500``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
from create_throughput import (  # benchmarks/create_throughput.py
    RESULTS,
    BenchmarkError,
    Deployment,
    Tee,
    add_bulk_create_options,
    add_database_options,
    add_deployment_options,
    bring_up,
    bulk_create,
    client_cpu,
    fresh_postgres,
    grouped,
    histogram_sums,
    list_all,
    machine,
    new_client,
    pct,
    run_then_stop,
    start_deployment,
    upload_image,
    usage,
)
from sim_nodes_idle import set_intervals  # benchmarks/sim_nodes_idle.py

from yun.node.hypervisor.sim.driver import POWEROFF_FILE

REPORT_FAMILY = "yun_node_report_duration_seconds"
GOALS = {"rss": "< 2 GiB", "report_cpu": "< 50% of a core", "lag": "<= 2 intervals",
         "reads": ">= 1,000/s"}


# --------------------------------------------------------------------------- API reads


@dataclass
class Reads:
    """What the read loop measured."""

    latencies: list[float] = field(default_factory=list)
    pages: int = 0  # of them, GET /api/v1/vms?limit=50 (the others: one VM)
    errors: int = 0
    statuses: dict[int, int] = field(default_factory=dict)


async def read_loop(dep: Deployment, vm_uuids: list[str], connections: int,
                    stop: asyncio.Event) -> Reads:
    """``connections`` keep-alive HTTP/1.1 connections to the gateway, each sending its
    next GET when the previous answer is in, until ``stop``: a page of VMs, then one VM,
    in turn. A connection that breaks (the server closed it) is opened again."""
    host, port = "127.0.0.1", dep.ports["gateway"]
    auth = f"Authorization: Bearer {dep.token}\r\n"
    reads = Reads()

    def request(i: int) -> bytes:
        path = (f"/api/v1/vms/{random.choice(vm_uuids)}" if i % 2
                else "/api/v1/vms?limit=50")
        return f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\n{auth}\r\n".encode()

    async def connection() -> None:
        i = random.randrange(2)
        while not stop.is_set():
            try:
                reader, writer = await asyncio.open_connection(host, port)
            except OSError:
                reads.errors += 1
                await asyncio.sleep(0.1)
                continue
            try:
                while not stop.is_set():
                    i += 1
                    t = time.monotonic()
                    writer.write(request(i))
                    head = await reader.readuntil(b"\r\n\r\n")
                    status = int(head.split(b" ", 2)[1])
                    length = 0
                    for line in head.split(b"\r\n")[1:]:
                        name, _, value = line.partition(b":")
                        if name.strip().lower() == b"content-length":
                            length = int(value)
                    await reader.readexactly(length)
                    reads.latencies.append(time.monotonic() - t)
                    reads.pages += i % 2 == 0
                    reads.statuses[status] = reads.statuses.get(status, 0) + 1
                    reads.errors += status != 200
            except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError,
                    ValueError):
                reads.errors += 1
            finally:
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()

    await asyncio.gather(*(connection() for _ in range(connections)))
    return reads


# --------------------------------------------------------------------------- lag probes


@dataclass
class Probe:
    vm_uuid: str
    node: str
    lag_s: float | None = None  # None: not seen within the probe's timeout
    last_state: str = ""


async def probe_lag(api: Any, sim_dir: Path, vm: dict[str, Any], node: str,
                    timeout: float) -> Probe:
    """Power ``vm`` off on its sim host behind the control server's back; the seconds
    until the API shows it stopped (polled every 0.2 s)."""
    probe = Probe(vm["uuid"], node)
    host_dir = sim_dir / node
    tmp = host_dir / f".{POWEROFF_FILE}.{os.getpid()}"
    tmp.write_text(vm["uuid"] + "\n")
    os.replace(tmp, host_dir / POWEROFF_FILE)  # whole or absent when the node reads it
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        with contextlib.suppress(Exception):
            resp = await api.get(f"/api/v1/vms/{vm['uuid']}")
            probe.last_state = str(resp.json().get("state", resp.status_code))
            if probe.last_state == "stopped":
                probe.lag_s = time.monotonic() - started
                return probe
        await asyncio.sleep(0.2)
    return probe


# --------------------------------------------------------------------------- the phases


async def control_metrics(dep: Deployment) -> str:
    """The control server's ``/metrics``. Its port wants a client certificate of the
    domain CA (docs/OPERATIONS.md "Metrics"): the control server's own identity files,
    ``<state_dir>/ids/control-control.crt`` and ``.key``; its certificate is not checked."""
    ids = dep.root / "state" / "control" / "ids"
    cert = (str(ids / "control-control.crt"), str(ids / "control-control.key"))
    try:
        async with httpx.AsyncClient(verify=False, cert=cert, timeout=30) as client:
            resp = await client.get(f"https://127.0.0.1:{dep.ports['control']}/metrics")
    except (httpx.HTTPError, OSError) as exc:
        raise BenchmarkError(f"control server /metrics with {cert[0]}: {exc!r}") from exc
    if resp.status_code != 200 or REPORT_FAMILY not in resp.text:
        raise BenchmarkError(f"control server /metrics: {resp.status_code}, no "
                             f"{REPORT_FAMILY} in {resp.text[:200]!r}")
    return resp.text


def report_totals(text: str) -> tuple[float, float]:
    """(reports handled, seconds spent handling them) so far, over every label set."""
    count = total = 0.0
    for (family, _), (n, seconds) in histogram_sums(text).items():
        if family == REPORT_FAMILY:
            count += n
            total += seconds
    return count, total


async def phase(dep: Deployment, api: Any, args: argparse.Namespace, seconds: float,
                readers: int, vms: list[dict[str, Any]], node_names: dict[str, str],
                used_nodes: set[str], probes: list[Probe]) -> dict[str, Any]:
    """One measured window: CPU of every process, the control server's RSS every second,
    report handling from /metrics, lag probes, and ``readers`` read connections."""
    sim_dir = dep.root / "state" / "nodes" / "sim-hosts"
    stop = asyncio.Event()
    uuids = [v["uuid"] for v in vms]
    reading = (asyncio.create_task(read_loop(dep, uuids, readers, stop))
               if readers else None)
    metrics_before = report_totals(await control_metrics(dep))
    before, client_before = usage(dep), client_cpu()
    rss: list[int] = []
    started = time.monotonic()
    next_probe = started
    pending: list[asyncio.Task[Probe]] = []
    while (now := time.monotonic()) - started < seconds:
        rss.append(dep.services["control"].memory_kib()["VmRSS"])
        if now >= next_probe:
            # A VM still running on a node not probed yet: two probes never share a
            # node's request file.
            candidates = [v for v in vms if v["state"] == "running"
                          and node_names[v["node_uuid"]] not in used_nodes]
            if candidates:
                vm = random.choice(candidates)
                vm["state"] = "stopped"  # not chosen again
                name = node_names[vm["node_uuid"]]
                used_nodes.add(name)
                pending.append(asyncio.create_task(probe_lag(
                    api, sim_dir, vm, name, args.lag_timeout_intervals * args.interval)))
            next_probe += args.lag_every
        dead = [s.name for s in dep.services.values() if s.exited()]
        if dead:
            raise BenchmarkError(f"{', '.join(dead)} exited during the measurement")
        await asyncio.sleep(1.0)
    elapsed = time.monotonic() - started
    after, client_after = usage(dep), client_cpu()
    metrics_after = report_totals(await control_metrics(dep))
    stop.set()
    reads = await reading if reading is not None else Reads()
    # Probes started late in the window finish after it (their lag still counts).
    probes.extend(await asyncio.gather(*pending))
    cpu = {n: (after[n]["cpu_s"] - before[n]["cpu_s"]) / elapsed
           for n in after if n in before}
    cpu["client"] = (client_after - client_before) / elapsed
    reports = metrics_after[0] - metrics_before[0]
    return {
        "seconds": round(elapsed, 1), "readers": readers,
        "cpu_per_s": {n: round(v, 3) for n, v in cpu.items()},
        "control_rss_kib": {"min": min(rss), "max": max(rss),
                            "mean": round(statistics.fmean(rss))},
        "reports_per_s": round(reports / elapsed, 1),
        "reports_expected_per_s": round(args.nodes_now / args.interval, 1),
        "report_handling_share": round((metrics_after[1] - metrics_before[1]) / elapsed, 4),
        "report_handling_ms_mean": (round(1000 * (metrics_after[1] - metrics_before[1])
                                          / reports, 2) if reports else None),
        "reads_per_s": round(len(reads.latencies) / elapsed, 1),
        "list_pages_per_s": round(reads.pages / elapsed, 1),
        "single_vm_reads_per_s": round((len(reads.latencies) - reads.pages) / elapsed, 1),
        "read_p50_ms": (round(1000 * statistics.median(reads.latencies), 1)
                        if reads.latencies else None),
        "read_p95_ms": (round(1000 * pct(reads.latencies, 0.95), 1)
                        if reads.latencies else None),
        "read_errors": reads.errors, "read_statuses": reads.statuses,
    }


async def measure(dep: Deployment, args: argparse.Namespace) -> dict[str, Any]:
    """Bring one size up, create its VMs, measure both phases."""
    nodes, vms_total = args.nodes_now, args.nodes_now * args.vms_per_node
    async with new_client(dep, args.concurrency) as api:
        t = time.monotonic()
        await bring_up(dep, api, nodes, args.startup_timeout)
        print(f"{nodes} nodes up after {time.monotonic() - t:.1f} s", flush=True)
        await upload_image(dep, api, args.startup_timeout)
        bulk = await bulk_create(api, vms_total, args.concurrency, args.timeout)
        failures = [*bulk.rejected, *bulk.failed]
        create_s = max(bulk.last_finished, bulk.last_accepted) - bulk.first_request
        rate = (vms_total - len(failures)) / create_s if create_s > 0 else 0.0
        print(f"created {vms_total - len(failures)} of {vms_total} VMs in {create_s:.0f} s: "
              f"{rate:.1f} VMs/s (concurrency {args.concurrency})", flush=True)
        for count, cause in grouped(failures):
            print(f"  {count} x {cause}", flush=True)
        vms = [v for v in await list_all(api, "/api/v1/vms") if v["state"] == "running"]
        node_names = {n["uuid"]: n["name"] for n in await list_all(api, "/api/v1/nodes")}
        if not vms:
            raise BenchmarkError("no VM runs after the bulk create: nothing to measure")
        print(f"{len(vms)} VMs running; settling for one interval ({args.interval:.0f} s)",
              flush=True)
        await asyncio.sleep(args.interval)
        used: set[str] = set()
        probes: list[Probe] = []
        quiet = await phase(dep, api, args, args.quiet_seconds, 0, vms, node_names, used,
                            probes)
        print(f"reports only: {json.dumps(quiet)}", flush=True)
        busy = await phase(dep, api, args, args.seconds, args.readers, vms, node_names,
                           used, probes)
        print(f"with reads: {json.dumps(busy)}", flush=True)
        nodes_up = int((await api.get("/api/v1/nodes", params={
            "q": "status=up", "limit": 1, "count": "true"})).json()["total"])
    control = dep.services["control"].memory_kib()
    lags = [p.lag_s for p in probes if p.lag_s is not None]
    return {
        "nodes": nodes, "vms": len(vms), "vms_asked": vms_total, "interval_s": args.interval,
        "create": {"seconds": round(create_s, 1), "vms_per_second": round(rate, 1),
                   "failures": len(failures)},
        "reports_only": quiet, "with_reads": busy, "nodes_up_at_end": nodes_up,
        "control_peak_rss_kib": control["VmHWM"],  # the bulk create's peak included
        "control_window_peak_rss_kib": max(quiet["control_rss_kib"]["max"],
                                           busy["control_rss_kib"]["max"]),
        "lag": {"probes": len(probes), "seen": len(lags),
                "not_seen": [f"{p.vm_uuid} on {p.node} (last {p.last_state})"
                             for p in probes if p.lag_s is None],
                "p50_s": round(statistics.median(lags), 2) if lags else None,
                "max_s": round(max(lags), 2) if lags else None,
                "all_s": [round(x, 2) for x in lags]},
    }


# --------------------------------------------------------------------------- the report


def table(results: list[dict[str, Any]]) -> list[str]:
    """One column per size, the issue's goals beside."""
    def rows(r: dict[str, Any]) -> dict[str, str]:
        lag, interval = r["lag"], r["interval_s"]
        lag_text = (f"p50 {lag['p50_s']:.1f} s ({lag['p50_s'] / interval:.2f} iv), "
                    f"max {lag['max_s']:.1f} s ({lag['max_s'] / interval:.2f} iv)"
                    if lag["seen"] else "never seen")
        if lag["not_seen"]:
            lag_text += f", {len(lag['not_seen'])} of {lag['probes']} not seen"
        quiet, busy = r["reports_only"], r["with_reads"]
        return {
            "nodes / VMs": f"{r['nodes']} / {r['vms']}",
            "create rate": f"{r['create']['vms_per_second']:.1f} VMs/s",
            "control RSS in window (max)": f"{r['control_window_peak_rss_kib'] / 1024:.0f} MiB",
            "control VmHWM (create incl.)": f"{r['control_peak_rss_kib'] / 1024:.0f} MiB",
            "control CPU, reports only": f"{100 * quiet['cpu_per_s']['control']:.1f}% of a core",
            "report handling (wall)": f"{100 * quiet['report_handling_share']:.1f}% "
                                      f"({quiet['report_handling_ms_mean']} ms/report)",
            "reports/s (expected)": f"{quiet['reports_per_s']} ({quiet['reports_expected_per_s']})",
            "state lag": lag_text,
            "API reads/s": f"{busy['reads_per_s']:.0f} (p50 {busy['read_p50_ms']} ms, "
                           f"{busy['read_errors']} errors)",
            "  of which pages / one VM": f"{busy['list_pages_per_s']:.0f} / "
                                         f"{busy['single_vm_reads_per_s']:.0f}",
            "control CPU, with reads": f"{100 * busy['cpu_per_s']['control']:.1f}%",
            "CPU/s reports only": ", ".join(f"{n} {v:.2f}"
                                            for n, v in quiet["cpu_per_s"].items()),
            "CPU/s with reads": ", ".join(f"{n} {v:.2f}"
                                          for n, v in busy["cpu_per_s"].items()),
        }

    goals = {"control RSS in window (max)": GOALS["rss"],
             "control CPU, reports only": GOALS["report_cpu"],
             "report handling (wall)": GOALS["report_cpu"], "state lag": GOALS["lag"],
             "API reads/s": GOALS["reads"]}
    columns = [rows(r) for r in results]
    widths = [max(len(v) for v in c.values()) for c in columns]
    lines = []
    for key in columns[0]:
        cells = "  ".join(f"{c[key]:<{w}}" for c, w in zip(columns, widths, strict=True))
        lines.append(f"  {key:<30} {cells}  {goals.get(key, '')}")
    return lines


def extrapolate(results: list[dict[str, Any]], target_nodes: int,
                target_vms: int) -> list[str]:
    """EXTRAPOLATION, not a measurement: control RSS and report CPU as a line through
    the smallest and largest size (through zero with one size), by node count; the
    VMs per node are those measured, so the target's ratio should match them."""
    small, large = results[0], results[-1]

    def line(key: Any) -> tuple[float, float]:
        y1 = key(large)
        if large["nodes"] == small["nodes"]:
            return y1 / large["nodes"], 0.0
        slope = (y1 - key(small)) / (large["nodes"] - small["nodes"])
        if slope < 0:  # noise larger than the difference: the pessimistic line instead
            return y1 / large["nodes"], 0.0
        return slope, y1 - slope * large["nodes"]

    out = [f"EXTRAPOLATION to {target_nodes} nodes / {target_vms} VMs (not measured: a "
           f"line through {'the sizes ' + ', '.join(str(r['nodes']) for r in results)}"
           f"{' and zero' if len(results) == 1 else ''}, by node count, through zero "
           f"where that slope is negative: noise; measured at "
           f"{large['vms'] / large['nodes']:.1f} VMs per node, the target has "
           f"{target_vms / target_nodes:.1f})"]
    for label, key, fmt in (
            ("control RSS", lambda r: r["control_window_peak_rss_kib"] / 1024,
             lambda v: f"{v:.0f} MiB ({v / 1024:.2f} GiB; goal {GOALS['rss']})"),
            ("control CPU, reports only", lambda r: r["reports_only"]["cpu_per_s"]["control"],
             lambda v: f"{100 * v:.0f}% of a core (goal {GOALS['report_cpu']})"),
            ("report handling (wall)", lambda r: r["reports_only"]["report_handling_share"],
             lambda v: f"{100 * v:.0f}% of a core (goal {GOALS['report_cpu']})"),
            ("sim-nodes CPU", lambda r: r["reports_only"]["cpu_per_s"]["sim-nodes"],
             lambda v: f"{v:.2f} cores (the simulator, not the control plane)")):
        slope, base = line(key)
        out.append(f"  {label:<28} {fmt(base + slope * target_nodes)}  "
                   f"[slope {slope:.3g}/node, base {base:.3g}]")
    return out


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="benchmarks/inventory_scale.py",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", default="500",
                        help="sim nodes; a comma list runs each size in turn, in a fresh "
                             "deployment (default 500; the issue's target is 10000)")
    parser.add_argument("--vms-per-node", type=int, default=10,
                        help="VMs created per node, 1 vCPU and 256 MiB each (default 10)")
    parser.add_argument("--interval", type=float, default=10.0,
                        help="heartbeat and report interval in s (default 10)")
    parser.add_argument("--seconds", type=float, default=300.0,
                        help="length of the phase with API reads in s (default 300)")
    parser.add_argument("--quiet-seconds", type=float, default=60.0,
                        help="length of the reports-only phase before it in s (default 60)")
    parser.add_argument("--readers", type=int, default=16,
                        help="concurrent keep-alive read connections (default 16)")
    parser.add_argument("--lag-every", type=float, default=10.0,
                        help="seconds between two lag probes (default 10)")
    parser.add_argument("--lag-timeout-intervals", type=float, default=6.0,
                        help="a probe not seen after this many intervals counts as not "
                             "seen (default 6)")
    add_bulk_create_options(parser)
    parser.add_argument("--target-nodes", type=int, default=10_000,
                        help="size the figures are extrapolated to (default 10000)")
    parser.add_argument("--target-vms", type=int, default=100_000,
                        help="VMs of that size (default 100000)")
    add_database_options(parser)
    parser.add_argument("--save", action="store_true",
                        help="keep the output and figures under benchmarks/results/"
                             "<date>-inventory-<db>-<nodes>/")
    add_deployment_options(parser, sized_by_run=True)
    args = parser.parse_args(argv)
    try:
        args.sizes = sorted({int(n) for n in args.nodes.split(",")})
    except ValueError:
        parser.error(f"--nodes must be a number or a comma list of numbers, not "
                     f"{args.nodes!r}")
    if not args.sizes or min(args.sizes) < 1:
        parser.error("--nodes must be at least 1")
    for name in ("vms_per_node", "concurrency", "target_nodes", "target_vms"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    for name in ("interval", "seconds", "quiet_seconds", "lag_every",
                 "lag_timeout_intervals"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be positive")
    if args.readers < 0:
        parser.error("--readers must be 0 or more")
    return args


def run_size(args: argparse.Namespace, nodes: int, database_url: str
             ) -> dict[str, Any] | None:
    """One deployment of ``nodes`` nodes, measured and stopped (None: interrupted)."""
    args.nodes_now = nodes
    vms = nodes * args.vms_per_node
    # 35 VMs/s today: the bulk's bound grows with its size; joins ~0.2 s per node.
    args.timeout = args.timeout_arg or max(240.0, vms / 10)
    args.startup_timeout = args.startup_arg or max(90.0, nodes * 0.2)
    # Room for the VMs and some unevenness of placement (1 vCPU, 256 MiB each).
    vcpus = max(16, 2 * args.vms_per_node)
    root = Path(tempfile.mkdtemp(prefix="yun-bench-inventory-"))
    dep = start_deployment(root, nodes, vcpus, 256 * vcpus, None, database_url)
    set_intervals(root / "yun.toml", args.interval)
    return run_then_stop(root, dep, args.keep_logs, lambda: asyncio.run(measure(dep, args)))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.timeout_arg, args.startup_arg = args.timeout, args.startup_timeout
    tee = Tee(sys.stdout)
    if args.save:
        sys.stdout = tee
    started = time.monotonic()
    print(machine(), flush=True)
    results: list[dict[str, Any]] = []
    try:
        for nodes in args.sizes:
            print(f"--- {nodes} nodes x {args.vms_per_node} VMs, database {args.db}, "
                  f"interval {args.interval:.0f} s", flush=True)
            if args.db == "postgres":
                with fresh_postgres(args.postgres_url) as url:
                    result = run_size(args, nodes, url)
            else:
                result = run_size(args, nodes, "")
            if result is None:
                return 130
            results.append(result)
    except BenchmarkError as exc:
        print(f"benchmark failed: {exc}", file=sys.stderr)
        return 2
    finally:
        if results:
            print("\nInventory at scale (measured)")
            print("\n".join(table(results)))
            print("\n".join(extrapolate(results, args.target_nodes, args.target_vms)))
            print(f"benchmark wall time {time.monotonic() - started:.0f} s; {machine()}")
        if args.save:
            sys.stdout = tee.stream
            folder = RESULTS / (f"{datetime.now(UTC):%Y-%m-%d}-inventory-{args.db}-"
                                f"{'+'.join(str(n) for n in args.sizes)}")
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "output.txt").write_text("".join(tee.kept))
            (folder / "figures.json").write_text(json.dumps(results, indent=2) + "\n")
            print(f"kept in {folder}")
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    ok = all(r["lag"]["seen"] == r["lag"]["probes"] and r["create"]["failures"] == 0
             and r["nodes_up_at_end"] >= r["nodes"] for r in results)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
