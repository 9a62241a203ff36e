#!/usr/bin/env python3
"""Control-server CPU per node report (issue 10): full reports against delta reports.

Seeds ``--nodes`` nodes with ``--vms-per-node`` running VMs each, then drives the real
:meth:`NodeRegistry.report` (no HTTP, no TLS) with the reports the nodes would send, one
round (one report per node) at a time, and prints the CPU per report of each round:

- ``full``: every list (what every report carried before delta reports; with them, a
  full report that repeats the holdings is taken as a delta, and the full reconcile
  runs after a node's restart and every ``FULL_RECONCILE_EVERY``-th full report);
- ``delta, unchanged``: nothing changed on the node (the common case);
- ``delta, 1 VM changed``: one domain of each node changed state (the VM follows: a write);
- ``delta, after changes``: the next round, which re-reads the VMs the database watch
  saw change (the previous round's own writes);
- ``delta, settled``: nothing changed again.

Each round also counts the SQL statements run. The database watch
(``NodeRegistry.watch_changes``, once a second in a server) is timed apart.

The same script runs on the code from before delta reports (full rounds only), for the
figures before. Run: ``PYTHONPATH=. .venv/bin/python benchmarks/report_handling.py --db sqlite`` (or
``--db postgres`` with ``YUN_TEST_POSTGRES_URL`` naming a database of its own: its schema
is dropped and made again). Run under ``flock /tmp/yun-bench.lock``.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import tempfile
import time
import uuid as uuidlib
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import event, insert, text

from yun.config import ControlSettings
from yun.control.allocators.addresses import mac_for
from yun.control.context import ControlContext
from yun.control.db.models import InventoryRow, NodeRow, VmRow
from yun.control.db.session import Database
from yun.control.scheduler.inventory import reported_inventory
from yun.control.services.nodes import NodeRegistry
from yun.proto.components import ComponentType
from yun.proto.membership import Membership
from yun.proto.messages import (
    DomainInfo,
    DomainState,
    HostInfo,
    NodeReport,
    StorageDirReport,
)
from yun.testing.seed import default_project_pool_image

NS = uuidlib.UUID("0b7d4c52-61a8-4f0e-8f1b-6a3e2d9c7f10")


def vm_id(n: int, k: int) -> str:
    return str(uuidlib.uuid5(NS, f"{n}-{k}"))


def host(i: int) -> HostInfo:
    return HostInfo(hostname=f"n{i}", hypervisor="sim", accel="tcg", vcpus=64,
                    memory_mb=262144, disk_gb=4000, cpu_load=0.25, memory_used_mb=50000,
                    disk_used_gb=100)


class Node:
    """What one simulated node holds, and its reports."""

    def __init__(self, i: int, vms: int) -> None:
        self.i = i
        self.uuid = f"node-{i:05d}"
        self.vms = [vm_id(i, k) for k in range(vms)]
        self.states = dict.fromkeys(self.vms, DomainState.RUNNING)
        self.ports = {v: [mac_for(v)] for v in self.vms}
        self.disks = {v: [f"vol-{v}"] for v in self.vms}
        self.volumes = [f"vol-{v}" for v in self.vms]
        self.host = host(i)
        self.storage = [StorageDirReport(path="/var/lib/yun", total_bytes=4 << 40,
                                         used_bytes=1 << 40, volumes=vms)]
        self.seq = 0
        self.boot_id = uuidlib.uuid4().hex

    def domains(self, only: set[str] | None = None) -> list[DomainInfo]:
        return [DomainInfo(uuid=v, name=f"vm-{v[:8]}", state=s, vcpus=1, memory_mb=1024)
                for v, s in self.states.items() if only is None or v in only]

    def report(self, delta: bool, changed: set[str] | None = None) -> NodeReport:
        self.seq += 1
        acked = self.seq - 1
        fields: dict[str, Any] = dict(
            node_id=self.uuid, name=f"n{self.i}", url=f"https://10.0.{self.i // 256}."
            f"{self.i % 256}:7720", host=self.host, boot_id=self.boot_id, seq=self.seq,
            acked_seq=acked, report_interval=10.0)
        if "generation" in NodeReport.model_fields:  # the code before delta reports has none
            from yun.node.agent import holdings_generation

            fields["generation"] = holdings_generation(self.domains(), self.ports, self.disks,
                                                       self.volumes)
        if delta:
            return NodeReport(**fields, domains=self.domains(changed or set()), full=False,
                              delta=True)
        return NodeReport(**fields, domains=self.domains(), ports=self.ports,
                          disks=self.disks, volumes=self.volumes, storage=self.storage)


async def seed(db: Database, nodes: list[Node]) -> None:
    if db.url.startswith("postgresql"):
        async with db.engine.begin() as conn:
            await conn.execute(text("DROP SCHEMA public CASCADE"))
            await conn.execute(text("CREATE SCHEMA public"))
    await db.migrate()
    now = datetime.now(UTC)
    async with db.session() as s:
        project, pool = await default_project_pool_image(s)
    rows: list[dict[str, Any]] = []
    inventories: list[dict[str, Any]] = []
    vms: list[dict[str, Any]] = []
    for n in nodes:
        rows.append(dict(uuid=n.uuid, name=f"n{n.i}", url=n.report(False).url, status="up",
                         admin_state="active", pool_uuid=pool, labels={},
                         capabilities=[], hypervisor="sim", accel="tcg",
                         sandbox_subnet=f"10.{64 + n.i // 256}.{n.i % 256}.0/24",
                         last_report_at=now, created_at=now, updated_at=now))
        for rc, (total, reserved) in reported_inventory(n.host).items():
            inventories.append(dict(node_uuid=n.uuid, resource_class=rc, total=total,
                                    reserved=reserved, used=0))
        for k, v in enumerate(n.vms):
            vms.append(dict(uuid=v, name=f"vm-{n.i}-{k}", project_uuid=project,
                            state="running", power_state="running", vcpus=1, memory_mb=1024,
                            disk_gb=10, image_uuid="img", node_uuid=n.uuid, pool_uuid=pool,
                            mac=mac_for(v), created_at=now, updated_at=now))
        n.seq = 0
    for model, chunk in ((NodeRow, rows), (InventoryRow, inventories), (VmRow, vms)):
        for k in range(0, len(chunk), 5000):
            async with db.session() as s:
                await s.execute(insert(model), chunk[k:k + 5000])


async def run(url: str, args: argparse.Namespace, state_dir: Path) -> None:
    settings = ControlSettings(state_dir=state_dir, database_url=url, name="bench-control")
    db = Database(settings.db_url())
    nodes = [Node(i, args.vms_per_node) for i in range(args.nodes)]
    t0 = time.perf_counter()
    await seed(db, nodes)
    print(f"{db.url.split(':')[0]}: seeded {args.nodes} nodes x {args.vms_per_node} VMs in "
          f"{time.perf_counter() - t0:.1f} s", flush=True)
    membership = Membership(settings, ComponentType.CONTROL, url="")
    ctx = ControlContext(settings=settings, db=db, membership=membership)
    registry = NodeRegistry(ctx)
    statements = [0]

    def count(*_: Any) -> None:
        statements[0] += 1
    event.listen(db.engine.sync_engine, "before_cursor_execute", count)
    has_deltas = "generation" in NodeReport.model_fields

    async def round_(label: str, delta: bool, change: bool = False) -> None:
        reports = []
        for n in nodes:
            changed: set[str] = set()
            if change:  # one domain flips between running and shut off
                v = n.vms[n.seq % len(n.vms)]
                n.states[v] = (DomainState.SHUTOFF if n.states[v] is DomainState.RUNNING
                               else DomainState.RUNNING)
                changed = {v}
            reports.append(n.report(delta, changed))
        before = statements[0]
        wall0, cpu0 = time.perf_counter(), time.process_time()
        for r in reports:
            answer = await registry.report(r)
            if getattr(answer, "full_report", False):
                raise SystemExit(f"{label}: the registry asked {r.node_id} for a full report")
        wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
        print(f"  {label:<24} {cpu / len(reports) * 1e6:8.0f} µs CPU per report "
              f"({len(reports)} reports, {wall:.2f} s wall), "
              f"{(statements[0] - before) / len(reports):.2f} SQL statements per report",
              flush=True)
        wall0, cpu0 = time.perf_counter(), time.process_time()
        if has_deltas:
            notes = await registry.watch_changes()
            if notes:
                print(f"  {'':<24} database watch after it: {notes} VMs noted, "
                      f"{(time.process_time() - cpu0) * 1e3:.1f} ms CPU", flush=True)

    logging.getLogger("yun.control.nodes").setLevel(logging.ERROR)
    await round_("first (full)", False)  # the registry meets each node
    await round_("full", False)
    await round_("full", False)
    if has_deltas:
        # A full report that repeats the holdings is taken as a delta, except every
        # FULL_RECONCILE_EVERY-th: the full reconcile, as after a node's restart.
        for n in nodes:
            n.boot_id, n.seq = uuidlib.uuid4().hex, 0
        await round_("full (full reconcile)", False)
        await round_("full (after restart)", False)
        await round_("delta, unchanged", True)
        await round_("delta, 1 VM changed", True, change=True)
        await round_("delta, after changes", True)
        await round_("delta, settled", True)
        await round_("delta, settled", True)
    await registry.persist_loads()
    await db.dispose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--db", choices=("sqlite", "postgres"), default="sqlite")
    parser.add_argument("--db-url", default="", help="postgres: a database of its own, wiped "
                                                     "(default: $YUN_TEST_POSTGRES_URL)")
    parser.add_argument("--nodes", type=int, default=1000)
    parser.add_argument("--vms-per-node", type=int, default=10)
    args = parser.parse_args()
    if args.nodes < 1 or args.vms_per_node < 1:
        parser.error("--nodes and --vms-per-node must be at least 1")
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="yun-bench-") as tmp:
        if args.db == "sqlite":
            url = args.db_url or f"sqlite+aiosqlite:///{tmp}/control.db"
        else:
            url = args.db_url or os.environ.get("YUN_TEST_POSTGRES_URL", "")
            if not url:
                parser.error("--db postgres needs --db-url or YUN_TEST_POSTGRES_URL")
        asyncio.run(run(url, args, Path(tmp)))


if __name__ == "__main__":
    main()
