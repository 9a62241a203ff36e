"""The node registry, fed by the nodes' reports, and reconciliation of what runs (rule 4).

Liveness follows the nodes' own reports: a node is down when no report came for
``DOWN_AFTER_REPORTS`` report intervals (at least ``DOWN_AFTER_MIN`` seconds), never
because the domain server's peer list changed (a domain-server restart makes every peer
look removed for a moment, and must change nothing for running work).

Reconciliation. A node's report lists what it holds for each VM: domains (with their
state), ports (network reservations) and disks, plus the VMs it is working on. A VM
*owns* what its node holds for it when it is placed on that node and is not marked
``node_cleanup`` (and not ``deleting`` with no task). Anything else the node holds is an
*orphan*, removed by a background cleanup job (at most one per node in flight, off the
report path). A VM with a task under way (an unfinished flow, or queued here) is left
to its task. Otherwise, for a report taken after the VM's last recorded change:

==========================  ==============================  ==========================
VM state                    domain on the node (state S)    nothing of the VM's domain
==========================  ==============================  ==========================
running, stopped, unknown,  follows S: running/paused ->    error "the domain vanished";
error, building, starting,  running; shutoff -> stopped;    node_cleanup: address and
stopping, rebooting (the    crashed -> error "the guest     reservation released when
flow that set it is gone)   crashed"                        ports and disks are gone too
error + node_cleanup        orphan: removed by cleanup      released (address,
(create rolled back, node                                   reservation) when ports and
unreachable)                                                disks are gone too; stays
                                                            error with its reason
deleting, no task (deleted  orphan: removed by cleanup      delete finished when ports
while its node was down)                                    and disks are gone too:
                                                            address, reservation, quota
                                                            released, record removed
==========================  ==============================  ==========================

"Released" needs the node to confirm it holds nothing for the VM: no domain, port, disk
and no operation under way in the same full report. A node that was down is marked up
again only when its report shows no orphan, so nothing is placed on it while the
leftovers of VMs deleted in its absence still run.

Reports at scale (issue 10). The control server keeps each node's live state in memory
(:class:`_Live`: what it holds, its domains' states, identity, status) and most reports
touch no database:

- A node sends the full lists every ``FULL_REPORT_EVERY`` reports, after its restart, when
  what it holds changed (its ``generation``, a hash of its domains, ports, disks and
  volumes, moved), and when this server asks for them (``full_report`` in the answer:
  it has no state of the node, e.g. after its own restart). A full report runs the full
  reconcile above and replaces the live state.
- Otherwise it sends a *delta*: the domains whose state changed since the report this
  server last answered. With the generation unchanged, the live state merged with the
  delta is what a full report would have said, so the same table applies, but only to
  the VMs that can have changed: those the delta names, those left waiting last time (a
  task under way, or a change newer than the report), and those the database says
  changed since (below). One transaction reads them by primary key; none when there are
  none. A node that is not up gets ``full_report`` instead: only a full report marks it up.
- A full report that repeats the live state's holdings (same boot and generation) is
  taken as a delta of the domains whose state differs, except every
  ``FULL_RECONCILE_EVERY``-th, which runs the full reconcile: the database is read in
  full for a node a few times an hour, not at every sixth report.
- Changes in the database come from this server's flows and from every other control
  server's: :meth:`NodeRegistry.watch_changes` reads, every ``WATCH_INTERVAL``, the VMs
  whose ``updated_at`` moved (indexed), with a ``WATCH_MARGIN`` of overlap for
  transactions that committed late, and notes each under its node and under the node
  that holds it. Each node's next report re-checks them.
- The load and ``last_report_at`` stay in memory and are written in batches
  (:class:`LiveLoads`); down detection reads them from memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from yun.control.context import ControlContext
from yun.control.db.models import FlowRow, NodeRow, PoolRow, RouterRow, VmRow, utcnow
from yun.control.db.tags import tags_of
from yun.control.flows.engine import UNFINISHED
from yun.control.flows.vm import finish_delete, release_placement
from yun.control.flows.volumes import volumes_going_with
from yun.control.network.subnets import assign_sandbox_subnet, sandbox_settings
from yun.control.nodeclient import node_client_at
from yun.control.scheduler.inventory import (
    DISK_GB,
    MEMORY_MB,
    RESOURCE_CLASSES,
    VCPU,
    inventories,
    reported_inventory,
    sync_inventory,
)
from yun.control.scheduler.loads import LiveLoads, Load
from yun.control.services.events import STORAGE_THRESHOLD, record_event
from yun.proto.errors import NotFound, YunError
from yun.proto.messages import (
    DomainInfo,
    DomainState,
    NodeCapability,
    NodeReport,
    NodeReportAnswer,
    StorageDirReport,
)
from yun.proto.network import SandboxSettings
from yun.proto.resources import (
    EventState,
    Inventory,
    NetworkMode,
    Node,
    NodeAdminState,
    NodeLoad,
    NodeStatus,
    ResourceClass,
    StorageDir,
    VmState,
)
from yun.util.metrics import NODE_REPORT_SECONDS, REPORT_GAPS

NODE_CAPABILITIES = {c.value for c in NodeCapability}

log = logging.getLogger("yun.control.nodes")

# How a VM's state follows what its node reports, for VMs not in the middle of a task.
OBSERVED_TO_STATE = {
    DomainState.RUNNING: VmState.RUNNING,
    DomainState.PAUSED: VmState.RUNNING,
    DomainState.SHUTOFF: VmState.STOPPED,
    DomainState.CRASHED: VmState.ERROR,
}
# A node is down after this many report intervals without a report (and at least
# DOWN_AFTER_MIN seconds): generous, because a loaded control server may answer late.
DOWN_AFTER_REPORTS = 6
DOWN_AFTER_MIN = 6.0
DEFAULT_REPORT_INTERVAL = 2.0
CLEANUP_PARALLEL = 8
LOAD_PERSIST_CHUNK = 500
# A storage directory's use is written again when it moved by this share of its size
# (or its volumes, mount or alarm changed): not on every report.
STORAGE_WRITE_STEP = 0.01
CLEANUP_TIMEOUT = 120.0
# How often the database is read for VMs changed by any control server, and how far back
# each read looks beyond the previous one (a transaction stamps updated_at before it commits).
WATCH_INTERVAL = 1.0
WATCH_MARGIN = 10.0
# Of a node's full reports that repeat what it holds, every this many runs the full
# reconcile (every 5th: every 30th report with the node's FULL_REPORT_EVERY of 6); the
# others are taken as deltas (the live state and the watch make them equivalent).
FULL_RECONCILE_EVERY = 5


@dataclass(frozen=True)
class _Answered:
    """The last report of a node this control server finished acting on."""

    boot_id: str
    seq: int
    done_at: datetime


Identity = tuple[str, str, str, str, list[str], str | None]


@dataclass(slots=True)
class _Live:
    """What this server knows of a node from its last full report and the deltas since."""

    boot_id: str
    generation: int
    domains: dict[str, DomainState]
    holding: frozenset[str]
    identity: Identity
    up: bool
    storage: list[dict[str, Any]] | None
    sandbox: SandboxSettings | None
    # VMs to look at again on the next report: left to a task, or changed after the report.
    pending: set[str] = field(default_factory=set)
    # Full reports taken as deltas since the last full reconcile.
    fulls: int = 0


def identity_of(report: NodeReport) -> Identity:
    """The node's identity columns as the report gives them."""
    host = report.host
    return (report.name, report.url, host.hypervisor, host.accel,
            sorted(str(c) for c in host.capabilities), host.forward_address)


