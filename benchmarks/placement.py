#!/usr/bin/env python3
"""Placement decisions per second of the pure scheduler: 10,000 nodes, 100,000 VMs.

Builds ``--nodes`` :class:`HostState` snapshots in ``--pools`` pools (sizes, labels,
capabilities and real-time loads varied with a fixed seed), places ``--vms`` VMs'
worth of usage on them, then times ``--selects`` placements the way the placement
batch makes them: pick a pool (round robin), :meth:`Scheduler.select` over that pool's
hosts, and replace the chosen host by :meth:`HostState.claimed`. A share of the
requests belongs to anti-affinity groups and a share asks for a label, so those
filters are exercised too.

Prints placements per second, the time per select (median, 99th percentile), the
memory the snapshots take (tracemalloc), and how widely the placements spread. No
database: the lead's DB-backed mode (reading the snapshots, the conditional UPDATE
claim) comes on top of this.

Run: ``PYTHONPATH=. .venv/bin/python benchmarks/placement.py``.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import ipaddress
import logging
import os
import pstats
import random
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
import uuid as uuidlib
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import insert, select, text

from yun.config import ControlSettings
from yun.control.allocators.addresses import mac_for, node_scope
from yun.control.context import ControlContext
from yun.control.db.models import (
    AddressRow,
    AllocationRow,
    ImageRow,
    InventoryRow,
    NodeRow,
    PoolRow,
    ProjectRow,
    VmGroupRow,
    VmRow,
)
from yun.control.db.session import Database
from yun.control.scheduler.hoststate import (
    Capacity,
    GroupSpec,
    HostState,
    PoolPolicy,
    RequestSpec,
)
from yun.control.scheduler.inventory import DISK_GB, MEMORY_MB, VCPU, reported_inventory
from yun.control.scheduler.placement import EMPTY, Request
from yun.control.scheduler.scheduler import NoValidHost, Scheduler
from yun.control.services.nodes import NodeRegistry
from yun.proto.components import ComponentType
from yun.proto.errors import InsufficientCapacity
from yun.proto.membership import Membership
from yun.proto.messages import HostInfo, NodeCapability, NodeReport

log = logging.getLogger("yun.bench.placement")

# (vCPUs, MiB, GiB) of the VMs placed beforehand and asked for in the timed part.
FLAVOURS = [(1, 512, 10), (1, 1024, 20), (2, 2048, 20), (2, 4096, 40), (4, 8192, 80)]
# Host sizes: (cores, MiB, GiB).
SIZES = [(32, 131072, 2000), (48, 196608, 4000), (64, 262144, 4000)]


def build(nodes: int, pools: int, vms: int, rng: random.Random
          ) -> tuple[list[PoolPolicy], list[list[HostState]]]:
    """``pools`` pools and their hosts, with ``vms`` VMs' worth of usage spread over them."""
    policies = [PoolPolicy(uuid=f"pool-{p}", name=f"p{p}") for p in range(pools)]
    used: list[list[int]] = [[0, 0, 0] for _ in range(nodes)]
    for _ in range(vms):
        flavour = rng.choice(FLAVOURS)
        slot = used[rng.randrange(nodes)]
        for k in range(3):
            slot[k] += flavour[k]
    members: list[list[HostState]] = [[] for _ in range(pools)]
    for i in range(nodes):
        cores, mib, gib = rng.choice(SIZES)
        v, m, d = used[i]
        labels = {"ssd": "true"} if i % 3 == 0 else {}
        members[i % pools].append(HostState(
            uuid=f"node-{i:05d}", name=f"n{i}", pool_uuid=policies[i % pools].uuid,
            up=rng.random() > 0.01, active=rng.random() > 0.01,
            vcpu=Capacity(cores, 2, v), memory_mb=Capacity(mib, 4096, m),
            disk_gb=Capacity(gib, 50, d),
            cpu_load=rng.random(), memory_used_mb=int(m * rng.uniform(0.5, 1.0)),
            disk_used_gb=int(d * rng.uniform(0.2, 0.8)), net_load=rng.random() * 0.5,
            labels=labels, capabilities=frozenset({"live_migration", "qos"}),
        ))
    return policies, members


