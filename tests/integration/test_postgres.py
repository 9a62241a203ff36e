"""The same control server code on a real PostgreSQL server (started by scripts/setup.sh --test)."""

from __future__ import annotations

import asyncio
import itertools
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime
from pathlib import Path

import pytest
from sqlalchemy import create_engine, inspect, select

from tests.integration.conftest import started, upload
from yun.control.db.models import (
    ImageRow,
    InventoryRow,
    NodeRow,
    PoolRow,
    ProjectRow,
    VmRow,
)
from yun.control.db.session import Database, downgrade, sync_url, upgrade
from yun.control.scheduler import inventory
from yun.control.scheduler.placement import Placement, Request
from yun.testing.cluster import SimCluster

URL = os.environ.get("YUN_TEST_POSTGRES_URL", "")
pytestmark = [
    pytest.mark.postgres,
    pytest.mark.skipif(not URL,
                       reason="YUN_TEST_POSTGRES_URL is not set (scripts/test.sh sets it)"),
]
TABLES = {"nodes", "images", "vms", "addresses", "flows", "flow_steps", "idempotency_keys",
          "departments", "projects", "users", "role_assignments", "tokens", "api_keys",
          "quotas", "resource_tags", "audit_log"}


def tables() -> set[str]:
    engine = create_engine(sync_url(URL))
    try:
        return set(inspect(engine).get_table_names())
    finally:
        engine.dispose()


@asynccontextmanager
async def cluster_on_postgres(tmp_path: Path, nodes: int) -> AsyncIterator[SimCluster]:
    """A cloud of ``nodes`` sim nodes on a PostgreSQL schema made afresh."""
    downgrade(URL, "base")
    async with started(SimCluster(tmp_path, nodes=nodes, database_url=URL)) as cluster:
        yield cluster


def test_migrations_up_down_up() -> None:
    downgrade(URL, "base")
    assert not (tables() & TABLES)
    upgrade(URL)
    assert TABLES <= tables()
    downgrade(URL, "base")
    assert not (tables() & TABLES)
    upgrade(URL)
    assert TABLES <= tables()


async def test_vm_lifecycle_on_postgres(tmp_path: Path, small_qcow2: Path) -> None:
    async with cluster_on_postgres(tmp_path, nodes=3) as cluster:
        api = cluster.api
        assert api is not None
        await upload(cluster, small_qcow2)
        created = []
        for i in range(6):
            resp = await api.post("/api/v1/vms", json={"name": f"pg-{i}", "image": "img",
                                                        "tags": {"db": "pg"}})
            assert resp.status_code == 202, resp.text
            created.append(resp.json())
        for accepted in created:
            assert (await cluster.wait_task(accepted["task"]["uuid"]))["state"] == "succeeded"
        page = (await api.get("/api/v1/vms", params={"q": "tag:db=pg", "count": "true"})).json()
        assert page["total"] == 6 and {v["state"] for v in page["items"]} == {"running"}
        assert len({v["node_uuid"] for v in page["items"]}) == 3  # spread over the nodes
        vm = created[0]["resource"]["uuid"]
        resp = await api.post(f"/api/v1/vms/{vm}/stop")
        assert (await cluster.wait_task(resp.json()["task"]["uuid"]))["state"] == "succeeded"
        for accepted in created:
            resp = await api.delete(f"/api/v1/vms/{accepted['resource']['uuid']}")
            assert (await cluster.wait_task(resp.json()["task"]["uuid"]))["state"] == \
                "succeeded"
        assert (await api.get("/api/v1/vms", params={"count": "true"})).json()["total"] == 0
        nodes = (await api.get("/api/v1/nodes")).json()["items"]
        assert all(n["vcpus_reserved"] == 0 for n in nodes)


async def test_quota_race_on_postgres(tmp_path: Path, small_qcow2: Path) -> None:
    """Concurrent creates claim a project's quota through row locks: exactly the limit."""
    async with cluster_on_postgres(tmp_path, nodes=3) as cluster:
        api = cluster.api
        assert api is not None
        resp = await api.put("/api/v1/projects/default/quota", json={"limits": {"vms": 10}})
        assert resp.status_code == 200, resp.text
        await upload(cluster, small_qcow2)
        answers = await asyncio.gather(*(api.post("/api/v1/vms", json={
            "name": f"r{i}", "image": "img"}) for i in range(50)))
        codes = [a.status_code for a in answers]
        assert codes.count(202) == 10 and codes.count(409) == 40, codes
        quota = (await api.get("/api/v1/quota")).json()
        assert {line["resource"]: line["used"] for line in quota["lines"]}["vms"] == 10
        page = (await api.get("/api/v1/vms", params={"count": "true"})).json()
        assert page["total"] == 10
        await cluster.wait_tasks([a.json()["task"]["uuid"] for a in answers
                                  if a.status_code == 202])