def used_percent(total: int, used: int) -> float:
    """``used`` as a percentage of ``total`` (0 for an empty file system)."""
    return round(100.0 * used / total, 1) if total > 0 else 0.0


def storage_dirs(stored: list[dict[str, Any]] | None) -> list[StorageDir]:
    """The API view of a node's storage directories as last persisted."""
    dirs = []
    for raw in stored or []:
        d = StorageDirReport.model_validate(raw)
        dirs.append(StorageDir(path=d.path, shared=d.shared, total_bytes=d.total_bytes,
                               used_bytes=d.used_bytes,
                               used_percent=used_percent(d.total_bytes, d.used_bytes),
                               volumes=d.volumes, allocated_bytes=d.allocated_bytes,
                               over_threshold=d.over_threshold))
    return dirs


def storage_changed(old: list[dict[str, Any]] | None, new: list[dict[str, Any]]) -> bool:
    """Whether a node's storage report is worth writing: a directory came or went, its
    mount, volume count or alarm changed, or its use moved by ``STORAGE_WRITE_STEP`` of
    its size (smaller moves wait: the figures shown may lag by that much)."""
    before = {d.get("path"): d for d in old or []}
    if set(before) != {d["path"] for d in new}:
        return True
    for d in new:
        was = before[d["path"]]
        if any(was.get(k) != d[k] for k in ("shared", "volumes", "over_threshold",
                                             "total_bytes")):
            return True
        step = max(1, int(d["total_bytes"] * STORAGE_WRITE_STEP))
        if any(abs(int(was.get(k) or 0) - d[k]) >= step
               for k in ("used_bytes", "allocated_bytes")):
            return True
    return False


def threshold_flips(old: list[dict[str, Any]] | None, new: list[dict[str, Any]]
                    ) -> list[tuple[dict[str, Any], bool]]:
    """The directories whose alarm changed: (directory, now over the threshold). A
    directory seen for the first time raises its alarm if it is over already."""
    before = {d.get("path"): bool(d.get("over_threshold")) for d in old or []}
    return [(d, bool(d["over_threshold"])) for d in new
            if before.get(d["path"], False) != bool(d["over_threshold"])]


async def get_node(session: AsyncSession, node_uuid: str) -> NodeRow:
    node = await session.get(NodeRow, node_uuid)
    if node is None:
        raise NotFound(f"no node {node_uuid}")
    return node


