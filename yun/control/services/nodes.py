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
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import func, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from yun.control.context import ControlContext
from yun.control.db.models import FlowRow, NodeRow, VmRow, utcnow
from yun.control.db.tags import tags_of
from yun.control.flows.engine import UNFINISHED
from yun.control.flows.vm import finish_delete, release_placement
from yun.control.nodeclient import node_client_at
from yun.proto.errors import NotFound, YunError
from yun.proto.messages import DomainState, NodeReport
from yun.proto.resources import Node, VmState

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
CLEANUP_TIMEOUT = 120.0


@dataclass(frozen=True)
class _Answered:
    """The last report of a node this control server finished acting on."""

    boot_id: str
    seq: int
    done_at: datetime


async def get_node(session: AsyncSession, node_uuid: str) -> NodeRow:
    node = await session.get(NodeRow, node_uuid)
    if node is None:
        raise NotFound(f"no node {node_uuid}")
    return node


def node_model(row: NodeRow, vm_count: int = 0) -> Node:
    node = Node.model_validate(row)
    node.vm_count = vm_count
    return node


async def node_models(session: AsyncSession, rows: list[NodeRow]) -> list[Node]:
    """The API view of nodes, with their VM counts and tags."""
    counts = await vm_counts(session)
    tags = await tags_of(session, [r.uuid for r in rows])
    models = [node_model(r, counts.get(r.uuid, 0)) for r in rows]
    for model in models:
        model.tags = tags.get(model.uuid, {})
    return models


async def vm_counts(session: AsyncSession) -> dict[str, int]:
    rows = await session.execute(
        select(VmRow.node_uuid, func.count()).group_by(VmRow.node_uuid))
    return {node: count for node, count in rows.all() if node}


