"""The workflow engine (Z-FLOW): declared steps with run/rollback, journaled in the database.

A flow runs its steps in order. Before a step runs, the journal records it as
``running``; after, as ``done`` together with the flow's context. When a step
fails, the steps already taken are rolled back in reverse order, and the flow ends
``failed`` with the step's error. A control server that dies mid-flow leaves a
journal; on restart :meth:`FlowEngine.recover` rolls such flows back. Rollbacks are
therefore written to be idempotent and to work from the database and the nodes'
state, not from the context alone: a step may have run without its ``done`` having
been recorded.
"""

from __future__ import annotations

import asyncio
import logging
import os
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import lazyload

from yun.control.db.models import FlowRow, FlowStepRow, utcnow
from yun.control.db.session import Database
from yun.proto.errors import YunError
from yun.util.queues import KeyedQueues

log = logging.getLogger("yun.control.flows")

UNFINISHED = ("pending", "running", "rolling_back")


@dataclass
class FlowContext:
    """What a step sees: the flow's identity, its persisted data and the control services."""

    flow_uuid: str
    kind: str
    resource_uuid: str
    data: dict[str, Any]
    services: Any
    error: str | None = None


class Step:
    """One named step of a flow; subclasses implement run and, where needed, rollback."""

    name: str = "step"

    async def run(self, ctx: FlowContext) -> None:
        raise NotImplementedError

    async def rollback(self, ctx: FlowContext) -> None:
        """Undo :meth:`run`; must be idempotent and tolerate a partial run."""


Hook = Callable[[FlowContext], Awaitable[None]]


@dataclass
class FlowDefinition:
    kind: str
    resource_type: str
    steps: list[Step]
    on_success: Hook | None = None
    on_failure: Hook | None = None  # after rollback; ctx.error says why
    step_names: list[str] = field(init=False)

    def __post_init__(self) -> None:
        self.step_names = [s.name for s in self.steps]
        if len(set(self.step_names)) != len(self.step_names):
            raise ValueError(f"flow {self.kind} has two steps of one name")


def describe(exc: BaseException) -> str:
    """A one-line reason for a failed step, fit for an API answer."""
    if isinstance(exc, YunError):
        return exc.detail
    if isinstance(exc, TimeoutError | asyncio.TimeoutError):
        return "timed out"
    text = str(exc) or exc.__class__.__name__
    return text.splitlines()[0][:500]