async def node_models(session: AsyncSession, rows: list[NodeRow],
                      loads: LiveLoads | None = None) -> list[Node]:
    """The API view of nodes: capacity from their inventories with their pools' ratios,
    the live load when ``loads`` has it, VM counts and tags."""
    uuids = [r.uuid for r in rows]
    counts = await vm_counts(session, uuids)
    tags = await tags_of(session, uuids)
    inv = await inventories(session, uuids)
    pool_uuids = {r.pool_uuid for r in rows if r.pool_uuid}
    pools = {p.uuid: p for p in (await session.scalars(
        select(PoolRow).where(PoolRow.uuid.in_(pool_uuids)))).all()} if pool_uuids else {}
    models = []
    for row in rows:
        pool = pools.get(row.pool_uuid or "")
        ratio = {VCPU: pool.cpu_ratio, MEMORY_MB: pool.memory_ratio,
                 DISK_GB: pool.disk_ratio} if pool else {}
        classes = inv.get(row.uuid, {})
        inventory = []
        for rc in RESOURCE_CLASSES:
            total, reserved, used = classes.get(rc, (0, 0, 0))
            r = ratio.get(rc, 1.0)
            usable = max(int((total - reserved) * r), 0)
            inventory.append(Inventory(resource_class=ResourceClass(rc), total=total,
                                       reserved=reserved, ratio=r, usable=usable, used=used,
                                       free=usable - used))
        live = loads.get(row.uuid) if loads is not None else None
        load = NodeLoad(cpu=live.cpu, memory_used_mb=live.memory_used_mb,
                        disk_used_gb=live.disk_used_gb, net=live.net, reported_at=live.at
                        ) if live else NodeLoad(
            cpu=row.cpu_load, memory_used_mb=row.memory_used_mb,
            disk_used_gb=row.disk_used_gb, net=row.net_load, reported_at=row.last_report_at)
        models.append(Node(
            uuid=row.uuid, name=row.name, description=row.description,
            tags=tags.get(row.uuid, {}), created_at=row.created_at, updated_at=row.updated_at,
            url=row.url, status=NodeStatus(row.status),
            admin_state=NodeAdminState(row.admin_state),
            pool_uuid=row.pool_uuid, pool_name=pool.name if pool else None,
            labels=dict(row.labels or {}),
            capabilities=[NodeCapability(c) for c in row.capabilities or []
                          if c in NODE_CAPABILITIES],
            hypervisor=row.hypervisor, accel=row.accel,
            vcpus=classes.get(VCPU, (0, 0, 0))[0],
            memory_mb=classes.get(MEMORY_MB, (0, 0, 0))[0],
            disk_gb=classes.get(DISK_GB, (0, 0, 0))[0],
            vcpus_reserved=classes.get(VCPU, (0, 0, 0))[2],
            memory_reserved_mb=classes.get(MEMORY_MB, (0, 0, 0))[2],
            disk_reserved_gb=classes.get(DISK_GB, (0, 0, 0))[2],
            inventory=inventory, load=load, cpu_load=load.cpu,
            memory_used_mb=load.memory_used_mb, sandbox_subnet=row.sandbox_subnet,
            last_report_at=load.reported_at, vm_count=counts.get(row.uuid, 0),
            storage=storage_dirs(row.storage)))
    return models


async def vm_counts(session: AsyncSession, node_uuids: list[str]) -> dict[str, int]:
    """How many VMs are placed on each of ``node_uuids``."""
    if not node_uuids:
        return {}
    rows = await session.execute(
        select(VmRow.node_uuid, func.count()).where(VmRow.node_uuid.in_(node_uuids))
        .group_by(VmRow.node_uuid))
    return {node: count for node, count in rows.all() if node}