class NodeRegistry:
    """Keeps the nodes table true to the nodes' reports, and the VMs true to their nodes."""

    def __init__(self, ctx: ControlContext) -> None:
        self.ctx = ctx
        self._liveness: asyncio.Task[None] | None = None
        self._answered: dict[str, _Answered] = {}
        self._intervals: dict[str, float] = {}
        self._cleanups: dict[str, asyncio.Task[None]] = {}
        self._started = utcnow()

    def start(self) -> None:
        self._started = utcnow()
        self._liveness = asyncio.create_task(self._liveness_loop(), name="node-liveness")

    async def stop(self) -> None:
        tasks = [t for t in [self._liveness, *self._cleanups.values()] if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

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

    async def report(self, report: NodeReport) -> None:
        """Record a node's capacity and load, reconcile its VMs, and clean its orphans."""
        now = utcnow()
        fresh_since = self._fresh_since(report)
        if report.report_interval:
            self._intervals[report.node_id] = report.report_interval
        async with self.ctx.db.session() as session:
            node = await session.get(NodeRow, report.node_id)
            host = report.host
            if node is None:
                # Registered down: it is marked up below once it holds no orphan.
                node = NodeRow(
                    uuid=report.node_id, name=report.name, url=report.url, status="down",
                    hypervisor=host.hypervisor, accel=host.accel, vcpus=host.vcpus,
                    memory_mb=host.memory_mb, disk_gb=host.disk_gb, nat_subnet=host.nat_subnet,
                )
                session.add(node)
                log.info("node registered", extra={"node": report.node_id, "node_name": report.name,
                                                   "accel": host.accel, "vcpus": host.vcpus,
                                                   "memory_mb": host.memory_mb})
            node.name, node.url = report.name, report.url
            node.hypervisor, node.accel = host.hypervisor, host.accel
            node.vcpus, node.memory_mb, node.disk_gb = host.vcpus, host.memory_mb, host.disk_gb
            node.cpu_load, node.memory_used_mb = host.cpu_load, host.memory_used_mb
            node.nat_subnet = host.nat_subnet
            node.last_report_at = now
            was_up = node.status == "up"
        orphans = await self.reconcile(report, fresh_since)
        if orphans:
            self._clean(report.node_id, report.url, orphans)
        elif not was_up:
            await self._mark_up(report.node_id)
        self._answered[report.node_id] = _Answered(report.boot_id, report.seq, utcnow())

    async def _mark_up(self, node_uuid: str) -> None:
        async with self.ctx.db.session() as session:
            result = await session.execute(
                update(NodeRow).where(NodeRow.uuid == node_uuid)
                .where(NodeRow.status != "up").values(status="up"))
        if result.rowcount:  # type: ignore[attr-defined]
            log.info("node is up", extra={"node": node_uuid})

    async def reconcile(self, report: NodeReport, fresh_since: datetime | None) -> set[str]:
        """Make the node's VMs follow what it holds (the table in this module's docstring);
        return the VMs whose leftovers on the node are orphans."""
        node_uuid = report.node_id
        domains = {d.uuid: d for d in report.domains}
        holding = set(domains) | set(report.ports or {}) | set(report.disks or {})
        # Absence is proof only when the report lists everything the node holds.
        complete = report.full and report.ports is not None and report.disks is not None
        held = holding | set(report.busy)
        owners: set[str] = set()
        async with self.ctx.db.session() as session:
            vms = list((await session.scalars(
                select(VmRow).where(VmRow.node_uuid == node_uuid))).all())
            in_flows = await _with_unfinished_flows(session, {v.uuid for v in vms} | holding)
            for vm in vms:
                busy = vm.uuid in in_flows or self.ctx.queues.busy(vm.uuid)
                cleanup = vm.node_cleanup or (vm.state == VmState.DELETING and not busy)
                if not cleanup:
                    owners.add(vm.uuid)
                if busy or fresh_since is None or vm.updated_at > fresh_since:
                    continue  # left to its task, or this report may predate its change
                if not cleanup:
                    info = domains.get(vm.uuid)
                    if info is not None:
                        self._follow(vm, info.state, node_uuid)
                        continue
                    if not report.full:
                        continue
                    log.warning("VM's domain vanished from its node", extra={
                        "vm": vm.uuid, "node": node_uuid, "recorded": vm.state})
                    vm.state, vm.power_state = VmState.ERROR, DomainState.ABSENT
                    vm.error = f"the domain vanished from its node {report.name}"
                    vm.node_cleanup = True
                    owners.discard(vm.uuid)
                if complete and vm.uuid not in held:
                    await self._release(session, vm, report.name)
        orphans = {u for u in holding if u not in owners and u not in in_flows
                   and not self.ctx.queues.busy(u)}
        return orphans

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
                    await client.remove(vm_uuid, timeout=CLEANUP_TIMEOUT)
                except YunError as exc:
                    log.warning("could not remove an orphan from its node: %s", exc,
                                extra={"vm": vm_uuid, "node": node_uuid})

        try:
            await asyncio.gather(*(remove(u) for u in orphans))
        except Exception:
            log.exception("orphan cleanup failed", extra={"node": node_uuid})

    async def mark_down(self, session: AsyncSession, node_uuid: str, why: str) -> None:
        result = await session.execute(
            update(NodeRow).where(NodeRow.uuid == node_uuid).where(NodeRow.status == "up")
            .values(status="down"))
        if result.rowcount:  # type: ignore[attr-defined]
            log.warning("node down", extra={"node": node_uuid, "reason": why})
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
            for node_uuid, last in rows:
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


async def _with_unfinished_flows(session: AsyncSession, uuids: set[str]) -> set[str]:
    """Which of ``uuids`` have a task under way (on any control server)."""
    found: set[str] = set()
    items = sorted(uuids)
    for i in range(0, len(items), 500):
        found.update((await session.scalars(
            select(FlowRow.resource_uuid).where(FlowRow.state.in_(UNFINISHED))
            .where(FlowRow.resource_uuid.in_(items[i:i + 500])))).all())
    return found
