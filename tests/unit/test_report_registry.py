"""The control server's side of delta reports (issue 10), on a real SQLite database:
a quiet delta runs no statement, a change made in the database by anyone (another
control server's flow) reaches the next delta through the watch, and a delta the
server cannot apply gets ``full_report``."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event, insert, select, update

from yun.config import ControlSettings
from yun.control.context import ControlContext
from yun.control.db.models import NodeRow, VmRow
from yun.control.db.session import Database
from yun.control.services.nodes import NodeRegistry
from yun.node.agent import holdings_generation
from yun.proto.components import ComponentType
from yun.proto.membership import Membership
from yun.proto.messages import DomainInfo, DomainState, HostInfo, NodeReport
from yun.testing.seed import default_project_pool_image

HOST = HostInfo(hostname="n1", hypervisor="sim", accel="tcg", vcpus=8, memory_mb=16384,
                disk_gb=100)
VM = "0b0e4b7e-5f43-4c1e-9d0c-4f7b3f0c2a11"


class FakeNode:
    """The reports a node holding one running VM sends (built as the agent does)."""

    def __init__(self) -> None:
        self.seq = 0
        self.state = DomainState.RUNNING

    def report(self, delta: bool, changed: bool = False) -> NodeReport:
        self.seq += 1
        domains = [DomainInfo(uuid=VM, name="vm", state=self.state)]
        ports, disks, volumes = {VM: ["52:54:00:aa:bb:cc"]}, {VM: ["vol-1"]}, ["vol-1"]
        common: dict[str, Any] = dict(
            node_id="node-1", name="n1", url="https://n1:7720", host=HOST, boot_id="boot",
            seq=self.seq, acked_seq=self.seq - 1,
            generation=holdings_generation(domains, ports, disks, volumes))
        if delta:
            return NodeReport(**common, domains=domains if changed else [], full=False,
                              delta=True)
        return NodeReport(**common, domains=domains, ports=ports, disks=disks,
                          volumes=volumes)


@pytest.fixture
async def registry(tmp_path: Path) -> AsyncIterator[NodeRegistry]:
    settings = ControlSettings(state_dir=tmp_path, name="control",
                               database_url=f"sqlite+aiosqlite:///{tmp_path}/c.db")
    db = Database(settings.db_url())
    await db.migrate()
    now = datetime.now(UTC)
    async with db.session() as s:
        project, pool = await default_project_pool_image(s)
        await s.execute(insert(NodeRow), [dict(
            uuid="node-1", name="n1", url="https://n1:7720", status="up",
            admin_state="active", pool_uuid=pool, labels={}, capabilities=[],
            hypervisor="sim", accel="tcg", sandbox_subnet="10.64.0.0/24")])
        await s.execute(insert(VmRow), [dict(
            uuid=VM, name="vm", project_uuid=project, state="running",
            power_state="running", vcpus=1, memory_mb=512, disk_gb=10, image_uuid="img",
            node_uuid="node-1", pool_uuid=pool, created_at=now, updated_at=now)])
    ctx = ControlContext(settings=settings, db=db,
                         membership=Membership(settings, ComponentType.CONTROL, url=""))
    yield NodeRegistry(ctx)
    await db.dispose()


def counting(db: Database) -> list[str]:
    seen: list[str] = []
    event.listen(db.engine.sync_engine, "before_cursor_execute",
                 lambda conn, cursor, sql, *a: seen.append(sql))
    return seen


async def state_of(db: Database) -> str:
    async with db.session() as s:
        return (await s.scalars(select(VmRow.state).where(VmRow.uuid == VM))).one()


async def test_quiet_deltas_run_nothing_and_database_changes_are_watched(
        registry: NodeRegistry) -> None:
    db = registry.ctx.db
    node = FakeNode()
    await registry.report(node.report(False))  # the registry meets the node
    await registry.report(node.report(False))
    await registry.watch_changes()
    await registry.report(node.report(True))  # may re-read what the watch noted
    run = counting(db)
    answer = await registry.report(node.report(True))
    assert run == [] and answer.deltas and not answer.full_report
    assert answer.sandbox is not None and answer.sandbox.subnet == "10.64.0.0/24"

    # Another control server's flow leaves the VM in error while the guest runs on.
    async with db.session() as s:
        await s.execute(update(VmRow).where(VmRow.uuid == VM).values(state="error"))
    await registry.report(node.report(True))
    assert await state_of(db) == "error"  # not seen yet: nothing told this server
    assert await registry.watch_changes() == 1
    run.clear()
    await registry.report(node.report(True))
    assert run, "the delta after the watch read nothing"
    assert await state_of(db) == "running"

    # A domain that changed state is named by the delta and followed.
    node.state = DomainState.SHUTOFF
    await registry.report(node.report(True, changed=True))
    assert await state_of(db) == "stopped"


async def test_a_delta_the_server_cannot_apply_asks_for_everything(
        registry: NodeRegistry) -> None:
    node = FakeNode()
    # This server has no state of the node (it restarted): a full report, please.
    node.seq = 41
    assert (await registry.report(node.report(True))).full_report
    await registry.report(node.report(False))
    assert not (await registry.report(node.report(True))).full_report
    # Marked down: only a full report marks it up again.
    async with registry.ctx.db.session() as s:
        await registry.mark_down(s, "node-1", "test")
    assert (await registry.report(node.report(True))).full_report
    await registry.report(node.report(False))
    async with registry.ctx.db.session() as s:
        assert (await s.get(NodeRow, "node-1")).status == "up"  # type: ignore[union-attr]
    assert not (await registry.report(node.report(True))).full_report