class NodeRegistry:
    """Keeps the nodes table true to the nodes' reports, and the VMs true to their nodes."""

    def __init__(self, ctx: ControlContext) -> None:
        self.ctx = ctx
        self._liveness: asyncio.Task[None] | None = None
        self._answered: dict[str, _Answered] = {}
        self._intervals: dict[str, float] = {}
        self._cleanups: dict[str, asyncio.Task[None]] = {}
        self._inventories: dict[str, dict[str, tuple[int, int]]] = {}
        self._persist: asyncio.Task[None] | None = None
        self._watch: asyncio.Task[None] | None = None
        self._started = utcnow()
        self._live: dict[str, _Live] = {}
        # Nodes seen with their sandbox subnet; the others are recorded under the lock.
        self._subnet_known: set[str] = set()
        self._assigning = asyncio.Lock()
        # VMs changed in the database, by the node to re-check them on (watch_changes).
        self._changed: dict[str, set[str]] = {}
        self._held_by: dict[str, str] = {}
        self._seen: dict[str, datetime] = {}
        self._watched_to = utcnow()

    def start(self) -> None:
        self._started = utcnow()
        self._watched_to = self._started
        self._liveness = asyncio.create_task(self._liveness_loop(), name="node-liveness")
        self._persist = asyncio.create_task(self._persist_loop(), name="node-load-persist")
        self._watch = asyncio.create_task(self._watch_loop(), name="node-vm-watch")

    async def stop(self) -> None:
        tasks = [t for t in [self._liveness, self._persist, self._watch,
                             *self._cleanups.values()]
                 if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        try:
            await self.persist_loads()  # what the nodes reported since the last batch
        except Exception:
            log.exception("could not persist the nodes' latest loads")

    async def persist_loads(self) -> int:
        """Write the loads reported since the last call, in short transactions of
        ``LOAD_PERSIST_CHUNK`` nodes; return how many were written."""
        loads = self.ctx.loads
        dirty = loads.take_dirty()
        written = 0
        for i in range(0, len(dirty), LOAD_PERSIST_CHUNK):
            chunk = dirty[i:i + LOAD_PERSIST_CHUNK]
            try:
                async with self.ctx.db.session() as session:
                    skipped = await loads.write(session, chunk)
            except BaseException:
                loads.mark_dirty(dirty[i:])
                raise
            loads.mark_dirty(skipped)
            written += len(chunk) - len(skipped)
        return written

    async def _persist_loop(self) -> None:
        while True:
            await asyncio.sleep(self.ctx.settings.load_persist_interval)
            try:
                written = await self.persist_loads()
                log.debug("node loads persisted", extra={"nodes": written})
            except Exception:
                log.exception("could not persist the nodes' latest loads")

    def cleanup_running(self, node_uuid: str) -> bool:
        """Whether an orphan cleanup of ``node_uuid`` is under way."""
        task = self._cleanups.get(node_uuid)
        return task is not None and not task.done()

    def down_after(self, node_uuid: str) -> float:
        """Seconds without a report after which ``node_uuid`` is down."""
        interval = self._intervals.get(node_uuid, DEFAULT_REPORT_INTERVAL)
        return max(DOWN_AFTER_MIN, DOWN_AFTER_REPORTS * interval)

    def _fresh_since(self, report: NodeReport) -> datetime | None:
        """A time before which every recorded change is reflected in ``report``.

        The node took this report after this server answered its report ``acked_seq``,
        so the report shows every change recorded before that answer. None when that
        answer is unknown here (this server restarted, the node restarted, or the
        previous report timed out): VMs then wait for the next report.
        """
        last = self._answered.get(report.node_id)
        if (last is None or not report.boot_id or last.boot_id != report.boot_id
                or last.seq != report.acked_seq or report.acked_seq == 0):
            return None
        return last.done_at

    async def report(self, report: NodeReport) -> NodeReportAnswer:
        """Record a node's identity, capacity and load, reconcile its VMs, clean its orphans.

        The load goes to memory (:class:`LiveLoads`); the database is written only when
        the node's identity or capacity changed, or when its VMs need it. A delta report
        with nothing new touches no database (this module's docstring)."""
        handling_started = time.perf_counter()  # metrics: handling time and report gaps
        REPORT_GAPS.seen(report.node_id)
        now = utcnow()
        fresh_since = self._fresh_since(report)
        if report.report_interval:
            self._intervals[report.node_id] = report.report_interval
        host = report.host
        self.ctx.loads.record(report.node_id, Load(
            cpu=host.cpu_load, memory_used_mb=host.memory_used_mb,
            disk_used_gb=host.disk_used_gb, net=host.net_load, at=now))
        live = self._live.get(report.node_id)
        if report.delta:
            answer = await self._delta(report, fresh_since, list(report.domains))
        elif live is not None and self._repeats(report, live):
            # The periodic full report of a node whose holdings did not move: what it
            # says beyond the live state is a delta.
            live.fulls += 1
            answer = await self._delta(report, fresh_since, [
                d for d in report.domains if live.domains.get(d.uuid) != d.state])
        else:
            answer = await self._full(report, fresh_since)
        self._answered[report.node_id] = _Answered(report.boot_id, report.seq, utcnow())
        NODE_REPORT_SECONDS.labels("ok").observe(time.perf_counter() - handling_started)
        return answer

    async def _full(self, report: NodeReport, fresh_since: datetime | None
                    ) -> NodeReportAnswer:
        """A full report: record the node, run the full reconcile, renew the live state."""
        # This reconcile reads every VM of the node: the changes noted so far are in it.
        changed = self._changed.pop(report.node_id, set())
        try:
            # A node without its sandbox subnet yet (a new node) is recorded one at a time:
            # concurrent first reports would pick the same free subnet and all but one
            # fail on its unique constraint (100 nodes joining at once on PostgreSQL).
            async with (self._assigning if report.node_id not in self._subnet_known
                        else contextlib.nullcontext()):
                async with self.ctx.db.session() as session:
                    node = await session.get(NodeRow, report.node_id)
                    if node is None:
                        node = await self._register(session, report)
                    await self._record_node(session, node, report)
                    was_up = node.status == "up"
                    storage = node.storage
                    sandbox = await sandbox_settings(session, node, self.ctx.settings)
                    if node.sandbox_subnet:
                        self._subnet_known.add(report.node_id)
            orphans, waiting = await self._reconcile_full(report, fresh_since)
        except BaseException:
            self._changed.setdefault(report.node_id, set()).update(changed)
            raise
        if orphans:
            self._clean(report.node_id, report.url, orphans)
        elif not was_up:
            await self._mark_up(report.node_id)
        domains = {d.uuid: d.state for d in report.domains}
        holding = frozenset(set(domains) | set(report.ports or {}) | set(report.disks or {}))
        old = self._live.get(report.node_id)
        for vm_uuid in old.holding - holding if old is not None else ():
            if self._held_by.get(vm_uuid) == report.node_id:
                del self._held_by[vm_uuid]
        for vm_uuid in holding:
            self._held_by[vm_uuid] = report.node_id
        self._live[report.node_id] = _Live(
            boot_id=report.boot_id, generation=report.generation, domains=domains,
            holding=holding, identity=identity_of(report), up=was_up or not orphans,
            storage=storage, sandbox=sandbox, pending=waiting)
        return NodeReportAnswer(sandbox=sandbox, deltas=True)

    @staticmethod
    def _repeats(report: NodeReport, live: _Live) -> bool:
        """Whether a full report only repeats the live state's holdings (same boot and
        generation, node up) and is not one of the full reports that run the full
        reconcile (every ``FULL_RECONCILE_EVERY``-th)."""
        return (report.full and report.ports is not None and report.disks is not None
                and bool(report.generation) and live.up and live.boot_id == report.boot_id
                and live.generation == report.generation
                and live.fulls + 1 < FULL_RECONCILE_EVERY)

    async def _delta(self, report: NodeReport, fresh_since: datetime | None,
                     domains: list[DomainInfo]) -> NodeReportAnswer:
        """A delta report (``domains``: those whose state changed): apply it to the live
        state; touch only the VMs that may have changed, and the node's row only when its
        identity, capacity or storage did."""
        node_uuid = report.node_id
        live = self._live.get(node_uuid)
        if (live is None or not live.up or live.boot_id != report.boot_id
                or live.generation != report.generation):
            log.info("node sent a delta report this server cannot apply; asking for a "
                     "full one", extra={"node": node_uuid, "node_name": report.name,
                                        "known": live is not None,
                                        "up": live is not None and live.up})
            return NodeReportAnswer(sandbox=live.sandbox if live else None, deltas=True,
                                    full_report=True)
        identity = identity_of(report)
        storage = (None if report.storage is None
                   else [d.model_dump(mode="json") for d in report.storage])
        if (identity != live.identity
                or reported_inventory(report.host) != self._inventories.get(node_uuid)
                or (storage is not None and storage_changed(live.storage, storage))):
            async with self.ctx.db.session() as session:
                node = await session.get(NodeRow, node_uuid)
                if node is None:  # removed meanwhile: the full report registers it again
                    return NodeReportAnswer(deltas=True, full_report=True)
                await self._record_node(session, node, report)
                live.identity, live.storage = identity, node.storage
        for d in domains:
            live.domains[d.uuid] = d.state
        names = ({d.uuid for d in domains} | live.pending
                 | self._changed.pop(node_uuid, set()))
        # A delta carries them only when they changed; a full report always (a pool's
        # network mode may have changed since: they are worth applying again).
        learned = bool(report.learned)
        if names or learned:
            try:
                orphans, waiting = await self._reconcile_some(report, live, names,
                                                              fresh_since, learned)
            except BaseException:
                live.pending |= names
                raise
            live.pending = waiting
            if orphans:
                self._clean(node_uuid, report.url, orphans)
        routers = self.ctx.live_routers
        if live.sandbox is not None and routers is not None and live.sandbox.routers != routers:
            live.sandbox = live.sandbox.model_copy(update={"routers": list(routers)})
        return NodeReportAnswer(sandbox=live.sandbox, deltas=True)

    async def _record_node(self, session: AsyncSession, node: NodeRow,
                           report: NodeReport) -> None:
        """Write the node's identity, storage and capacity where they changed; give it a
        sandbox subnet if it has none."""
        host = report.host
        identity = identity_of(report)
        if (node.name, node.url, node.hypervisor, node.accel,
                node.capabilities, node.forward_address) != identity:
            (node.name, node.url, node.hypervisor, node.accel, node.capabilities,
             node.forward_address) = identity
        if report.storage is not None:
            self._record_storage(session, node, report.storage)
        if not node.sandbox_subnet:
            settings = self.ctx.settings
            await assign_sandbox_subnet(session, node, settings.sandbox_supernet,
                                        settings.sandbox_prefix)
        inventory_now = reported_inventory(host)
        if self._inventories.get(report.node_id) != inventory_now:
            if await sync_inventory(session, report.node_id, inventory_now):
                log.info("node capacity changed", extra={
                    "node": report.node_id, "node_name": report.name,
                    "capacity": {k: {"total": t, "reserved": r}
                                 for k, (t, r) in inventory_now.items()}})
                if node.pool_uuid:
                    self.ctx.placement.invalidate(node.pool_uuid)
            self._inventories[report.node_id] = inventory_now

    @staticmethod
    def _record_storage(session: AsyncSession, node: NodeRow,
                        reported: list[StorageDirReport]) -> None:
        """Keep the node's storage directories (written only when they changed enough,
        see :func:`storage_changed`), and raise or clear the threshold alarm of each
        directory whose ``over_threshold`` flipped (F-THIN): an event and a log line."""
        new = [d.model_dump(mode="json") for d in reported]
        if not storage_changed(node.storage, new):
            return
        for d, over in threshold_flips(node.storage, new):
            percent = used_percent(d["total_bytes"], d["used_bytes"])
            state = EventState.RAISED if over else EventState.CLEARED
            message = (f"node {node.name}: storage directory {d['path']} is {percent:g}% "
                       f"used, {'over' if over else 'back under'} its alarm threshold")
            record_event(session, STORAGE_THRESHOLD, state, "node", node.uuid, message,
                         {"node_name": node.name, "path": d["path"], "used_percent": percent,
                          "used_bytes": d["used_bytes"], "total_bytes": d["total_bytes"]})
            extra = {"node": node.uuid, "node_name": node.name, "directory": d["path"],
                     "used_percent": percent}
            if over:
                log.warning("storage directory over its alarm threshold", extra=extra)
            else:
                log.info("storage directory back under its alarm threshold", extra=extra)
        node.storage = new

    async def _register(self, session: AsyncSession, report: NodeReport) -> NodeRow:
        """A node's first report: record it (down until it shows no orphan), in the pool
        its configuration names if that pool exists, else unassigned."""
        host = report.host
        pool_uuid = None
        if host.pool:
            pool = (await session.scalars(
                select(PoolRow).where(PoolRow.name == host.pool))).first()
            if pool is None:
                log.warning("node names a pool that does not exist; it stays unassigned "
                            "until an administrator adds it to a pool",
                            extra={"node": report.node_id, "node_name": report.name,
                                   "pool": host.pool})
            else:
                pool_uuid = pool.uuid
        node = NodeRow(uuid=report.node_id, name=report.name, url=report.url, status="down",
                       admin_state="active", pool_uuid=pool_uuid, labels={},
                       capabilities=sorted(str(c) for c in host.capabilities),
                       hypervisor=host.hypervisor, accel=host.accel,
                       forward_address=host.forward_address, last_report_at=utcnow())
        session.add(node)
        await session.flush()
        log.info("node registered", extra={
            "node": report.node_id, "node_name": report.name, "accel": host.accel,
            "vcpus": host.vcpus, "memory_mb": host.memory_mb,
            "memory_reserved_mb": host.memory_reserved_mb,
            "pool": host.pool if pool_uuid else None})
        return node

    async def _mark_up(self, node_uuid: str) -> None:
        async with self.ctx.db.session() as session:
            result = await session.execute(
                update(NodeRow).where(NodeRow.uuid == node_uuid)
                .where(NodeRow.status != "up").values(status="up"))
        if result.rowcount:  # type: ignore[attr-defined]
            log.info("node is up", extra={"node": node_uuid})
            self.ctx.placement.invalidate()

    async def reconcile(self, report: NodeReport, fresh_since: datetime | None) -> set[str]:
        """Make the node's VMs follow what it holds (the table in this module's docstring);
        return the VMs whose leftovers on the node are orphans."""
        return (await self._reconcile_full(report, fresh_since))[0]

    async def _reconcile_full(self, report: NodeReport, fresh_since: datetime | None
                              ) -> tuple[set[str], set[str]]:
        """:meth:`reconcile` over every VM of the node; also return the VMs left waiting
        (to a task, or for a report newer than their change)."""
        node_uuid = report.node_id
        domains = {d.uuid: d.state for d in report.domains}
        holding = set(domains) | set(report.ports or {}) | set(report.disks or {})
        # Absence is proof only when the report lists everything the node holds.
        complete = report.full and report.ports is not None and report.disks is not None
        held = holding | set(report.busy)
        async with self.ctx.db.session() as session:
            vms = list((await session.scalars(
                select(VmRow).where(VmRow.node_uuid == node_uuid))).all())
            in_flows = await _with_unfinished_flows(session, {v.uuid for v in vms} | holding)
            if report.learned:
                await _learn_addresses(session, vms, report, node_uuid)
            owners, waiting = await self._settle(session, report, vms, domains, complete,
                                                 held, in_flows, fresh_since)
        self._note_seen(vms)
        orphans = {u for u in holding if u not in owners and u not in in_flows
                   and not self.ctx.queues.busy(u)}
        return orphans, waiting

    async def _reconcile_some(self, report: NodeReport, live: _Live, names: set[str],
                              fresh_since: datetime | None, learned: bool
                              ) -> tuple[set[str], set[str]]:
        """The reconcile of a delta: the live state holds the full lists, so the same
        rules apply, to the VMs in ``names`` only (every VM of the node when the report
        carries learned addresses). Return the orphans among them and the VMs waiting."""
        node_uuid = report.node_id
        held = set(live.holding) | set(report.busy)
        async with self.ctx.db.session() as session:
            query = select(VmRow).where(VmRow.node_uuid == node_uuid)
            if not learned:
                query = query.where(VmRow.uuid.in_(sorted(names)))
            vms = list((await session.scalars(query)).all())
            in_flows = await _with_unfinished_flows(session, names | {v.uuid for v in vms})
            if learned:
                await _learn_addresses(session, vms, report, node_uuid)
            owners, waiting = await self._settle(session, report, vms, live.domains, True,
                                                 held, in_flows, fresh_since)
        self._note_seen(vms)
        orphans = {u for u in names & live.holding if u not in owners and u not in in_flows
                   and not self.ctx.queues.busy(u)}
        return orphans, waiting

    def _note_seen(self, vms: list[VmRow]) -> None:
        """These VMs, as just read or written here, need no second look when the watch
        finds them changed (it skips a version it has seen)."""
        for vm in vms:
            self._seen[vm.uuid] = vm.updated_at

    async def _settle(self, session: AsyncSession, report: NodeReport, vms: list[VmRow],
                      domains: Mapping[str, DomainState], complete: bool, held: set[str],
                      in_flows: set[str], fresh_since: datetime | None
                      ) -> tuple[set[str], set[str]]:
        """Apply the module docstring's table to ``vms`` given the node's ``domains``
        (every domain when the report is full) and what it ``held`` (everything, when
        ``complete``). Return the VMs that own what the node holds for them, and those
        left waiting."""
        node_uuid = report.node_id
        full = report.full or report.delta
        owners: set[str] = set()
        waiting: set[str] = set()
        for vm in vms:
            busy = vm.uuid in in_flows or self.ctx.queues.busy(vm.uuid)
            cleanup = vm.node_cleanup or (vm.state == VmState.DELETING and not busy)
            if not cleanup:
                owners.add(vm.uuid)
            if busy or fresh_since is None or vm.updated_at > fresh_since:
                waiting.add(vm.uuid)
                continue  # left to its task, or this report may predate its change
            if not cleanup:
                observed = domains.get(vm.uuid)
                if observed is not None:
                    self._follow(vm, observed, node_uuid)
                    continue
                if not full:
                    continue
                log.warning("VM's domain vanished from its node", extra={
                    "vm": vm.uuid, "node": node_uuid, "recorded": vm.state})
                vm.state, vm.power_state = VmState.ERROR, DomainState.ABSENT
                vm.error = f"the domain vanished from its node {report.name}"
                vm.node_cleanup = True
                owners.discard(vm.uuid)
            if complete and vm.uuid not in held:
                await self._release(session, vm, report.name)
        return owners, waiting

    @staticmethod
    def _follow(vm: VmRow, observed: DomainState, node_uuid: str) -> None:
        new_state = OBSERVED_TO_STATE.get(observed, VmState.UNKNOWN)
        if vm.power_state != observed:
            vm.power_state = observed
        if vm.state != new_state:
            log.warning("VM state drifted; following the node", extra={
                "vm": vm.uuid, "node": node_uuid, "recorded": vm.state,
                "observed": str(observed)})
            vm.state = new_state
            vm.error = "the guest crashed" if observed is DomainState.CRASHED else None

    @staticmethod
    async def _release(session: AsyncSession, vm: VmRow, node_name: str) -> None:
        """The node holds nothing for ``vm``: release what the VM kept for it."""
        if vm.state == VmState.DELETING:
            await finish_delete(session, vm)
            log.info("VM deleted: its node confirmed it holds nothing for it",
                     extra={"vm": vm.uuid, "node_name": node_name})
            return
        ip = vm.ip
        if await release_placement(session, vm):
            log.info("node holds nothing for the VM: address and reservation released",
                     extra={"vm": vm.uuid, "node_name": node_name, "ip": ip,
                            "state": vm.state})

    def _clean(self, node_uuid: str, url: str, orphans: set[str]) -> None:
        """Start removing ``orphans`` from the node, unless a cleanup of it is under way."""
        if self.cleanup_running(node_uuid):
            return
        task = asyncio.create_task(self._cleanup(node_uuid, url, sorted(orphans)),
                                   name=f"cleanup-{node_uuid}")
        self._cleanups[node_uuid] = task

        def forget(done: asyncio.Task[None]) -> None:
            if self._cleanups.get(node_uuid) is done:
                del self._cleanups[node_uuid]
        task.add_done_callback(forget)

    async def _cleanup(self, node_uuid: str, url: str, orphans: list[str]) -> None:
        """Remove each orphan's domain, ports and disks from the node (idempotent there).

        The node's next report (it reports at once after a removal) shows the result:
        that report releases what VMs kept, and marks a returning node up.
        """
        # Not node_client: a returning node is still "down" until its orphans are gone.
        client = node_client_at(self.ctx, url)
        limit = asyncio.Semaphore(CLEANUP_PARALLEL)

        async def remove(vm_uuid: str) -> None:
            async with limit:
                log.warning("removing what no VM owns from its node",
                            extra={"vm": vm_uuid, "node": node_uuid})
                try:
                    await client.remove(vm_uuid, timeout=CLEANUP_TIMEOUT,
                                        delete_volumes=going[vm_uuid])
                except YunError as exc:
                    log.warning("could not remove an orphan from its node: %s", exc,
                                extra={"vm": vm_uuid, "node": node_uuid})

        async with self.ctx.db.session() as session:
            going = {u: await volumes_going_with(session, u) for u in orphans}
        try:
            await asyncio.gather(*(remove(u) for u in orphans))
        except Exception:
            log.exception("orphan cleanup failed", extra={"node": node_uuid})

    async def mark_down(self, session: AsyncSession, node_uuid: str, why: str) -> None:
        result = await session.execute(
            update(NodeRow).where(NodeRow.uuid == node_uuid).where(NodeRow.status == "up")
            .values(status="down"))
        live = self._live.get(node_uuid)
        if live is not None:
            live.up = False  # only a full report marks it up again
        if result.rowcount:  # type: ignore[attr-defined]
            log.warning("node down", extra={"node": node_uuid, "reason": why})
            self.ctx.placement.invalidate()
            # Its guests may well run on (U-SPLIT), but nobody can vouch for them now;
            # the node's next report after it returns settles their state again.
            await session.execute(
                update(VmRow).where(VmRow.node_uuid == node_uuid)
                .where(VmRow.state == VmState.RUNNING)
                .values(state=VmState.UNKNOWN, error=f"node {node_uuid} is down: {why}"))

    async def check_liveness(self) -> list[str]:
        """Mark down the nodes whose reports stopped; return them."""
        now = utcnow()
        if (now - self._started).total_seconds() < max(
                DOWN_AFTER_MIN, DOWN_AFTER_REPORTS * DEFAULT_REPORT_INTERVAL):
            return []  # this server just started: give every node time to report to it
        down: list[str] = []
        async with self.ctx.db.session() as session:
            rows = (await session.execute(
                select(NodeRow.uuid, NodeRow.last_report_at).where(NodeRow.status == "up"))).all()
            for node_uuid, persisted in rows:
                # Reports are kept in memory; the persisted time covers this server's start.
                last = self.ctx.loads.last_report(node_uuid) or persisted
                silent = (now - last).total_seconds() if last is not None else None
                if silent is None or silent > self.down_after(node_uuid):
                    await self.mark_down(session, node_uuid,
                                         f"no report for {silent or 0:.0f} s")
                    down.append(node_uuid)
        return down

    async def _liveness_loop(self) -> None:
        interval = max(min(self.ctx.settings.heartbeat_interval, 1.0), 0.2)
        while True:
            await asyncio.sleep(interval)
            try:
                await self.check_liveness()
            except Exception:
                log.exception("node liveness check failed")


    async def watch_changes(self) -> int:
        """Note the VMs changed in the database (by any control server) since the last
        call, under their node and the node holding them, for those nodes' next reports
        to look at; refresh the live routers the sandbox answers carry. Return how many
        notes were made."""
        started = utcnow()
        since = self._watched_to - timedelta(seconds=WATCH_MARGIN)
        alive_since = started - timedelta(seconds=self.ctx.settings.router_timeout)
        async with self.ctx.db.reading() as session:
            rows = (await session.execute(
                select(VmRow.uuid, VmRow.node_uuid, VmRow.updated_at)
                .where(VmRow.updated_at > since))).all()
            routers = sorted(set((await session.scalars(select(RouterRow.lan_address).where(
                RouterRow.last_seen_at >= alive_since))).all()))
        notes = 0
        for vm_uuid, node_uuid, at in rows:
            if self._seen.get(vm_uuid) == at:
                continue  # seen by an earlier read of the overlap
            self._seen[vm_uuid] = at
            for node in {node_uuid, self._held_by.get(vm_uuid)}:
                if node:
                    self._changed.setdefault(node, set()).add(vm_uuid)
                    notes += 1
        self._seen = {u: at for u, at in self._seen.items() if at > since}
        self._watched_to = started
        self.ctx.live_routers = routers
        return notes

    async def _watch_loop(self) -> None:
        while True:
            await asyncio.sleep(WATCH_INTERVAL)
            try:
                notes = await self.watch_changes()
                if notes:
                    log.debug("VMs changed in the database", extra={"notes": notes})
            except Exception:
                log.exception("could not read the VMs changed in the database")


async def _learn_addresses(session: AsyncSession, vms: list[VmRow], report: NodeReport,
                           node_uuid: str) -> None:
    """F-NET-DIRECT: a direct-mode VM's address is the one the node saw it take from the
    LAN's DHCP server (by its MAC). Written only when it changed: most reports change
    nothing, and a write per report would load the database for no news."""
    learned = {a.mac.lower(): a.ip for a in report.learned}
    pool_uuids = {v.pool_uuid for v in vms if v.pool_uuid and (v.mac or "") in learned}
    if not pool_uuids:
        return
    direct = set((await session.scalars(select(PoolRow.uuid).where(
        PoolRow.uuid.in_(pool_uuids), PoolRow.network_mode == NetworkMode.DIRECT.value))).all())
    for vm in vms:
        ip = learned.get(vm.mac or "")
        if ip is None or vm.pool_uuid not in direct or vm.ip == ip:
            continue
        log.info("direct-mode VM's address learned from its node", extra={
            "vm": vm.uuid, "node": node_uuid, "mac": vm.mac, "ip": ip, "previous": vm.ip})
        vm.ip = ip


async def _with_unfinished_flows(session: AsyncSession, uuids: set[str]) -> set[str]:
    """Which of ``uuids`` have a task under way (on any control server)."""
    found: set[str] = set()
    items = sorted(uuids)
    for i in range(0, len(items), 500):
        found.update((await session.scalars(
            select(FlowRow.resource_uuid).where(FlowRow.state.in_(UNFINISHED))
            .where(FlowRow.resource_uuid.in_(items[i:i + 500])))).all())
    return found