# --------------------------------------------------------------------------- DB mode
#
# A control server's database holding the whole inventory, and the real Placement of a
# ControlContext (batching worker, conditional claims, addresses) fed by concurrent
# creates, with and without every node reporting to the real NodeRegistry.

CAPABILITIES = sorted(str(c) for c in NodeCapability)
NS = uuidlib.UUID("6c1f0e3a-2b9d-4f57-9a55-0d6a1f2e9b11")


def vm_id(kind: str, i: int) -> str:
    """A stable VM uuid (the seeding process and the timing process agree on it)."""
    return str(uuidlib.uuid5(NS, f"{kind}-{i}"))


def node_subnet(i: int) -> str:
    return f"10.{64 + i // 256}.{i % 256}.0/24"


def host_info(i: int, pool_name: str) -> HostInfo:
    """What node ``i`` reports of itself (same figures as the seeded inventory)."""
    cores, mib, gib = SIZES[i % len(SIZES)]
    return HostInfo(hostname=f"n{i}", hypervisor="sim", accel="tcg", vcpus=cores,
                    memory_mb=mib, disk_gb=gib, vcpus_reserved=2, memory_reserved_mb=4096,
                    disk_reserved_gb=50, capabilities=[NodeCapability(c) for c in CAPABILITIES],
                    pool=pool_name)


def rss() -> dict[str, int]:
    """VmHWM and VmRSS of this process, in KiB."""
    found: dict[str, int] = {}
    with open("/proc/self/status") as status:
        for line in status:
            key, _, value = line.partition(":")
            if key in ("VmHWM", "VmRSS"):
                found[key] = int(value.split()[0])
    return found


def postgres_url(args: argparse.Namespace) -> str:
    url = args.db_url or os.environ.get("YUN_TEST_POSTGRES_URL", "")
    if not url:
        raise SystemExit("--db postgres needs --db-url or YUN_TEST_POSTGRES_URL (a database "
                         "of its own: its schema is dropped and made again)")
    return url


