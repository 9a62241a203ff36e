"""The flow engine: rollback along the path taken, journal, recovery after a crash."""

from __future__ import annotations

import asyncio

from yun.control.db.models import FlowRow, FlowStepRow
from yun.control.db.session import Database
from yun.control.flows.engine import FlowContext, FlowDefinition, FlowEngine, Step
from yun.util.queues import KeyedQueues


class Recorder(Step):
    def __init__(self, name: str, log: list[str], fail: bool = False) -> None:
        self.name = name
        self.log = log
        self.fail = fail

    async def run(self, ctx: FlowContext) -> None:
        self.log.append(f"run {self.name}")
        ctx.data[self.name] = True
        if self.fail:
            raise RuntimeError(f"{self.name} broke")

    async def rollback(self, ctx: FlowContext) -> None:
        self.log.append(f"rollback {self.name}")


async def run_flow(engine: FlowEngine, kind: str) -> FlowRow:
    async with engine.db.session() as session:
        row = engine.new_flow(session, kind, "res-1", {})
    engine.launch(row.uuid, "res-1")
    await engine.wait(row.uuid, 10)
    async with engine.db.session() as session:
        result = await session.get(FlowRow, row.uuid)
        assert result is not None
        return result


async def test_failure_rolls_back_the_steps_taken_in_reverse(db: Database) -> None:
    log: list[str] = []
    failures: list[str] = []

    async def on_failure(ctx: FlowContext) -> None:
        failures.append(ctx.error or "")

    engine = FlowEngine(db, KeyedQueues(), None, "me")
    engine.register(FlowDefinition("t.fail", "thing", [
        Recorder("a", log), Recorder("b", log), Recorder("c", log, fail=True),
        Recorder("d", log)], on_failure=on_failure))
    row = await run_flow(engine, "t.fail")
    assert log == ["run a", "run b", "run c", "rollback c", "rollback b", "rollback a"]
    assert row.state == "failed" and row.error == "c: c broke" and failures == [row.error]
    assert [(s.name, s.state) for s in row.steps] == [
        ("a", "rolled_back"), ("b", "rolled_back"), ("c", "rolled_back")]


async def test_success_journals_every_step_done_with_context(db: Database) -> None:
    log: list[str] = []
    engine = FlowEngine(db, KeyedQueues(), None, "me")
    engine.register(FlowDefinition("t.ok", "thing", [Recorder("a", log), Recorder("b", log)]))
    row = await run_flow(engine, "t.ok")
    assert row.state == "succeeded" and row.finished_at is not None
    assert [(s.name, s.state) for s in row.steps] == [("a", "done"), ("b", "done")]
    assert row.context == {"a": True, "b": True}


class Optional(Recorder):
    """A step needed only when the flow's data says so."""

    def needed(self, ctx: FlowContext) -> bool:
        return bool(ctx.data.get(f"need {self.name}"))


def journal_writes(engine: FlowEngine) -> list[int]:
    """Counts the journal writes the engine asks for (group commit or not)."""
    writes: list[int] = []
    write = engine.journal.write

    async def counted(flow_uuid: str, apply):  # type: ignore[no-untyped-def]
        writes.append(1)
        return await write(flow_uuid, apply)
    engine.journal.write = counted  # type: ignore[method-assign]
    return writes


async def test_steps_not_needed_are_skipped_in_the_next_journal_write(db: Database) -> None:
    log: list[str] = []

    class NeedsC(Recorder):
        async def run(self, ctx: FlowContext) -> None:
            await super().run(ctx)
            ctx.data["need c"] = True  # what a step learns decides what follows

    engine = FlowEngine(db, KeyedQueues(), None, "me")
    engine.register(FlowDefinition("t.skip", "thing", [
        Recorder("a", log), Optional("b", log), NeedsC("m", log), Optional("c", log),
        Optional("d", log)]))
    writes = journal_writes(engine)
    row = await run_flow(engine, "t.skip")
    assert log == ["run a", "run m", "run c"]
    assert row.state == "succeeded"
    assert [(s.name, s.state) for s in row.steps] == [
        ("a", "done"), ("b", "skipped"), ("m", "done"), ("c", "done"), ("d", "skipped")]
    assert all(s.finished_at is not None for s in row.steps)
    # Taking the flow (a running), m running, c running, the end: no write of their own
    # for b or d. Before skipping, every step cost one.
    assert len(writes) == 4, writes


