"""The flow engine never leaves a flow stuck: journal and hook failures are retried then
rolled back, temporary step errors retried until the step's deadline, permanent ones
rolled back at once, flows of departed control servers taken over while running, and one
unfinished flow per resource kept by the database."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from types import SimpleNamespace
from typing import Any

import pytest
from sqlalchemy import event
from sqlalchemy.exc import IntegrityError

from yun.control.db.models import FlowRow, FlowStepRow, utcnow
from yun.control.db.session import Database
from yun.control.flows.engine import (
    FlowContext,
    FlowDefinition,
    FlowEngine,
    PermanentError,
    RetryPolicy,
    Step,
    TemporaryError,
)
from yun.control.flows.vm import ReleaseResources
from yun.proto.errors import Conflict, PeerError
from yun.util.queues import KeyedQueues

# Short retries, so a test sees a whole retry budget spent in about a second.
FAST = RetryPolicy(first_delay=0.02, max_delay=0.1, step_deadline=0.5, journal_deadline=0.5,
                   hook_deadline=0.5)


@contextmanager
def failing_statements(db: Database, match: str, times: int | None = None) -> Iterator[list[int]]:
    """Make the database fail statements containing ``match`` (all of them, or the first
    ``times``), the way a dropped connection or a locked database does."""
    failed: list[int] = []

    def fail(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if match in statement and (times is None or len(failed) < times):
            failed.append(1)
            raise sqlite3.OperationalError("disk I/O error (injected)")

    event.listen(db.engine.sync_engine, "before_cursor_execute", fail)
    try:
        yield failed
    finally:
        event.remove(db.engine.sync_engine, "before_cursor_execute", fail)


class Counted(Step):
    """A step that raises the given errors in turn, then succeeds."""

    def __init__(self, name: str, errors: list[Exception] | None = None,
                 forever: Exception | None = None) -> None:
        self.name = name
        self.errors = list(errors or [])
        self.forever = forever
        self.runs = 0
        self.rollbacks = 0

    async def run(self, ctx: FlowContext) -> None:
        self.runs += 1
        if self.forever is not None:
            raise self.forever
        if self.errors:
            raise self.errors.pop(0)

    async def rollback(self, ctx: FlowContext) -> None:
        self.rollbacks += 1


async def start(engine: FlowEngine, kind: str, resource: str = "res-1") -> str:
    async with engine.db.session() as session:
        row = engine.new_flow(session, kind, resource, {})
    engine.launch(row.uuid, resource)
    return row.uuid


async def ended(engine: FlowEngine, flow_uuid: str, timeout: float = 30) -> FlowRow:
    await engine.wait(flow_uuid, timeout)
    async with engine.db.session() as session:
        row = await session.get(FlowRow, flow_uuid)
        assert row is not None
        return row


def engine_for(db: Database, *definitions: FlowDefinition, owner: str = "me") -> FlowEngine:
    engine = FlowEngine(db, KeyedQueues(), None, owner, retry=FAST)
    for definition in definitions:
        engine.register(definition)
    return engine


# --- hooks and the journal ----------------------------------------------------------------


async def test_a_success_hook_that_fails_is_retried(db: Database) -> None:
    calls = 0

    async def flaky(ctx: FlowContext) -> None:
        nonlocal calls
        calls += 1
        if calls < 3:
            raise RuntimeError("database went away")

    step = Counted("a")
    engine = engine_for(db, FlowDefinition("t.hook", "thing", [step], on_success=flaky))
    row = await ended(engine, await start(engine, "t.hook"))
    assert row.state == "succeeded" and calls == 3 and step.rollbacks == 0


async def test_a_success_hook_that_keeps_failing_rolls_back_and_ends(db: Database) -> None:
    """Before: the exception escaped, the flow stayed running with its capacity held."""
    failures: list[str] = []

    async def broken(ctx: FlowContext) -> None:
        raise RuntimeError("hook broke")

    async def on_failure(ctx: FlowContext) -> None:
        failures.append(ctx.error or "")

    step = Counted("a")
    engine = engine_for(db, FlowDefinition("t.hook", "thing", [step], on_success=broken,
                                           on_failure=on_failure))
    row = await ended(engine, await start(engine, "t.hook"))
    assert row.state == "failed" and row.finished_at is not None
    assert row.error is not None and "hook broke" in row.error
    assert step.rollbacks == 1 and failures == [row.error]
    assert [(s.name, s.state) for s in row.steps] == [("a", "rolled_back")]


async def test_journal_write_errors_are_retried(db: Database) -> None:
    step = Counted("a")
    engine = engine_for(db, FlowDefinition("t.j", "thing", [step, Counted("b")]))
    with failing_statements(db, "flow_steps", times=3) as failed:
        row = await ended(engine, await start(engine, "t.j"))
    assert len(failed) == 3
    assert row.state == "succeeded"
    assert [(s.name, s.state) for s in row.steps] == [("a", "done"), ("b", "done")]


async def test_a_journal_that_cannot_be_written_rolls_the_flow_back(db: Database) -> None:
    """Before: the database error escaped the engine and the flow stayed pending/running
    until the next restart."""
    step = Counted("a")
    engine = engine_for(db, FlowDefinition("t.j", "thing", [step]))
    with failing_statements(db, "INSERT INTO flow_steps"):
        row = await ended(engine, await start(engine, "t.j"))
    assert row.state == "failed" and row.finished_at is not None
    assert row.error is not None and "journal could not be written" in row.error
    assert step.runs == 0  # never started: nothing recorded, nothing to undo


async def test_a_flow_abandoned_while_the_database_was_down_is_ended_later(
        db: Database) -> None:
    """The database stops taking writes while step a runs, for longer than the retry
    budget: nothing can be recorded, the flow task gives up; once the database is back,
    the takeover round finds this server's own flow that no task runs and ends it."""
    down = asyncio.Event()

    class Outage(Counted):
        async def run(self, ctx: FlowContext) -> None:
            await super().run(ctx)
            down.set()

    def fail(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if down.is_set() and statement.lstrip().startswith(("UPDATE", "INSERT")):
            raise sqlite3.OperationalError("unable to open database file (injected)")

    step = Outage("a")
    engine = engine_for(db, FlowDefinition("t.down", "thing", [step, Counted("b")]))
    event.listen(db.engine.sync_engine, "before_cursor_execute", fail)
    try:
        flow_uuid = await start(engine, "t.down")
        await engine.wait(flow_uuid, 30)
    finally:
        event.remove(db.engine.sync_engine, "before_cursor_execute", fail)
    async with db.session() as session:
        row = await session.get(FlowRow, flow_uuid)
        assert row is not None and row.state == "running"  # nothing could be written
    assert await engine.take_over(set(), grace=0) == 1
    row = await ended(engine, flow_uuid)
    assert row.state == "failed" and row.error is not None
    assert "interrupted during step 'a'" in row.error
    assert step.runs == 1 and step.rollbacks == 1


# --- temporary and permanent step errors ---------------------------------------------------


async def test_temporary_step_errors_are_retried(db: Database) -> None:
    step = Counted("provision", errors=[
        PeerError("http://node unreachable: ConnectError"),
        TemporaryError("node briefly away"),
        PeerError("node answered 503", peer_status=503)])
    engine = engine_for(db, FlowDefinition("t.temp", "thing", [step]))
    row = await ended(engine, await start(engine, "t.temp"))
    assert row.state == "succeeded" and step.runs == 4 and step.rollbacks == 0


async def test_temporary_errors_past_the_deadline_roll_back(db: Database) -> None:
    step = Counted("provision", forever=TemporaryError("node still away"))
    engine = engine_for(db, FlowDefinition("t.temp", "thing", [step]))
    row = await ended(engine, await start(engine, "t.temp"))
    assert row.state == "failed" and row.error == "provision: node still away"
    assert step.runs > 2 and step.rollbacks == 1


@pytest.mark.parametrize("error", [PermanentError("image corrupt"), RuntimeError("bug"),
                                   PeerError("node failed", peer_status=500),
                                   Conflict("not running")])
async def test_permanent_step_errors_roll_back_at_once(db: Database, error: Exception) -> None:
    step = Counted("provision", forever=error)
    engine = engine_for(db, FlowDefinition("t.perm", "thing", [step]))
    row = await ended(engine, await start(engine, "t.perm"))
    assert row.state == "failed" and step.runs == 1 and step.rollbacks == 1


async def test_interrupted_before_the_first_step_says_so(db: Database) -> None:
    async with db.session() as session:
        session.add(FlowRow(uuid="f0", kind="t.i", resource_type="thing", resource_uuid="r",
                            state="running", current_step=None, context={}, owner="me",
                            steps=[]))
    engine = engine_for(db, FlowDefinition("t.i", "thing", [Counted("a")]))
    assert await engine.recover() == 1
    row = await ended(engine, "f0")
    assert row.state == "failed" and row.error is not None
    assert "before its first step" in row.error and "None" not in row.error


# --- ownership ----------------------------------------------------------------------------


async def add_orphan(db: Database, flow_uuid: str, owner: str, age: float,
                     resource: str) -> None:
    stamp = utcnow() - timedelta(seconds=age)
    async with db.session() as session:
        session.add(FlowRow(uuid=flow_uuid, kind="t.o", resource_type="thing",
                            resource_uuid=resource, state="running", current_step="a",
                            context={}, owner=owner, updated_at=stamp, created_at=stamp,
                            steps=[FlowStepRow(seq=0, name="a", state="running")]))


async def test_flows_of_departed_servers_are_taken_over_once(db: Database) -> None:
    """Two control servers run a takeover round at the same moment: each orphan goes to
    exactly one of them; flows of a live server, or with a fresh heartbeat, stay."""
    steps = {"a": Counted("a"), "b": Counted("a")}
    first = engine_for(db, FlowDefinition("t.o", "thing", [steps["a"]]), owner="ctl-a")
    second = engine_for(db, FlowDefinition("t.o", "thing", [steps["b"]]), owner="ctl-b")
    for i in range(6):
        await add_orphan(db, f"dead-{i}", "ctl-dead", 120, f"r{i}")
    await add_orphan(db, "alive-1", "ctl-c", 120, "ra")
    await add_orphan(db, "fresh-1", "ctl-gone-just-now", 1, "rf")
    taken = await asyncio.gather(first.take_over({"ctl-b", "ctl-c"}, grace=30),
                                 second.take_over({"ctl-a", "ctl-c"}, grace=30))
    assert sum(taken) == 6
    for i in range(6):
        for engine in (first, second):
            await engine.wait(f"dead-{i}", 30)
    assert steps["a"].rollbacks + steps["b"].rollbacks == 6  # each rolled back once
    async with db.session() as session:
        for i in range(6):
            row = await session.get(FlowRow, f"dead-{i}")
            assert row is not None and row.state == "failed"
            assert row.owner in ("ctl-a", "ctl-b")
        for untouched in ("alive-1", "fresh-1"):
            row = await session.get(FlowRow, untouched)
            assert row is not None and row.state == "running"


async def test_a_flow_taken_over_stops_on_its_old_owner(db: Database) -> None:
    """A server that lost its flow to another (it looked gone) stops at its next journal
    write instead of racing the new owner."""
    release = asyncio.Event()

    class Blocked(Step):
        name = "blocked"

        async def run(self, ctx: FlowContext) -> None:
            await release.wait()

    after = Counted("after")
    old = engine_for(db, FlowDefinition("t.b", "thing", [Blocked(), after]), owner="ctl-old")
    flow_uuid = await start(old, "t.b")
    while True:  # until the step runs
        async with db.session() as session:
            row = await session.get(FlowRow, flow_uuid)
            if row is not None and row.current_step == "blocked":
                break
        await asyncio.sleep(0.01)
    new = engine_for(db, FlowDefinition("t.b", "thing", [Blocked(), Counted("after")]),
                     owner="ctl-new")
    assert await new.take_over(set(), grace=0) == 1
    row = await ended(new, flow_uuid)
    assert row.state == "failed" and row.owner == "ctl-new"
    release.set()
    await old.wait(flow_uuid, 30)
    assert after.runs == 0  # the old owner went no further


async def test_one_unfinished_flow_per_resource_is_a_database_rule(db: Database) -> None:
    engine = engine_for(db, FlowDefinition("t.x", "thing", [Counted("a")]))
    async with db.session() as session:
        engine.new_flow(session, "t.x", "vm-1", {})
    with pytest.raises(IntegrityError):
        async with db.session() as session:
            engine.new_flow(session, "t.x", "vm-1", {})
    with pytest.raises(Conflict, match="VM web is busy with another task"):
        async with db.session() as session:
            await engine.add_flow(session, "t.x", "vm-1", {}, what="VM web")
    async with db.session() as session:  # other resources are free
        await engine.add_flow(session, "t.x", "vm-2", {})


async def test_release_step_run_again_after_its_commit_finds_the_vm_gone(db: Database) -> None:
    """The delete flow's last step may be run again when its commit succeeded but its answer
    was lost (a temporary database error): the second run must not fail on the missing VM."""
    ctx = FlowContext("flow-1", "vm.delete", "vm-gone", {}, SimpleNamespace(db=db))
    await ReleaseResources().run(ctx)  # no VM row at all: nothing to release, no error
