"""Group commit (yun.control.db.batch, yun.control.flows.journal): concurrent writes share
a transaction; a write that fails fails alone; a failed commit fails every write of it."""

from __future__ import annotations

import asyncio
from typing import Any

from sqlalchemy import event, select
from sqlalchemy.ext.asyncio import AsyncSession

from tests.unit.test_flow_failures import failing_statements
from yun.control.db.batch import GroupCommit
from yun.control.db.models import AuditRow, FlowRow
from yun.control.db.session import Database
from yun.control.flows.journal import FlowRecord, JournalWriter


def _commits(db: Database) -> list[int]:
    seen: list[int] = []
    event.listen(db.engine.sync_engine, "commit", lambda conn: seen.append(1))
    return seen


def _audit(action: str) -> AuditRow:
    return AuditRow(request_id="r", action=action, resource_type="test", status=200,
                    result="ok")


async def test_concurrent_writes_share_commits_and_are_durable_when_they_return(
        db: Database) -> None:
    writer: GroupCommit[str] = GroupCommit(db, "test")
    commits = _commits(db)

    def add(action: str) -> Any:
        return lambda session: session.add(_audit(action))

    await asyncio.gather(*(writer.write(f"a{i}", add(f"a{i}")) for i in range(100)))
    # The first write commits alone; the 99 queued meanwhile share the next commit(s).
    assert len(commits) <= 3, commits
    assert writer.stats.writes == 100 and writer.stats.largest_batch >= 50
    async with db.session() as session:
        actions = set((await session.scalars(select(AuditRow.action))).all())
    assert actions == {f"a{i}" for i in range(100)}
    await writer.close()


async def test_a_write_that_raises_fails_alone(db: Database) -> None:
    writer: GroupCommit[str] = GroupCommit(db, "test")

    def bad(session: AsyncSession) -> None:
        raise ValueError("refused")

    results = await asyncio.gather(
        writer.write("good", lambda session: session.add(_audit("good"))),
        writer.write("bad", bad),
        writer.write("also-good", lambda session: session.add(_audit("also-good"))),
        return_exceptions=True)
    assert results[0] is None and results[2] is None
    assert isinstance(results[1], ValueError)
    async with db.session() as session:
        actions = set((await session.scalars(select(AuditRow.action))).all())
    assert actions == {"good", "also-good"}
    await writer.close()


async def test_a_failed_commit_fails_every_write_of_the_batch(db: Database) -> None:
    writer: GroupCommit[str] = GroupCommit(db, "test")
    with failing_statements(db, "INSERT INTO audit_log"):
        results = await asyncio.gather(
            *(writer.write(f"k{i}", lambda session, i=i: session.add(_audit(f"k{i}")))
              for i in range(5)), return_exceptions=True)
    assert all(isinstance(r, Exception) for r in results), results
    async with db.session() as session:
        assert (await session.scalars(select(AuditRow.action))).all() == []
    # The writer goes on after a failed batch.
    await writer.write("after", lambda session: session.add(_audit("after")))
    await writer.close()


async def test_the_journal_writer_gives_each_write_its_flow_and_steps(db: Database) -> None:
    async with db.session() as session:
        for name in ("f1", "f2"):
            session.add(FlowRow(uuid=name, kind="k", resource_type="r", resource_uuid=name,
                                state="running", context={}, owner="me", steps=[]))
    journal = JournalWriter(db)

    def start(record: FlowRecord) -> str:
        assert record.row is not None
        record.step(0, "first", "running")
        record.row.current_step = "first"
        return record.row.uuid

    def lost(record: FlowRecord) -> None:
        raise LookupError("taken over")

    results = await asyncio.gather(journal.write("f1", start), journal.write("f2", lost),
                                   journal.write("gone", lambda r: r.row),
                                   return_exceptions=True)
    assert results[0] == "f1" and isinstance(results[1], LookupError) and results[2] is None
    async with db.session() as session:
        f1 = await session.get(FlowRow, "f1")
        f2 = await session.get(FlowRow, "f2")
        assert f1 is not None and f2 is not None
        assert f1.current_step == "first" and [s.name for s in f1.steps] == ["first"]
        assert f2.current_step is None and f2.steps == []
    await journal.close()


async def test_reads_beside_the_writer_see_what_was_committed(db: Database) -> None:
    """On SQLite, read sessions use connections of their own (WAL), inline like the
    writer's, and see every commit made before they began."""
    assert db.reader is not None
    async with db.session() as session:
        session.add(_audit("seen"))
    async with db.reading() as session:
        assert (await session.scalars(select(AuditRow.action))).all() == ["seen"]
        raw = await (await session.connection()).get_raw_connection()
        assert type(raw.driver_connection).__name__ == "_InlineConnection"