class FlowEngine:
    """Runs flows through the per-resource queues and keeps their journal."""

    def __init__(self, db: Database, queues: KeyedQueues, services: Any, owner: str) -> None:
        self.db = db
        self.queues = queues
        self.services = services
        self.owner = owner
        self.definitions: dict[str, FlowDefinition] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._done: dict[str, asyncio.Event] = {}
        # Test hook: "kind:step" pauses a flow after that step ran but before its
        # journal says done, so a test can kill the server at the worst moment.
        self.pause_after = os.environ.get("YUN_TEST_PAUSE_AFTER_STEP", "")

    def register(self, definition: FlowDefinition) -> None:
        self.definitions[definition.kind] = definition

    def new_flow(
        self, session: AsyncSession, kind: str, resource_uuid: str, data: dict[str, Any],
        project_uuid: str | None = None,
    ) -> FlowRow:
        """Add a pending flow in the caller's transaction; start it with :meth:`launch` after.

        ``project_uuid`` makes the task visible to that project's users."""
        definition = self.definitions[kind]
        row = FlowRow(
            uuid=str(uuid.uuid4()), kind=kind, resource_type=definition.resource_type,
            resource_uuid=resource_uuid, project_uuid=project_uuid, state="pending",
            context=data, owner=self.owner, steps=[],
        )
        session.add(row)
        return row

    def launch(self, flow_uuid: str, resource_uuid: str) -> None:
        """Run a committed pending flow in the background, in its resource's queue."""
        self._done.setdefault(flow_uuid, asyncio.Event())
        task = asyncio.create_task(self._execute(flow_uuid, resource_uuid),
                                   name=f"flow-{flow_uuid}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def wait(self, flow_uuid: str, timeout: float) -> None:
        """Return when the flow has ended (or ``timeout`` passed)."""
        event = self._done.get(flow_uuid)
        if event is None:
            return
        try:
            await asyncio.wait_for(event.wait(), timeout)
        except TimeoutError:
            pass

    async def shutdown(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def recover(self, live_peers: set[str] | frozenset[str] = frozenset()) -> int:
        """Finish the journal of flows left unfinished by a previous life of this server,
        or by a control server that is no longer alive (``live_peers`` are the other
        control servers alive now: their flows are theirs)."""
        async with self.db.session() as session:
            query = select(FlowRow).where(FlowRow.state.in_(UNFINISHED))
            if live_peers:
                query = query.where(FlowRow.owner.is_(None) | FlowRow.owner.not_in(live_peers))
            rows = (await session.scalars(query)).all()
            pending = [(r.uuid, r.resource_uuid, r.state) for r in rows]
        for flow_uuid, resource_uuid, state in pending:
            log.warning("recovering interrupted flow", extra={
                "flow": flow_uuid, "resource": resource_uuid, "state": state})
            self.launch(flow_uuid, resource_uuid)
        return len(pending)

    # -- execution ------------------------------------------------------------------------

    async def _execute(self, flow_uuid: str, resource_uuid: str) -> None:
        try:
            async with self.queues.hold(resource_uuid):
                await self._execute_held(flow_uuid)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("flow engine error", extra={"flow": flow_uuid})
        finally:
            event = self._done.pop(flow_uuid, None)
            if event is not None:
                event.set()

    async def _execute_held(self, flow_uuid: str) -> None:
        async with self.db.session() as session:
            row = await session.get(FlowRow, flow_uuid)
            if row is None or row.state not in UNFINISHED:
                return
            definition = self.definitions[row.kind]
            ctx = FlowContext(flow_uuid, row.kind, row.resource_uuid, dict(row.context or {}),
                              self.services)
            interrupted = row.state != "pending"
            started = [s.seq for s in row.steps]
            interrupted_step = row.current_step
            row.state = "running"
            row.owner = self.owner

        if interrupted:
            ctx.error = (f"interrupted during step '{interrupted_step}' by a control server "
                         "restart; rolled back")
            await self._rollback(ctx, definition, started)
            return

        for seq, step in enumerate(definition.steps):
            # One transaction records the previous step done (with the context) and this
            # one running: half the journal writes, the same guarantees.
            await self._journal_step(flow_uuid, seq, step.name, "running", started=True,
                                     done_before=seq > 0, data=ctx.data if seq else None)
            started.append(seq)
            try:
                await step.run(ctx)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                ctx.error = f"{step.name}: {describe(exc)}"
                log.warning("flow step failed; rolling back", extra={
                    "flow": flow_uuid, "kind": ctx.kind, "resource": ctx.resource_uuid,
                    "step": step.name, "error": ctx.error})
                await self._journal_step(flow_uuid, seq, step.name, "failed", error=ctx.error)
                await self._rollback(ctx, definition, started)
                return
            if self.pause_after == f"{ctx.kind}:{step.name}":
                log.warning("test hook: flow paused", extra={"flow": flow_uuid,
                                                             "step": step.name})
                await asyncio.Event().wait()

        last = len(definition.steps) - 1
        await self._journal_step(flow_uuid, last, definition.steps[last].name, "done",
                                 data=ctx.data)
        if definition.on_success is not None:
            await definition.on_success(ctx)
        await self._finish(flow_uuid, "succeeded", None)
        log.info("flow succeeded", extra={"flow": flow_uuid, "kind": ctx.kind,
                                          "resource": ctx.resource_uuid})

    async def _rollback(self, ctx: FlowContext, definition: FlowDefinition,
                        started: list[int]) -> None:
        async with self.db.session() as session:
            row = await session.get(FlowRow, ctx.flow_uuid, options=[lazyload(FlowRow.steps)])
            assert row is not None
            row.state = "rolling_back"
            row.error = ctx.error
        for seq in sorted(set(started), reverse=True):
            step = definition.steps[seq]
            await self._journal_step(ctx.flow_uuid, seq, step.name, "rolling_back")
            try:
                await step.rollback(ctx)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.error("rollback of step failed", extra={
                    "flow": ctx.flow_uuid, "step": step.name, "resource": ctx.resource_uuid,
                    "error": describe(exc)})
                await self._journal_step(ctx.flow_uuid, seq, step.name, "rollback_failed",
                                         error=describe(exc))
                continue
            await self._journal_step(ctx.flow_uuid, seq, step.name, "rolled_back")
        if definition.on_failure is not None:
            try:
                await definition.on_failure(ctx)
            except Exception:
                log.exception("flow failure hook failed", extra={"flow": ctx.flow_uuid})
        await self._finish(ctx.flow_uuid, "failed", ctx.error)
        log.warning("flow failed and was rolled back", extra={
            "flow": ctx.flow_uuid, "kind": ctx.kind, "resource": ctx.resource_uuid,
            "error": ctx.error})

    async def _journal_step(
        self, flow_uuid: str, seq: int, name: str, state: str, *, started: bool = False,
        error: str | None = None, data: dict[str, Any] | None = None,
        done_before: bool = False,
    ) -> None:
        now = utcnow()
        async with self.db.session() as session:
            row = await session.get(FlowRow, flow_uuid, options=[lazyload(FlowRow.steps)])
            assert row is not None
            if done_before:
                previous = await session.get(FlowStepRow, (flow_uuid, seq - 1))
                if previous is not None:
                    previous.state, previous.finished_at = "done", now
            step = await session.get(FlowStepRow, (flow_uuid, seq))
            if step is None:
                step = FlowStepRow(flow_uuid=flow_uuid, seq=seq, name=name, state=state)
                session.add(step)
            step.state = state
            if started:
                step.started_at = now
                row.current_step = name
            elif state in ("done", "failed", "rolled_back", "rollback_failed"):
                step.finished_at = now
            if error is not None:
                step.error = error
            if data is not None:
                row.context = dict(data)
            row.updated_at = now

    async def _finish(self, flow_uuid: str, state: str, error: str | None) -> None:
        async with self.db.session() as session:
            row = await session.get(FlowRow, flow_uuid, options=[lazyload(FlowRow.steps)])
            assert row is not None
            row.state = state
            row.error = error
            row.finished_at = utcnow()