async def test_one_unfinished_flow_per_vm_under_concurrent_requests_on_postgres(
        tmp_path: Path, small_qcow2: Path) -> None:
    """Truly concurrent power requests on one VM never run two flows at once: each gets
    the running task (the same action), a clear 409, or, once that task has ended, a new
    one. Before: a SELECT then INSERT, so several flows could start for one VM on
    PostgreSQL. (A sim reboot ends in milliseconds: on a loaded machine it can end before
    the last of the 24 requests is served, which then starts the next flow.)"""
    async with cluster_on_postgres(tmp_path, nodes=1) as cluster:
        api = cluster.api
        assert api is not None and cluster.control is not None
        await upload(cluster, small_qcow2)
        resp = await api.post("/api/v1/vms", json={"name": "busy", "image": "img"})
        vm = resp.json()["resource"]["uuid"]
        assert (await cluster.wait_task(resp.json()["task"]["uuid"]))["state"] == "succeeded"
        flows_started = 1  # the create
        for _ in range(3):
            answers = await asyncio.gather(*(
                api.post(f"/api/v1/vms/{vm}/{'stop' if i % 2 else 'reboot'}")
                for i in range(24)))
            accepted: set[str] = set()
            for answer in answers:
                body = answer.json()
                if answer.status_code == 202 and body["task"] is not None:
                    accepted.add(body["task"]["uuid"])
                elif answer.status_code == 202:  # after a stop had ended: nothing to do
                    assert "already stopped" in body["message"], body
                else:  # busy, or (a reboot) after a stop had ended
                    assert answer.status_code == 409, body
                    assert "busy" in body["detail"] or "while it is stopped" in body["detail"]
            assert accepted, [a.status_code for a in answers]
            tasks = sorted([await cluster.wait_task(uuid) for uuid in accepted],
                           key=lambda task: datetime.fromisoformat(task["created_at"]))
            assert all(task["state"] == "succeeded" for task in tasks), tasks
            for earlier, later in itertools.pairwise(tasks):
                # One unfinished flow per VM: the next began after the last one ended.
                assert (datetime.fromisoformat(later["created_at"])
                        >= datetime.fromisoformat(earlier["finished_at"])), (earlier, later)
            flows_started += len(tasks)
            resp = await api.post(f"/api/v1/vms/{vm}/start")
            if resp.status_code == 202:
                flows_started += 1
                await cluster.wait_task(resp.json()["task"]["uuid"])
        from sqlalchemy import func, select

        from yun.control.db.models import FlowRow
        async with cluster.control.db.session() as session:
            flows = (await session.execute(select(func.count()).select_from(FlowRow).where(
                FlowRow.resource_uuid == vm))).scalar_one()
        assert flows == flows_started  # no flow but the answered ones


async def test_placement_keeps_releases_committed_during_its_batch_on_postgres() -> None:
    """Placement must not write back capacity from its copy of the hosts: a release
    committed by another transaction after the copy was read must survive the claims made
    with that copy (seen once as leaked capacity, when reservations were absolute)."""
    downgrade(URL, "base")
    upgrade(URL)
    db = Database(URL)
    try:
        async with db.session() as session:
            project = (await session.scalars(select(ProjectRow.uuid))).first()
            pool = (await session.scalars(select(PoolRow.uuid).where(
                PoolRow.name == "default"))).one()
            session.add(ImageRow(uuid="img", name="img", status="active", project_uuid=project))
            session.add(NodeRow(uuid="n-1", name="n1", url="https://n1", status="up",
                                hypervisor="sim", accel="tcg", sandbox_subnet="10.0.0.0/24",
                                pool_uuid=pool))
            await session.flush()
            await inventory.sync_inventory(session, "n-1", {
                "vcpu": (16, 0), "memory_mb": (16384, 0), "disk_gb": (100, 0)})
            await session.flush()
            # One VM already holds 2 vCPU, 512 MiB, 2 GiB there.
            assert await inventory.claim(session, "n-1", inventory.vm_amounts(2, 512, 2),
                                         {"vcpu": 4.0, "memory_mb": 1.0, "disk_gb": 1.0})
            await inventory.allocate(session, "old", "n-1", inventory.vm_amounts(2, 512, 2))
            for i in range(2):
                session.add(VmRow(uuid=f"vm-{i}", name=f"vm-{i}", state="building", vcpus=1,
                                  memory_mb=256, disk_gb=1, image_uuid="img",
                                  project_uuid=project, pool_uuid=pool))
        placement = Placement(db, host_refresh=3600)  # the copy read once is kept
        await placement.place("vm-0", Request(1, 256, 1, (pool,)))
        async with db.session() as other:  # the old VM is released meanwhile
            await inventory.release(other, "old")
        await placement.place("vm-1", Request(1, 256, 1, (pool,)))
        await placement.stop()
        async with db.session() as session:
            used = {i.resource_class: i.used for i in (await session.scalars(
                select(InventoryRow).where(InventoryRow.node_uuid == "n-1"))).all()}
            assert used == {"vcpu": 2, "memory_mb": 512, "disk_gb": 2}
    finally:
        await db.dispose()
