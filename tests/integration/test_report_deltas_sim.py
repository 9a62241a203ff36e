"""Delta reports on sim (issue 10): a VM's state changed behind the control server's back
is seen within 2 reports, a domain lost from the node too, and a report with nothing new
runs no database statement. On SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import event

from tests.integration.conftest import upload
from tests.integration.test_reconcile_sim import create_vm, vm_of
from yun.node.hypervisor.sim.driver import SimDriver
from yun.node.service import NodeService
from yun.proto.messages import DomainState, NodeReport, NodeReportAnswer
from yun.testing.cluster import SimCluster


@contextmanager
def statements(cluster: SimCluster) -> Iterator[list[str]]:
    """The SQL statements the control server runs inside the block."""
    assert cluster.control is not None
    engine = cluster.control.ctx.db.engine.sync_engine
    seen: list[str] = []

    def count(conn: Any, cursor: Any, sql: str, *args: Any) -> None:
        seen.append(sql)
    event.listen(engine, "before_cursor_execute", count)
    try:
        yield seen
    finally:
        event.remove(engine, "before_cursor_execute", count)


async def seen_within_two_reports(cluster: SimCluster, node: NodeService, vm_uuid: str,
                                  state: str, what: str) -> dict[str, Any]:
    """Wait for the API to show ``state``; fail if the node sent more than 2 reports
    (counting from now) before it did."""
    first = node.agent._seq
    deadline = time.monotonic() + 60
    while True:
        sent = node.agent._seq - first  # read before the API: the count is not flattered
        current = await vm_of(cluster, vm_uuid)
        if current["state"] == state:
            assert sent <= 2, f"{what}: seen only after {sent} reports"
            return current
        assert time.monotonic() < deadline, f"{what}: never seen ({current['state']})"
        await asyncio.sleep(0.05)


async def test_state_changes_converge_and_quiet_reports_write_nothing(
        one_on_each_db: SimCluster, small_qcow2: Path) -> None:
    cluster = one_on_each_db
    assert cluster.control is not None
    await upload(cluster, small_qcow2)
    vm = await create_vm(cluster, "watched")
    node = cluster.node_services[0]
    driver = node.agent.driver
    assert isinstance(driver, SimDriver)
    registry = cluster.control.nodes

    # Once the node's VMs are settled, its reports (deltas naming nothing) run no
    # statement at all. The real handler, wrapped to count what each call ran.
    handled: list[tuple[bool, int]] = []
    handler = registry.report

    async def counted(report: NodeReport) -> NodeReportAnswer:
        with statements(cluster) as run:
            answer = await handler(report)
        handled.append((report.delta, len(run)))
        return answer
    registry.report = counted  # type: ignore[method-assign]
    deadline = time.monotonic() + 60
    while handled[-3:] != [(True, 0)] * 3:
        assert time.monotonic() < deadline, f"reports never went quiet: {handled}"
        await asyncio.sleep(0.2)
    # The guest stops behind the control server's back (no event): a delta names it.
    dom = driver.domains[vm["uuid"]]
    dom.state = DomainState.SHUTOFF
    await seen_within_two_reports(cluster, node, vm["uuid"], "stopped", "guest stopped")
    # And runs again.
    dom.state = DomainState.RUNNING
    await seen_within_two_reports(cluster, node, vm["uuid"], "running", "guest running")

    # The domain is lost from the node (what it holds changed: a full report).
    mark = len(handled)
    del driver.domains[vm["uuid"]]
    lost = await seen_within_two_reports(cluster, node, vm["uuid"], "error", "domain lost")
    assert "vanished" in lost["error"]
    assert any(not delta and n > 0 for delta, n in handled[mark:]), handled[mark:]
    # Then it comes back: nothing owns it now, so the cleanup removes it again.
    driver.domains[vm["uuid"]] = dom
    deadline = time.monotonic() + 60
    while vm["uuid"] in driver.domains:
        assert time.monotonic() < deadline, "the returned domain was never cleaned up"
        await asyncio.sleep(0.2)
    assert (await vm_of(cluster, vm["uuid"]))["state"] == "error"

    # Quiet again once the node's VM is settled.
    handled.clear()
    deadline = time.monotonic() + 60
    while handled[-3:] != [(True, 0)] * 3:
        assert time.monotonic() < deadline, f"reports never went quiet: {handled}"
        await asyncio.sleep(0.2)