async def test_a_failure_rolls_back_past_skipped_steps_without_them(db: Database) -> None:
    log: list[str] = []
    engine = FlowEngine(db, KeyedQueues(), None, "me")
    engine.register(FlowDefinition("t.skipfail", "thing", [
        Recorder("a", log), Optional("b", log), Recorder("c", log, fail=True)]))
    row = await run_flow(engine, "t.skipfail")
    assert log == ["run a", "run c", "rollback c", "rollback a"]
    assert row.state == "failed"
    assert [(s.name, s.state) for s in row.steps] == [
        ("a", "rolled_back"), ("b", "skipped"), ("c", "rolled_back")]


async def test_recovery_passes_over_skipped_steps(db: Database) -> None:
    log: list[str] = []
    async with db.session() as session:
        session.add(FlowRow(uuid="f1", kind="t.crash", resource_type="thing",
                            resource_uuid="r", state="running", current_step="c",
                            context={}, owner="me", steps=[
                                FlowStepRow(seq=0, name="a", state="done"),
                                FlowStepRow(seq=1, name="b", state="skipped"),
                                FlowStepRow(seq=2, name="c", state="running")]))
    engine = FlowEngine(db, KeyedQueues(), None, "me")
    engine.register(FlowDefinition("t.crash", "thing", [
        Recorder("a", log), Recorder("b", log), Recorder("c", log)]))
    assert await engine.recover(live_peers=set()) == 1
    await asyncio.sleep(0)
    await engine.wait("f1", 10)
    assert log == ["rollback c", "rollback a"]


async def test_recovery_rolls_back_a_flow_a_crash_left_running(db: Database) -> None:
    log: list[str] = []
    definition = FlowDefinition("t.crash", "thing", [Recorder("a", log), Recorder("b", log)])
    # What a control server killed during step b leaves in the journal.
    async with db.session() as session:
        session.add(FlowRow(uuid="f1", kind="t.crash", resource_type="thing",
                            resource_uuid="r", state="running", current_step="b",
                            context={}, owner="me", steps=[
                                FlowStepRow(seq=0, name="a", state="done"),
                                FlowStepRow(seq=1, name="b", state="running")]))
        session.add(FlowRow(uuid="f2", kind="t.crash", resource_type="thing",
                            resource_uuid="r2", state="running", current_step="a",
                            context={}, owner="someone-else", steps=[]))
        session.add(FlowRow(uuid="f3", kind="t.crash", resource_type="thing",
                            resource_uuid="r3", state="pending", context={},
                            owner="a-dead-server", steps=[]))
    engine = FlowEngine(db, KeyedQueues(), None, "me")
    engine.register(definition)
    # f2 belongs to a control server that is alive: not ours to touch. f3 was left
    # pending by one that died: it runs here.
    assert await engine.recover(live_peers={"someone-else"}) == 2
    await asyncio.sleep(0)
    await engine.wait("f1", 10)
    await engine.wait("f3", 10)
    async with db.session() as session:
        row = await session.get(FlowRow, "f1")
        assert row is not None
        assert row.state == "failed"
        assert row.error is not None and "interrupted during step 'b'" in row.error
    # The two flows run side by side (other resources); each keeps its own order.
    assert sorted(log) == sorted(["rollback b", "rollback a", "run a", "run b"])
    assert log.index("rollback b") < log.index("rollback a")
    assert log.index("run a") < log.index("run b")
    async with db.session() as session:
        other = await session.get(FlowRow, "f2")
        assert other is not None and other.state == "running"


async def test_a_flow_launched_twice_runs_once(db: Database) -> None:
    """The per-resource queue keeps a flow launched again while it runs (a takeover round
    racing its own launch) from running twice: the second turn finds it ended."""
    runs: list[str] = []

    class Slow(Step):
        name = "slow"

        async def run(self, ctx: FlowContext) -> None:
            runs.append(ctx.flow_uuid)
            await asyncio.sleep(0.05)

    engine = FlowEngine(db, KeyedQueues(), None, "me")
    engine.register(FlowDefinition("t.slow", "thing", [Slow()]))
    async with db.session() as session:
        row = engine.new_flow(session, "t.slow", "same", {})
    engine.launch(row.uuid, "same")
    engine.launch(row.uuid, "same")
    await engine.wait(row.uuid, 10)
    await asyncio.gather(*engine._tasks)
    assert runs == [row.uuid]