async def seed(url: str, args: argparse.Namespace) -> None:
    """Migrate a fresh database and fill it with Core inserts: pools, nodes, inventories,
    the VMs already placed (with allocations and addresses) and the VMs to place."""
    db = Database(url)
    if db.url.startswith("postgresql"):
        async with db.engine.begin() as conn:
            await conn.execute(text("DROP SCHEMA public CASCADE"))
            await conn.execute(text("CREATE SCHEMA public"))
    await db.migrate()
    rng = random.Random(args.seed)
    now = datetime.now(UTC)
    t0 = time.perf_counter()
    async with db.session() as s:
        project = (await s.scalars(select(ProjectRow.uuid))).first()
        default = (await s.scalars(select(PoolRow).where(PoolRow.name == "default"))).one()
        pools = [str(uuidlib.uuid5(NS, f"pool-{p}")) for p in range(args.pools)]
        await s.execute(insert(PoolRow), [dict(
            uuid=pools[p], name=f"p{p}", description="", zone_uuid=default.zone_uuid,
            network_mode=default.network_mode, storage_mode=default.storage_mode,
            thin=True, ha=False, address_pool_uuid=None, qos_level="medium",
            cpu_ratio=default.cpu_ratio, memory_ratio=default.memory_ratio,
            disk_ratio=default.disk_ratio, filters=list(default.filters),
            weights=dict(default.weights)) for p in range(args.pools)])
        await s.execute(insert(ImageRow), [dict(uuid="img", name="img", status="active",
                                                project_uuid=project)])
        await s.execute(insert(VmGroupRow), [dict(
            uuid=f"g{p}", name=f"web{p}", project_uuid=project, policy="anti-affinity")
            for p in range(args.pools)])
    # Usage: every VM on a random node it fits on (the pool's ratios), as placed before.
    ratios_ = (default.cpu_ratio, default.memory_ratio, default.disk_ratio)
    usable = []
    for i in range(args.nodes):
        cores, mib, gib = SIZES[i % len(SIZES)]
        usable.append([int((cores - 2) * ratios_[0]), int((mib - 4096) * ratios_[1]),
                       int((gib - 50) * ratios_[2])])
    used = [[0, 0, 0] for _ in range(args.nodes)]
    per_node: list[int] = [0] * args.nodes
    vms, allocations, addresses = [], [], []
    for v in range(args.vms):
        vcpus, mib, gib = rng.choice(FLAVOURS)
        while True:
            n = rng.randrange(args.nodes)
            u = used[n]
            if (u[0] + vcpus <= usable[n][0] and u[1] + mib <= usable[n][1]
                    and u[2] + gib <= usable[n][2]):
                break
        u[0], u[1], u[2] = u[0] + vcpus, u[1] + mib, u[2] + gib
        per_node[n] += 1
        vm = vm_id("placed", v)
        net = ipaddress.ip_network(node_subnet(n))
        ip = str(net.network_address + 9 + per_node[n])
        vms.append(dict(uuid=vm, name=f"vm{v}", project_uuid=project, state="running",
                        power_state="running", vcpus=vcpus, memory_mb=mib, disk_gb=gib,
                        image_uuid="img", node_uuid=f"node-{n:05d}",
                        pool_uuid=pools[n % args.pools], ip=ip, mac=mac_for(vm),
                        created_at=now, updated_at=now))
        for rc, amount in ((VCPU, vcpus), (MEMORY_MB, mib), (DISK_GB, gib)):
            allocations.append(dict(consumer_uuid=vm, resource_class=rc,
                                    node_uuid=f"node-{n:05d}", amount=amount))
        addresses.append(dict(scope=node_scope(f"node-{n:05d}"), ip=ip, vm_uuid=vm,
                              created_at=now))
    nodes, inventories = [], []
    for i in range(args.nodes):
        info = host_info(i, f"p{i % args.pools}")
        nodes.append(dict(
            uuid=f"node-{i:05d}", name=f"n{i}", url=f"https://10.0.{i // 256}.{i % 256}:7720",
            status="up", admin_state="active", pool_uuid=pools[i % args.pools],
            # A third of each pool's nodes (whatever the pool count) have an SSD.
            labels={"ssd": "true"} if (i // args.pools) % 3 == 0 else {},
            capabilities=CAPABILITIES,
            hypervisor=info.hypervisor, accel=info.accel, cpu_load=rng.random(),
            memory_used_mb=int(used[i][1] * rng.uniform(0.5, 1.0)),
            disk_used_gb=int(used[i][2] * rng.uniform(0.2, 0.8)), net_load=rng.random() / 2,
            sandbox_subnet=node_subnet(i), last_report_at=now, created_at=now,
            updated_at=now))
        for k, (rc, (total, reserved)) in enumerate(reported_inventory(info).items()):
            inventories.append(dict(node_uuid=f"node-{i:05d}", resource_class=rc,
                                    total=total, reserved=reserved, used=used[i][k]))
    to_place = [dict(uuid=vm_id("new", j), name=f"new{j}", project_uuid=project,
                     state="building", vcpus=1, memory_mb=512, disk_gb=10, image_uuid="img",
                     pool_uuid=pools[j % args.pools],
                     group_uuid=f"g{j % args.pools}" if (j // args.pools) % 10 == 0 else None,
                     created_at=now, updated_at=now)
                for j in range(args.placements * 2)]  # one set per timed run
    tables = [(NodeRow, nodes), (InventoryRow, inventories), (VmRow, vms),
              (AllocationRow, allocations), (AddressRow, addresses), (VmRow, to_place)]
    for model, rows in tables:
        for k in range(0, len(rows), 5000):
            async with db.session() as s:
                await s.execute(insert(model), rows[k:k + 5000])
    if db.url.startswith("postgresql"):
        async with db.engine.connect() as conn:
            await conn.execution_options(isolation_level="AUTOCOMMIT")
            await conn.execute(text("ANALYZE"))
    print(f"seeded {args.nodes} nodes in {args.pools} pools, {len(inventories)} inventory "
          f"rows, {args.vms} placed VMs ({len(allocations)} allocations, {len(addresses)} "
          f"addresses), {len(to_place)} VMs to place: {time.perf_counter() - t0:.0f} s",
          flush=True)
    await db.dispose()


@dataclass
class Fleet:
    """The nodes as the reports see them: what each holds (its domains, ports, disks)."""

    pool_names: list[str]
    reports: list[dict[str, Any]] = field(default_factory=list)
    seq: list[int] = field(default_factory=list)
    boot_id: str = "bench-boot"

    @classmethod
    async def load(cls, db: Database, nodes: int, pools: int) -> Fleet:
        fleet = cls([f"p{i % pools}" for i in range(nodes)])
        held: list[list[tuple[str, str, int, int]]] = [[] for _ in range(nodes)]
        async with db.session() as s:
            rows = await s.execute(select(VmRow.uuid, VmRow.name, VmRow.node_uuid,
                                          VmRow.vcpus, VmRow.memory_mb)
                                   .where(VmRow.node_uuid.is_not(None)))
            for uuid, name, node, vcpus, mib in rows:
                held[int(node.removeprefix("node-"))].append((uuid, name, vcpus, mib))
        for i in range(nodes):
            info = host_info(i, fleet.pool_names[i]).model_dump(mode="json")
            fleet.reports.append({
                "node_id": f"node-{i:05d}", "name": f"n{i}",
                "url": f"https://10.0.{i // 256}.{i % 256}:7720", "host": info,
                "domains": [], "ports": {}, "disks": {}, "busy": [], "full": True,
                "boot_id": fleet.boot_id, "report_interval": 10.0})
            for vm in held[i]:
                fleet.hold(i, *vm)
        fleet.seq = [0] * nodes
        return fleet

    def hold(self, i: int, uuid: str, name: str, vcpus: int, mib: int) -> None:
        """Node ``i`` runs the VM now (as if provisioned at once)."""
        report = self.reports[i]
        report["domains"].append({"uuid": uuid, "name": name, "state": "running",
                                  "vcpus": vcpus, "memory_mb": mib})
        report["ports"][uuid] = [mac_for(uuid)]
        report["disks"][uuid] = [f"{uuid}-root"]

    def next_report(self, i: int, rng: random.Random) -> NodeReport:
        """Node ``i``'s next report, validated as the control server's endpoint does."""
        self.seq[i] += 1
        report = self.reports[i]
        host = report["host"]
        host["cpu_load"], host["net_load"] = rng.random(), rng.random() / 2
        return NodeReport.model_validate({**report, "seq": self.seq[i],
                                          "acked_seq": self.seq[i] - 1})


@dataclass
class Reporter:
    """Drives every node's report every ``interval`` seconds into the registry."""

    registry: NodeRegistry
    fleet: Fleet
    interval: float
    concurrency: int
    done: int = 0
    failed: int = 0
    late: int = 0
    times: list[float] = field(default_factory=list)

    async def run(self, rounds: float | None = None) -> None:
        """Report round after round (forever, or ``rounds`` rounds), each node once per
        round, spread evenly: ticks of 0.1 s."""
        nodes = len(self.fleet.reports)
        limit = asyncio.Semaphore(self.concurrency)
        rng = random.Random(3)
        tick = 0.1
        per_tick = nodes * tick / self.interval
        total = None if rounds is None else int(nodes * rounds)
        sent, start = 0, time.perf_counter()
        pending: set[asyncio.Task[None]] = set()

        async def one(i: int) -> None:
            try:
                t0 = time.perf_counter()
                await self.registry.report(self.fleet.next_report(i, rng))
                self.times.append(time.perf_counter() - t0)
                self.done += 1
            except Exception:
                self.failed += 1
                log.exception("report failed", extra={"node": f"node-{i:05d}"})
            finally:
                limit.release()

        try:
            k = 0
            while total is None or sent < total:
                k += 1
                due = int(per_tick * k) if total is None else min(int(per_tick * k), total)
                while sent < due:
                    if limit.locked():
                        self.late += 1  # the registry is behind: the report waits
                    await limit.acquire()
                    task = asyncio.create_task(one(sent % nodes))
                    pending.add(task)
                    task.add_done_callback(pending.discard)
                    sent += 1
                delay = start + k * tick - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
            await asyncio.gather(*pending)
        finally:
            for task in pending:
                task.cancel()


async def timed_placements(ctx: ControlContext, fleet: Fleet, first: int, count: int,
                           pools: list[str], concurrency: int) -> dict[str, float]:
    """Place VMs ``first`` .. ``first + count`` of the seeded "new" ones, ``concurrency``
    creates in flight; return the rate and latencies."""
    limit = asyncio.Semaphore(concurrency)
    latencies: list[float] = []
    refused: Counter[str] = Counter()
    failed: list[BaseException] = []

    async def one(j: int) -> None:
        async with limit:
            p = j % len(pools)
            request = Request(1, 512, 10, (pools[p],),
                              labels={"ssd": "true"} if j % 7 == 0 else EMPTY,
                              group_uuid=f"g{p}" if (j // len(pools)) % 10 == 0 else None)
            t0 = time.perf_counter()
            try:
                placed = await ctx.placement.place(vm_id("new", j), request)
            except InsufficientCapacity as exc:
                refused[str(exc)[:120]] += 1
                return
            except Exception as exc:
                failed.append(exc)
                return
            latencies.append(time.perf_counter() - t0)
            fleet.hold(int(placed.node_uuid.removeprefix("node-")), vm_id("new", j),
                       f"new{j}", 1, 512)

    cpu0, t0 = time.process_time(), time.perf_counter()
    await asyncio.gather(*(one(j) for j in range(first, first + count)))
    elapsed, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    latencies.sort()
    if failed:
        print(f"  {len(failed)} placements FAILED, first: {failed[0]!r}")
    for why, n in refused.most_common(3):
        print(f"  refused {n} x {why}")
    return {"placed": len(latencies), "elapsed": elapsed, "cpu": cpu,
            "rate": len(latencies) / elapsed,
            "p50": statistics.median(latencies) if latencies else 0.0,
            "p95": latencies[int(len(latencies) * 0.95)] if latencies else 0.0,
            "refused": sum(refused.values()), "failed": len(failed)}


def show(label: str, r: dict[str, float]) -> None:
    print(f"{label}: {r['placed']:.0f} placed in {r['elapsed']:.2f} s = {r['rate']:.0f} "
          f"placements/s; latency p50 {r['p50'] * 1e3:.0f} ms, p95 {r['p95'] * 1e3:.0f} ms; "
          f"process CPU {r['cpu']:.2f} s ({r['cpu'] / r['elapsed']:.2f} cores); "
          f"refused {r['refused']:.0f}, failed {r['failed']:.0f}", flush=True)


async def measure(url: str, args: argparse.Namespace, state_dir: Path) -> None:
    """The timed part, in a process that did not seed (so its peak RSS is the server's)."""
    settings = ControlSettings(state_dir=state_dir, database_url=url, name="bench-control")
    db = Database(settings.db_url())
    # As ControlService builds it (yun/control/service.py), without the HTTP server,
    # the flow engine and the domain membership's network part (never started here).
    membership = Membership(settings, ComponentType.CONTROL, url="")
    ctx = ControlContext(settings=settings, db=db, membership=membership)
    registry = NodeRegistry(ctx)
    if args.host_refresh is not None:
        ctx.placement.host_refresh = args.host_refresh
    async with db.session() as s:
        pools = list((await s.scalars(select(PoolRow.uuid).where(PoolRow.name != "default")
                                      .order_by(PoolRow.name))).all())
    fleet = await Fleet.load(db, args.nodes, args.pools)
    profiler = cProfile.Profile() if args.profile else None
    mem = rss()
    print(f"timing process after loading the fleet's report templates: VmRSS "
          f"{mem['VmRSS'] / 1024:.0f} MiB", flush=True)

    # Warm-up: read every pool's hosts once (the first placements of a server do).
    t0 = time.perf_counter()
    async with db.session() as s:
        for p in pools:
            await ctx.placement.read_pool(s, p)
    print(f"reading the {args.nodes} hosts of {len(pools)} pools: "
          f"{time.perf_counter() - t0:.2f} s (every host_refresh = "
          f"{ctx.placement.host_refresh} s per pool while placing)", flush=True)

    if profiler:
        profiler.enable()
    quiet = timed_placements(ctx, fleet, 0, args.placements, pools, args.concurrency)
    show("placements, no reports", await quiet)
    if profiler:
        profiler.disable()

    reporter = Reporter(registry, fleet, args.report_interval, args.report_concurrency)
    # One round to let the registry meet every node (its first report of a node reads
    # the node's inventory), then one measured round with nothing else running.
    t0, cpu0 = time.perf_counter(), time.process_time()
    await reporter.run(rounds=1)
    print(f"first round of reports ({args.nodes}): {time.perf_counter() - t0:.1f} s, "
          f"CPU {time.process_time() - cpu0:.1f} s", flush=True)
    reporter.done = reporter.late = 0
    reporter.times.clear()
    t0, cpu0 = time.perf_counter(), time.process_time()
    await reporter.run(rounds=1)
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    written = await registry.persist_loads()
    reporter.times.sort()
    print(f"reports alone: {reporter.done} in {wall:.1f} s = {reporter.done / wall:.0f}/s "
          f"(goal {args.nodes / args.report_interval:.0f}/s); CPU {cpu:.1f} s = "
          f"{cpu / max(reporter.done, 1) * 1e3:.2f} ms per report, {cpu / wall:.2f} cores; "
          f"latency p50 {statistics.median(reporter.times) * 1e3:.0f} ms, p95 "
          f"{reporter.times[int(len(reporter.times) * 0.95)] * 1e3:.0f} ms; "
          f"{reporter.late} waited for a free slot; failed {reporter.failed}; "
          f"one persist batch wrote {written} loads", flush=True)

    reporter.done = reporter.late = 0
    reporter.times.clear()
    background = asyncio.create_task(reporter.run())
    persist = asyncio.create_task(persist_loop(registry, settings.load_persist_interval))
    await asyncio.sleep(1.0)  # the reports in full flow
    if profiler:
        profiler.enable()
    busy = await timed_placements(ctx, fleet, args.placements, args.placements, pools,
                                  args.concurrency)
    if profiler:
        profiler.disable()
    reports_during = reporter.done
    background.cancel()
    persist.cancel()
    await asyncio.gather(background, persist, return_exceptions=True)
    show("placements, every node reporting", busy)
    print(f"  reports handled meanwhile: {reports_during} = "
          f"{reports_during / busy['elapsed']:.0f}/s (offered "
          f"{args.nodes / args.report_interval:.0f}/s); {reporter.late} waited for a slot",
          flush=True)
    mem = rss()
    print(f"control process memory: VmHWM {mem['VmHWM'] / 1024:.0f} MiB, VmRSS "
          f"{mem['VmRSS'] / 1024:.0f} MiB", flush=True)
    await ctx.placement.stop()
    await registry.stop()
    await db.dispose()
    if profiler:
        stats = pstats.Stats(profiler)
        stats.sort_stats(args.profile_sort).print_stats(args.profile_top)


async def persist_loop(registry: NodeRegistry, interval: float) -> None:
    """What NodeRegistry.start runs for the loads (without its liveness loop, which would
    mark the nodes down in the run without reports)."""
    while True:
        await asyncio.sleep(interval)
        await registry.persist_loads()


def db_main(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="yun-bench-") as tmp:
        state_dir = Path(tmp)
        if args.db == "sqlite":
            url = args.db_url or f"sqlite+aiosqlite:///{state_dir}/control.db"
        else:
            url = postgres_url(args)
        if args.seed_only:
            asyncio.run(seed(url, args))
            return
        # Seed in a child process: the rows built for the bulk inserts must not count
        # in this process's peak RSS.
        child = [sys.executable, __file__, "--db", args.db, "--db-url", url, "--seed-only",
                 *(f"--{k}={getattr(args, k.replace('-', '_'))}"
                   for k in ("nodes", "pools", "vms", "placements", "seed"))]
        subprocess.run(child, check=True)
        logging.basicConfig(level=logging.WARNING)
        # The VMs placed here have no create flow, so the reports that first show their
        # domains make them follow the node ("VM state drifted", one write per VM, as
        # the create flow would make): expected, and not worth a line each.
        logging.getLogger("yun.control.nodes").setLevel(logging.ERROR)
        asyncio.run(measure(url, args, state_dir))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--nodes", type=int, default=10_000)
    parser.add_argument("--pools", type=int, default=10)
    parser.add_argument("--vms", type=int, default=100_000)
    parser.add_argument("--selects", type=int, default=5_000)
    parser.add_argument("--min-feasible", type=int, default=100)
    parser.add_argument("--percentage", type=float, default=None,
                        help="share of a pool to find feasible (default: adaptive)")
    parser.add_argument("--seed", type=int, default=7)
    db = parser.add_argument_group("DB mode (the real Placement and NodeRegistry)")
    db.add_argument("--db", choices=("sqlite", "postgres"), default=None,
                    help="time placements through a control server's database")
    db.add_argument("--db-url", default="",
                    help="postgres: a database of its own, wiped (default: "
                         "$YUN_TEST_POSTGRES_URL)")
    db.add_argument("--placements", type=int, default=5_000,
                    help="placements per timed run (two runs)")
    db.add_argument("--concurrency", type=int, default=1_000,
                    help="creates in flight at once")
    db.add_argument("--host-refresh", type=float, default=None,
                    help="seconds the placement keeps its copy of a pool's hosts "
                         "(default: the Placement's own)")
    db.add_argument("--report-interval", type=float, default=10.0,
                    help="seconds between two reports of one node")
    db.add_argument("--report-concurrency", type=int, default=100,
                    help="reports handled at once (HTTP requests in flight)")
    db.add_argument("--profile", action="store_true",
                    help="cProfile the timed placements and print the top entries")
    db.add_argument("--profile-sort", default="tottime")
    db.add_argument("--profile-top", type=int, default=30)
    db.add_argument("--seed-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    for name in ("nodes", "pools", "vms", "selects", "placements", "concurrency",
                 "report_concurrency"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.report_interval <= 0:
        parser.error("--report-interval must be above 0")
    if args.host_refresh is not None and args.host_refresh < 0:
        parser.error("--host-refresh must be at least 0")
    if args.db:
        db_main(args)
        return
    rng = random.Random(args.seed)

    tracemalloc.start()
    before = tracemalloc.take_snapshot()
    policies, members = build(args.nodes, args.pools, args.vms, rng)
    after = tracemalloc.take_snapshot()
    tracemalloc.stop()
    size = sum(s.size_diff for s in after.compare_to(before, "filename"))
    print(f"{args.nodes} host snapshots in {args.pools} pools, {args.vms} VMs of usage: "
          f"{size / 2**20:.1f} MiB ({size / args.nodes:.0f} B per host)")

    schedulers = [Scheduler(p, min_feasible=args.min_feasible, percentage=args.percentage)
                  for p in policies]
    index = [{h.uuid: i for i, h in enumerate(hosts)} for hosts in members]
    groups = [GroupSpec(uuid=f"g{p}", name=f"web{p}", policy="anti-affinity")
              for p in range(args.pools)]
    sample = schedulers[0].sample_size(len(members[0]))
    print(f"pool size {len(members[0])}, feasible sample {sample}")

    chosen: Counter[str] = Counter()
    times: list[float] = []
    refused: Counter[str] = Counter()
    started, cpu_started = time.perf_counter(), time.process_time()
    for n in range(args.selects):
        p = n % args.pools
        vcpus, mib, gib = FLAVOURS[n % len(FLAVOURS)]
        group = groups[p] if (n // args.pools) % 10 == 0 else None  # a tenth per pool
        labels = {"ssd": "true"} if n % 7 == 0 else {}
        spec = RequestSpec(vcpus, mib, gib, labels=labels, group=group)
        t0 = time.perf_counter()
        try:
            best = schedulers[p].select(members[p], spec)[0]
        except NoValidHost as exc:
            refused[exc.explanation] += 1
            continue
        i = index[p][best.uuid]
        members[p][i] = best.claimed(spec)
        times.append(time.perf_counter() - t0)
        chosen[best.uuid] += 1
        if group is not None:
            groups[p] = GroupSpec(group.uuid, group.name, group.policy,
                                  group.node_uuids | {best.uuid})
    elapsed = time.perf_counter() - started
    cpu = time.process_time() - cpu_started
    times.sort()
    print(f"{args.selects} selects + claims in {elapsed:.2f} s: "
          f"{args.selects / elapsed:.0f} placements/s "
          f"({args.selects / cpu:.0f} per CPU second; the machine is shared)")
    print(f"per select: median {statistics.median(times) * 1e3:.3f} ms, "
          f"p99 {times[int(len(times) * 0.99)] * 1e3:.3f} ms, max {times[-1] * 1e3:.3f} ms")
    print(f"refused {sum(refused.values())}; {len(chosen)} distinct hosts chosen, "
          f"most on one host {max(chosen.values(), default=0)}")
    for explanation, count in refused.most_common(3):
        print(f"  {count} x {explanation}")


if __name__ == "__main__":
    main()
