"""U-IDEMP after crashes: a client retrying with its Idempotency-Key always gets an answer,
one VM per key, and keys expire.

A control server killed between storing a key and storing its answer leaves the key row
"in progress" held by its dead incarnation (a boot id no process has any more). The tests
put the database in exactly that state and retry through the gateway."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

from sqlalchemy import func, select, update

from tests.integration.conftest import upload
from yun.control.db.idempotency import purge_expired, scoped_key
from yun.control.db.models import FlowRow, IdempotencyRow, VmRow, utcnow
from yun.testing.cluster import SimCluster

BODY = {"name": "keyed", "image": "img"}


async def keyed_create(cluster: SimCluster, key: str) -> tuple[int, dict]:
    assert cluster.api is not None
    resp = await cluster.api.post("/api/v1/vms", json=BODY, headers={"Idempotency-Key": key})
    return resp.status_code, resp.json()


async def key_row(cluster: SimCluster, key: str) -> IdempotencyRow:
    assert cluster.control is not None
    async with cluster.control.db.session() as session:
        row = (await session.scalars(select(IdempotencyRow))).all()
        found = [r for r in row if r.key == scoped_key(r.user_uuid or "", key)]
        assert len(found) == 1
        return found[0]


async def vm_count(cluster: SimCluster) -> int:
    assert cluster.control is not None
    async with cluster.control.db.session() as session:
        return int((await session.execute(select(func.count()).select_from(VmRow))).scalar_one())


async def test_a_key_left_in_progress_by_a_crash_is_taken_over(
        cluster: SimCluster, small_qcow2: Path) -> None:
    """Before: every retry waited 15 s and got 409, forever."""
    assert cluster.control is not None
    await upload(cluster, small_qcow2)
    me = cluster.control.ctx.membership.component_id

    # 1. The VM was made, the answer not stored: the retry answers that VM.
    code, first = await keyed_create(cluster, "crash-after-vm")
    assert code == 202
    await cluster.wait_task(first["task"]["uuid"])
    row = await key_row(cluster, "crash-after-vm")
    async with cluster.control.db.session() as session:
        await session.execute(update(IdempotencyRow).where(IdempotencyRow.key == row.key)
                              .values(status_code=0, body={}, owner=me,
                                      owner_boot="boot-of-a-previous-life"))
    code, again = await keyed_create(cluster, "crash-after-vm")
    assert code == 202, again
    assert again["resource"]["uuid"] == first["resource"]["uuid"]
    assert again["task"]["uuid"] == first["task"]["uuid"]
    assert await vm_count(cluster) == 1
    stored = await key_row(cluster, "crash-after-vm")
    assert stored.status_code == 202 and stored.owner_boot == cluster.control.ctx.engine.boot_id
    # ... and from now on the stored answer is replayed.
    code, replay = await keyed_create(cluster, "crash-after-vm")
    assert code == 202 and replay["resource"]["uuid"] == first["resource"]["uuid"]

    # 2. The crash came before the VM was made: the retry carries the request out.
    scoped = scoped_key(row.user_uuid or "", "crash-before-vm")
    async with cluster.control.db.session() as session:
        session.add(IdempotencyRow(key=scoped, user_uuid=row.user_uuid,
                                   fingerprint=row.fingerprint, status_code=0, body={},
                                   owner=me, owner_boot="boot-of-a-previous-life",
                                   expires_at=utcnow() + timedelta(hours=1)))
    code, made = await keyed_create(cluster, "crash-before-vm")
    assert code == 202, made
    assert made["resource"]["uuid"] != first["resource"]["uuid"]
    assert await vm_count(cluster) == 2
    assert (await cluster.wait_task(made["task"]["uuid"]))["state"] == "succeeded"
    async with cluster.control.db.session() as session:
        vm = await session.get(VmRow, made["resource"]["uuid"])
        assert vm is not None and vm.idempotency_key == scoped

    # 3. Held by a control server that is no longer a peer: taken over as well.
    async with cluster.control.db.session() as session:
        await session.execute(update(IdempotencyRow).where(IdempotencyRow.key == scoped)
                              .values(status_code=0, body={}, owner="control-that-left",
                                      owner_boot="its-boot"))
    code, again = await keyed_create(cluster, "crash-before-vm")
    assert code == 202 and again["resource"]["uuid"] == made["resource"]["uuid"]
    assert await vm_count(cluster) == 2


async def test_keys_expire_and_are_purged(cluster: SimCluster, small_qcow2: Path) -> None:
    """Before: keys were kept forever."""
    assert cluster.control is not None
    await upload(cluster, small_qcow2)
    code, first = await keyed_create(cluster, "old-key")
    assert code == 202
    await cluster.wait_task(first["task"]["uuid"])
    row = await key_row(cluster, "old-key")
    retention = cluster.control.settings.idempotency_retention
    assert abs((row.expires_at - row.created_at).total_seconds() - retention) < 5

    # Past its retention a key is a new key: the request is carried out again.
    async with cluster.control.db.session() as session:
        await session.execute(update(IdempotencyRow).where(IdempotencyRow.key == row.key)
                              .values(expires_at=utcnow() - timedelta(seconds=1)))
    code, second = await keyed_create(cluster, "old-key")
    assert code == 202 and second["resource"]["uuid"] != first["resource"]["uuid"]
    assert await vm_count(cluster) == 2
    await cluster.wait_task(second["task"]["uuid"])

    # The background job's purge deletes expired keys and unbinds them from their VMs.
    async with cluster.control.db.session() as session:
        await session.execute(update(IdempotencyRow).where(IdempotencyRow.key == row.key)
                              .values(expires_at=utcnow() - timedelta(seconds=1)))
    assert await purge_expired(cluster.control.db) == 1
    async with cluster.control.db.session() as session:
        assert await session.get(IdempotencyRow, row.key) is None
        bound = (await session.scalars(select(VmRow).where(
            VmRow.idempotency_key.is_not(None)))).all()
        assert bound == []
        unfinished = (await session.scalars(select(FlowRow).where(
            FlowRow.state.in_(("pending", "running", "rolling_back"))))).all()
        assert unfinished == []
