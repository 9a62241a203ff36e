"""The node registry, fed by the nodes' reports, and reconciliation of what runs (rule 4)."""

from __future__ import annotations

import asyncio
import logging
from datetime import timedelta

from sqlalchemy import func, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from yun.control.context import ControlContext
from yun.control.db.models import NodeRow, VmRow, utcnow
from yun.control.db.tags import tags_of
from yun.proto.errors import NotFound, YunError
from yun.proto.messages import DomainInfo, DomainState, NodeReport, Peer
from yun.proto.resources import Node, VmState

log = logging.getLogger("yun.control.nodes")

# How a VM's state follows what its node reports, for VMs not in the middle of a task.
OBSERVED_TO_STATE = {
    DomainState.RUNNING: VmState.RUNNING,
    DomainState.PAUSED: VmState.RUNNING,
    DomainState.SHUTOFF: VmState.STOPPED,
    DomainState.CRASHED: VmState.ERROR,
}
SETTLED_STATES = {VmState.RUNNING, VmState.STOPPED, VmState.ERROR, VmState.UNKNOWN}


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
    """Keeps the nodes table true to the nodes' reports and to the domain's presence."""

    def __init__(self, ctx: ControlContext) -> None:
        self.ctx = ctx
        self._liveness: asyncio.Task[None] | None = None

    def start(self) -> None:
        self.ctx.membership.on_peers_changed(self._peers_changed)
        self._liveness = asyncio.create_task(self._liveness_loop())

    async def stop(self) -> None:
        if self._liveness is not None:
            self._liveness.cancel()
            await asyncio.gather(self._liveness, return_exceptions=True)

    async def report(self, report: NodeReport) -> None:
        """Record a node's capacity and load, then reconcile its domains with the database."""
        now = utcnow()
        async with self.ctx.db.session() as session:
            node = await session.get(NodeRow, report.node_id)
            host = report.host
            if node is None:
                node = NodeRow(
                    uuid=report.node_id, name=report.name, url=report.url,
                    hypervisor=host.hypervisor, accel=host.accel, vcpus=host.vcpus,
                    memory_mb=host.memory_mb, disk_gb=host.disk_gb, nat_subnet=host.nat_subnet,
                )
                session.add(node)
                log.info("node registered", extra={"node": report.node_id, "node_name": report.name,
                                                   "accel": host.accel, "vcpus": host.vcpus,
                                                   "memory_mb": host.memory_mb})
            elif node.status != "up":
                log.info("node is up again", extra={"node": node.uuid, "node_name": node.name})
            node.name, node.url, node.status = report.name, report.url, "up"
            node.hypervisor, node.accel = host.hypervisor, host.accel
            node.vcpus, node.memory_mb, node.disk_gb = host.vcpus, host.memory_mb, host.disk_gb
            node.cpu_load, node.memory_used_mb = host.cpu_load, host.memory_used_mb
            node.nat_subnet = host.nat_subnet
            node.last_report_at = now
        await self.reconcile(report.node_id, report.domains, full=report.full)

    async def reconcile(self, node_uuid: str, domains: list[DomainInfo], full: bool) -> None:
        """Make the VMs' recorded state follow what the node really runs.

        A VM with a task under way (in a transient state) is left to its task. A domain
        no VM of this node owns (its create was rolled back while the node was unreachable)
        is removed from the node: a VM is recorded on its node before it is provisioned
        there, so a domain being created is never taken for an orphan.
        """
        seen = {d.uuid: d for d in domains}
        orphans: list[str] = []
        async with self.ctx.db.session() as session:
            vms = (await session.scalars(
                select(VmRow).where(VmRow.node_uuid == node_uuid))).all()
            known = {vm.uuid for vm in vms}
            for vm in vms:
                if vm.state not in SETTLED_STATES or self.ctx.queues.busy(vm.uuid):
                    continue
                info = seen.get(vm.uuid)
                if info is None:
                    if not full or vm.state not in (VmState.RUNNING, VmState.STOPPED):
                        continue
                    observed = DomainState.ABSENT
                    new_state = VmState.ERROR
                else:
                    observed = info.state
                    new_state = OBSERVED_TO_STATE.get(info.state, VmState.UNKNOWN)
                if vm.power_state != observed:
                    vm.power_state = observed
                if vm.state != new_state:
                    log.warning("VM state drifted; following the node", extra={
                        "vm": vm.uuid, "node": node_uuid, "recorded": vm.state,
                        "observed": str(observed)})
                    vm.state = new_state
                    vm.error = ("the domain vanished from its node"
                                if observed is DomainState.ABSENT else None)
            if full:
                orphans = [u for u in seen if u not in known and not self.ctx.queues.busy(u)]
            node = await session.get(NodeRow, node_uuid)
        if orphans and node is not None:
            client = self.ctx.membership.client_for_url(node.url)
            for uuid in orphans:
                log.warning("removing a domain no VM owns", extra={"vm": uuid,
                                                                   "node": node_uuid})
                try:
                    await client.request("DELETE", f"/internal/v1/domains/{uuid}", timeout=120)
                except YunError as exc:
                    log.warning("could not remove orphan domain: %s", exc,
                                extra={"vm": uuid, "node": node_uuid})

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

    async def _peers_changed(self, added: list[Peer], removed: list[Peer]) -> None:
        gone = [p for p in removed if p.type == "node"]
        if not gone:
            return
        async with self.ctx.db.session() as session:
            for peer in gone:
                await self.mark_down(session, peer.component_id, "left the work domain")

    async def _liveness_loop(self) -> None:
        # Presence comes first from the domain server (a node that stops heartbeating is
        # "gone" within its TTL); this catches a node alive in the domain whose reports
        # stopped, so it is generous.
        interval = max(self.ctx.settings.heartbeat_interval, 1.0)
        stale_after = max(30.0, interval * 10)
        while True:
            await asyncio.sleep(interval)
            limit = utcnow() - timedelta(seconds=stale_after)
            try:
                async with self.ctx.db.session() as session:
                    stale = (await session.scalars(
                        select(NodeRow.uuid).where(NodeRow.status == "up")
                        .where(NodeRow.last_report_at < limit))).all()
                    for node_uuid in stale:
                        await self.mark_down(session, node_uuid, "no report")
            except Exception:
                log.exception("node liveness check failed")
