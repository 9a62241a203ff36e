"""The workflow engine (Z-FLOW): declared steps with run/rollback, journaled in the database.

A flow runs its steps in order. Before a step runs, the journal records it as
``running``; after, as ``done`` together with the flow's context. When a step
fails, the steps already taken are rolled back in reverse order, and the flow ends
``failed`` with the step's error. Rollbacks are therefore written to be idempotent and
to work from the database and the nodes' state, not from the context alone: a step may
have run without its ``done`` having been recorded. A step whose :meth:`Step.needed`
says this run has nothing for it (judged from the context) is passed over: it is
recorded ``skipped`` with the next journal write, never run and never rolled back.

Failure handling (a flow always ends):

- A step error is *temporary* (:class:`TemporaryError`, an unreachable peer, a 502/503/
  504 answer, :class:`~yun.proto.errors.Unavailable`, a timeout, a lost database
  connection) or *permanent* (anything else, or :class:`PermanentError`). A temporary
  error retries the step with a bounded backoff until the step's deadline
  (:attr:`Step.retry_deadline`), then rolls back; a permanent one rolls back at once. Steps
  are retried as a whole, so a step's ``run`` must be idempotent (node calls carry a
  request id derived from the flow).
- A journal write or a success hook that fails is retried with backoff for a bounded
  time; then the flow is rolled back (a hook) or abandoned to the takeover job (the
  database is unreachable: nothing can be recorded), which rolls it back once the
  database answers again.
- Each flow has an owner (a control server's component id). The owner refreshes its
  flows' ``updated_at`` every heartbeat; a periodic job on every control server takes
  over, with a conditional UPDATE, the unfinished flows whose owner is not a live control
  server and whose heartbeat has stopped, and this server's own flows that no task here
  runs. Every journal write checks the owner, so a server whose flow was taken over stops
  at its next write instead of racing the new owner.
- One unfinished flow per resource is a database invariant (a partial unique index);
  :meth:`FlowEngine.add_flow` turns the violation into a 409.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, TypeVar

from sqlalchemy import Executable, or_, select, update
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.ext.asyncio import AsyncSession

from yun.control.db.models import (
    UNFINISHED_FLOW_INDEX,
    UNFINISHED_STATES,
    FlowRow,
    utcnow,
)
from yun.control.db.session import Database
from yun.control.flows.journal import FlowRecord, JournalWriter
from yun.proto.errors import Conflict, PeerError, Unavailable, YunError
from yun.util import metrics
from yun.util.lifecycle import wait_set
from yun.util.queues import KeyedQueues

log = logging.getLogger("yun.control.flows")

UNFINISHED = UNFINISHED_STATES
#: the journal state of a step a run passed over (:meth:`Step.needed`)
SKIPPED = "skipped"
T = TypeVar("T")


class TemporaryError(YunError):
    """A step failure that may pass if the step is tried again (e.g. a node briefly
    unreachable): the engine retries the step with backoff until its deadline."""

    status = 503
    title = "Temporary failure"


class PermanentError(YunError):
    """A step failure that retrying cannot cure: the engine rolls the flow back at once."""

    status = 500
    title = "Permanent failure"


class FlowLost(Exception):
    """This server no longer owns the flow (another control server took it over)."""


class JournalUnavailable(Exception):
    """The journal could not be written within the retry budget."""


def is_temporary(exc: BaseException) -> bool:
    """Whether a step that raised ``exc`` is worth trying again."""
    if isinstance(exc, PermanentError):
        return False
    if isinstance(exc, TemporaryError | Unavailable | TimeoutError | asyncio.TimeoutError):
        return True
    if isinstance(exc, PeerError):
        # Unreachable (no status) or a gateway/availability answer: the peer may come back.
        # A 500 is the peer's own failure of the operation: permanent.
        return exc.peer_status is None or exc.peer_status in (502, 503, 504)
    if isinstance(exc, PoolTimeout):
        return True
    if isinstance(exc, DBAPIError) and not isinstance(exc, IntegrityError):
        # A lost connection, a lock timeout, SQLite's "database is locked".
        return bool(exc.connection_invalidated) or exc.__class__.__name__ == "OperationalError"
    return False


def is_busy_violation(exc: IntegrityError) -> bool:
    """Whether ``exc`` is the "one unfinished flow per resource" index refusing a flow."""
    text = str(exc.orig if exc.orig is not None else exc)
    return UNFINISHED_FLOW_INDEX in text or "flows.resource_uuid" in text


@dataclass(frozen=True)
class RetryPolicy:
    """How long and how often the engine retries (seconds)."""

    first_delay: float = 0.5
    max_delay: float = 10.0
    step_deadline: float = 60.0  # for steps that do not set their own
    journal_deadline: float = 30.0  # a journal write or the flow's end
    hook_deadline: float = 30.0  # on_success / on_failure hooks

    def delays(self, deadline: float) -> Iterable[float]:
        """The sleeps between attempts, doubling, until ``deadline`` seconds have passed."""
        spent, delay = 0.0, self.first_delay
        while spent + delay <= deadline:
            yield delay
            spent += delay
            delay = min(delay * 2, self.max_delay)


@dataclass
class FlowContext:
    """What a step sees: the flow's identity, its persisted data and the control services."""

    flow_uuid: str
    kind: str
    resource_uuid: str
    data: dict[str, Any]
    services: Any
    error: str | None = None
    # Statements a success hook leaves to the flow's end: run in the transaction that
    # records the flow succeeded, so the resource's new state and the task's end are one
    # commit (and cost no transaction of their own).
    at_end: list[Executable] = field(default_factory=list)


class Step:
    """One named step of a flow; subclasses implement run and, where needed, rollback.

    ``run`` and ``rollback`` may be called more than once (after a temporary error, or by
    another control server after a crash): both must be idempotent. Raise
    :class:`TemporaryError` for a failure worth retrying and :class:`PermanentError` (or
    any other error) for one that is not."""

    name: str = "step"
    # How long temporary errors of this step are retried; None: the engine's default.
    retry_deadline: float | None = None

    async def run(self, ctx: FlowContext) -> None:
        raise NotImplementedError

    async def rollback(self, ctx: FlowContext) -> None:
        """Undo :meth:`run`; must be idempotent and tolerate a partial run."""

    def needed(self, ctx: FlowContext) -> bool:
        """Whether this run of the flow has anything for the step to do, judged from
        ``ctx.data`` alone (no I/O) just before it would start. A step that is not
        needed neither runs nor rolls back, and costs no journal write of its own: it is
        recorded ``skipped`` with the next one. The first step always runs."""
        return True


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
    if isinstance(exc, DBAPIError) and exc.orig is not None:
        exc = exc.orig  # the driver's message, without SQLAlchemy's statement dump
    text = str(exc) or exc.__class__.__name__
    return text.splitlines()[0][:500]


class FlowEngine:
    """Runs flows through the per-resource queues and keeps their journal."""

    def __init__(self, db: Database, queues: KeyedQueues, services: Any, owner: str,
                 retry: RetryPolicy | None = None) -> None:
        self.db = db
        self.queues = queues
        self.services = services
        self.owner = owner
        # This process's life: a key or flow held by another boot id of this same
        # component belongs to a previous life that crashed.
        self.boot_id = str(uuid.uuid4())
        self.retry = retry or RetryPolicy()
        self.journal = JournalWriter(db)
        self.journal.on_batch = lambda writes, _seconds: metrics.JOURNAL_BATCH_SIZE.observe(
            writes)
        self.definitions: dict[str, FlowDefinition] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._done: dict[str, asyncio.Event] = {}
        self._active: set[str] = set()  # flows a task of this process runs or waits to run
        self._background: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        # Test hook: "kind:step" pauses a flow after that step ran but before its
        # journal says done, so a test can kill the server at the worst moment.
        self.pause_after = os.environ.get("YUN_TEST_PAUSE_AFTER_STEP", "")

    def register(self, definition: FlowDefinition) -> None:
        self.definitions[definition.kind] = definition

    def new_flow(
        self, session: AsyncSession, kind: str, resource_uuid: str, data: dict[str, Any],
        project_uuid: str | None = None, flow_uuid: str | None = None,
    ) -> FlowRow:
        """Add a pending flow in the caller's transaction; start it with :meth:`launch` after.

        ``project_uuid`` makes the task visible to that project's users. The database
        refuses a second unfinished flow of one resource (at flush or commit, as an
        :class:`IntegrityError`): prefer :meth:`add_flow`, which answers that as a 409."""
        definition = self.definitions[kind]
        row = FlowRow(
            uuid=flow_uuid or str(uuid.uuid4()), kind=kind, resource_type=definition.resource_type,
            resource_uuid=resource_uuid, project_uuid=project_uuid, state="pending",
            context=data, owner=self.owner, steps=[],
        )
        session.add(row)
        return row

    async def add_flow(
        self, session: AsyncSession, kind: str, resource_uuid: str, data: dict[str, Any],
        project_uuid: str | None = None, *, what: str | None = None,
        flow_uuid: str | None = None,
    ) -> FlowRow:
        """:meth:`new_flow` and flush: raise :class:`Conflict` naming ``what`` (the
        resource) when another unfinished flow of the resource won the race. The caller's
        transaction is then unusable: let the Conflict end it."""
        row = self.new_flow(session, kind, resource_uuid, data, project_uuid, flow_uuid)
        try:
            await session.flush()
        except IntegrityError as exc:
            if not is_busy_violation(exc):
                raise
            raise Conflict(f"{what or resource_uuid} is busy with another task started at "
                           "the same time; retry when it has finished") from None
        return row

    def launch(self, flow_uuid: str, resource_uuid: str) -> None:
        """Run a committed pending flow in the background, in its resource's queue."""
        self._done.setdefault(flow_uuid, asyncio.Event())
        self._active.add(flow_uuid)
        task = asyncio.create_task(self._execute(flow_uuid, resource_uuid),
                                   name=f"flow-{flow_uuid}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def wait(self, flow_uuid: str, timeout: float) -> None:
        """Return when the flow has ended (or ``timeout`` passed)."""
        event = self._done.get(flow_uuid)
        if event is None:
            return
        await wait_set(event, timeout)

    async def shutdown(self) -> None:
        if self._background is not None:
            self._background.cancel()
            await asyncio.gather(self._background, return_exceptions=True)
            self._background = None
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.journal.close()

    # -- ownership: recovery and takeover ------------------------------------------------

    async def recover(self, live_peers: set[str] | frozenset[str] = frozenset(),
                      grace: float = 0.0) -> int:
        """Finish the journal of flows left unfinished by a previous life of this server,
        or by a control server that is no longer alive (``live_peers`` are the other
        control servers alive now: their flows are theirs). Each flow is claimed by a
        conditional UPDATE, so two control servers never take the same one; flows of
        others are taken only when their owner's heartbeat is older than ``grace``
        seconds. Returns how many flows this server took."""
        return await self._claim(live_peers, grace, own=True)

    async def take_over(self, live_peers: set[str] | frozenset[str], grace: float) -> int:
        """The periodic form of :meth:`recover`: flows of departed control servers, and
        flows of this server that no task here runs (e.g. abandoned while the database
        was unreachable), once their heartbeat is older than ``grace`` seconds."""
        return await self._claim(live_peers, grace, own=False)

    async def _claim(self, live_peers: set[str] | frozenset[str], grace: float,
                     own: bool) -> int:
        now = utcnow()
        cutoff = now - timedelta(seconds=grace)
        alive = set(live_peers) - {self.owner}
        async with self.db.session() as session:
            query = select(FlowRow.uuid, FlowRow.resource_uuid, FlowRow.owner,
                           FlowRow.state, FlowRow.updated_at).where(
                FlowRow.state.in_(UNFINISHED))
            if alive:
                query = query.where(FlowRow.owner.is_(None) | FlowRow.owner.not_in(alive))
            candidates = (await session.execute(query)).all()
        taken = 0
        for flow_uuid, resource_uuid, owner, state, updated_at in candidates:
            if flow_uuid in self._active:
                continue  # running here
            mine = owner == self.owner
            if not (mine and own) and updated_at is not None and updated_at > cutoff:
                continue  # its owner may be alive and slow to show up; not yet
            async with self.db.session() as session:
                claim = update(FlowRow).where(
                    FlowRow.uuid == flow_uuid, FlowRow.state.in_(UNFINISHED),
                    FlowRow.owner.is_(None) if owner is None else FlowRow.owner == owner)
                if not (mine and own):
                    claim = claim.where(or_(FlowRow.updated_at.is_(None),
                                            FlowRow.updated_at <= cutoff))
                result = await session.execute(
                    claim.values(owner=self.owner, updated_at=now)
                    .execution_options(synchronize_session=False))
                if result.rowcount != 1:  # type: ignore[attr-defined]
                    continue  # another control server claimed it first, or it ended
            log.warning("taking over an unfinished flow", extra={
                "flow": flow_uuid, "resource": resource_uuid, "state": state,
                "previous_owner": owner, "owner": self.owner})
            self.launch(flow_uuid, resource_uuid)
            taken += 1
        return taken

    async def heartbeat(self) -> None:
        """Show the flows this server runs are alive (their ``updated_at`` moves on)."""
        active = list(self._active)
        if not active:
            return
        async with self.db.session() as session:
            for start in range(0, len(active), 500):
                await session.execute(
                    update(FlowRow).where(FlowRow.uuid.in_(active[start:start + 500]),
                                          FlowRow.owner == self.owner,
                                          FlowRow.state.in_(UNFINISHED))
                    .values(updated_at=utcnow()).execution_options(synchronize_session=False))

    def start_background(self, live_peers: Callable[[], set[str]], interval: float,
                         grace: float) -> None:
        """Run :meth:`heartbeat` and :meth:`take_over` every ``interval`` seconds (sooner
        after :meth:`wake`) with the control servers ``live_peers()`` names."""
        async def loop() -> None:
            while True:
                await wait_set(self._wake, interval)
                self._wake.clear()
                try:
                    await self.heartbeat()
                    await self.take_over(live_peers(), grace)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    log.warning("flow takeover round failed; next round retries",
                                extra={"owner": self.owner, "error": describe(exc)})

        self._background = asyncio.create_task(loop(), name="flow-takeover")

    def wake(self) -> None:
        """Run the next takeover round now (e.g. a control server left)."""
        self._wake.set()

    # -- execution ------------------------------------------------------------------------

    async def _execute(self, flow_uuid: str, resource_uuid: str) -> None:
        try:
            async with self.queues.hold(resource_uuid):
                await self._execute_held(flow_uuid)
        except asyncio.CancelledError:
            raise
        except FlowLost:
            log.warning("flow taken over by another control server; stopping here",
                        extra={"flow": flow_uuid, "resource": resource_uuid,
                               "owner": self.owner})
        except JournalUnavailable as exc:
            # Nothing can be recorded: the takeover job rolls the flow back once the
            # database answers again (it is ours and no task runs it any more).
            log.error("flow abandoned: its journal cannot be written", extra={
                "flow": flow_uuid, "resource": resource_uuid, "error": str(exc)})
        except Exception:
            log.exception("flow engine error", extra={"flow": flow_uuid,
                                                       "resource": resource_uuid})
        finally:
            self._active.discard(flow_uuid)
            event = self._done.pop(flow_uuid, None)
            if event is not None:
                event.set()

    async def _execute_held(self, flow_uuid: str) -> None:
        def load(record: FlowRecord, mark_first: bool = True
                 ) -> tuple[FlowDefinition, FlowContext, bool, list[int], str | None]:
            row = record.row
            if row is None or row.state not in UNFINISHED:
                raise _Ended
            if row.owner not in (None, self.owner):
                raise FlowLost(flow_uuid)
            definition = self.definitions[row.kind]
            ctx = FlowContext(flow_uuid, row.kind, row.resource_uuid,
                              dict(row.context or {}), self.services)
            interrupted = row.state != "pending"
            # Skipped steps did nothing: a rollback passes them over too.
            started = sorted(seq for seq, step in record.steps.items()
                             if step.state != SKIPPED)
            current = row.current_step
            row.state = "running"
            row.owner = self.owner
            if not interrupted and mark_first:
                # The first step starts in the transaction that takes the flow.
                _mark_step(record, 0, definition.steps[0].name, "running", started=True)
            return definition, ctx, interrupted, started, current

        first_marked = True
        try:
            try:
                definition, ctx, interrupted, started, interrupted_step = \
                    await self._write(flow_uuid, load, "load the flow")
            except JournalUnavailable:
                # The steps' journal may be what cannot be written: take the flow without
                # its first step, whose own journal write then fails into a rollback.
                first_marked = False
                definition, ctx, interrupted, started, interrupted_step = \
                    await self._write(flow_uuid, lambda r: load(r, False), "load the flow")
        except _Ended:
            return

        with metrics.timed_flow(ctx.kind) as timing:
            timing["outcome"] = await self._run_flow(
                flow_uuid, definition, ctx, interrupted, started, interrupted_step,
                first_marked)

    async def _run_flow(self, flow_uuid: str, definition: FlowDefinition, ctx: FlowContext,
                        interrupted: bool, started: list[int], interrupted_step: str | None,
                        first_marked: bool) -> str:
        """Run (or, when ``interrupted``, roll back) a loaded flow; its outcome."""
        if interrupted:
            where = (f"during step '{interrupted_step}'" if interrupted_step
                     else "before its first step")
            ctx.error = f"interrupted {where} by a control server restart; rolled back"
            await self._rollback(ctx, definition, started)
            return "rolled_back"

        # The step that ran last (done, not yet recorded so) and the steps skipped since:
        # both go with the next journal write.
        previous: tuple[int, str] | None = None
        skipped: list[tuple[int, str]] = []
        for seq, step in enumerate(definition.steps):
            if seq > 0 and not step.needed(ctx):
                skipped.append((seq, step.name))
                continue
            if seq > 0 or not first_marked:
                # One write records the previous step done (with the context), the
                # skipped ones, and this one running: fewer journal writes, the same
                # guarantees.
                try:
                    await self._journal_step(flow_uuid, seq, step.name, "running",
                                             started=True, done=previous, skipped=skipped,
                                             data=ctx.data if seq else None)
                except JournalUnavailable as exc:
                    ctx.error = f"{step.name}: the journal could not be written ({exc})"
                    await self._rollback(ctx, definition, started)
                    return "rolled_back"
                skipped = []
            started.append(seq)
            previous = (seq, step.name)
            began = time.perf_counter()
            try:
                await self._run_step(ctx, step)
            except asyncio.CancelledError:
                raise
            except FlowLost:
                raise
            except Exception as exc:
                metrics.FLOW_STEP_SECONDS.labels(ctx.kind, step.name, "failed").observe(
                    time.perf_counter() - began)
                ctx.error = f"{step.name}: {describe(exc)}"
                log.warning("flow step failed; rolling back", extra={
                    "flow": flow_uuid, "kind": ctx.kind, "resource": ctx.resource_uuid,
                    "step": step.name, "error": ctx.error})
                await self._journal_quietly(flow_uuid, seq, step.name, "failed",
                                            error=ctx.error)
                await self._rollback(ctx, definition, started)
                return "rolled_back"
            metrics.FLOW_STEP_SECONDS.labels(ctx.kind, step.name, "succeeded").observe(
                time.perf_counter() - began)
            if self.pause_after == f"{ctx.kind}:{step.name}":
                log.warning("test hook: flow paused", extra={"flow": flow_uuid,
                                                             "step": step.name})
                await asyncio.Event().wait()

        try:
            if definition.on_success is not None:
                await self._hook(definition.on_success, ctx, "on_success")
            # The last step's end and the flow's end in one write. A crash before it
            # leaves the flow running in its last step: recovery rolls it back (and the
            # failure hook undoes the success hook), as it would a crash before the
            # success hook.
            await self._finish(flow_uuid, "succeeded", None, last=previous, skipped=skipped,
                               data=ctx.data, statements=ctx.at_end)
        except JournalUnavailable as exc:
            ctx.error = f"the journal could not be written ({exc})"
            await self._rollback(ctx, definition, started)
            return "rolled_back"
        except _HookFailed as exc:
            ctx.error = f"completing the {ctx.kind} failed: {exc}"
            log.error("success hook failed; rolling back", extra={
                "flow": flow_uuid, "kind": ctx.kind, "resource": ctx.resource_uuid,
                "error": ctx.error})
            await self._rollback(ctx, definition, started)
            return "rolled_back"
        log.info("flow succeeded", extra={"flow": flow_uuid, "kind": ctx.kind,
                                          "resource": ctx.resource_uuid})
        return "succeeded"

    async def _run_step(self, ctx: FlowContext, step: Step) -> None:
        """Run ``step``, retrying temporary errors with backoff until its deadline."""
        deadline = step.retry_deadline if step.retry_deadline is not None \
            else self.retry.step_deadline
        delays = iter(self.retry.delays(deadline))
        attempt = 1
        while True:
            try:
                await step.run(ctx)
                return
            except Exception as exc:
                if not is_temporary(exc):
                    raise
                delay = next(delays, None)
                if delay is None:
                    raise
                log.warning("flow step failed temporarily; retrying", extra={
                    "flow": ctx.flow_uuid, "kind": ctx.kind, "resource": ctx.resource_uuid,
                    "step": step.name, "attempt": attempt, "retry_in": delay,
                    "error": describe(exc)})
            await asyncio.sleep(delay)
            await self._check_owner(ctx.flow_uuid)
            attempt += 1

    async def _rollback_step(self, ctx: FlowContext, step: Step) -> None:
        deadline = step.retry_deadline if step.retry_deadline is not None \
            else self.retry.step_deadline
        delays = iter(self.retry.delays(deadline))
        while True:
            try:
                await step.rollback(ctx)
                return
            except Exception as exc:
                delay = next(delays, None) if is_temporary(exc) else None
                if delay is None:
                    raise
                log.warning("rollback of step failed temporarily; retrying", extra={
                    "flow": ctx.flow_uuid, "step": step.name, "resource": ctx.resource_uuid,
                    "retry_in": delay, "error": describe(exc)})
            await asyncio.sleep(delay)

    async def _hook(self, hook: Hook, ctx: FlowContext, name: str) -> None:
        """Run a hook, retrying any failure with backoff; :class:`_HookFailed` at the end."""
        delays = iter(self.retry.delays(self.retry.hook_deadline))
        while True:
            try:
                await hook(ctx)
                return
            except Exception as exc:
                delay = next(delays, None)
                if delay is None:
                    raise _HookFailed(describe(exc)) from exc
                log.warning("flow hook failed; retrying", extra={
                    "flow": ctx.flow_uuid, "kind": ctx.kind, "resource": ctx.resource_uuid,
                    "hook": name, "retry_in": delay, "error": describe(exc)})
            await asyncio.sleep(delay)

    async def _rollback(self, ctx: FlowContext, definition: FlowDefinition,
                        started: list[int]) -> None:
        def mark(record: FlowRecord) -> None:
            row = _owned(record, ctx.flow_uuid, self.owner)
            row.state = "rolling_back"
            row.error = ctx.error

        await self._write(ctx.flow_uuid, mark, "mark the flow rolling back")
        for seq in sorted(set(started), reverse=True):
            step = definition.steps[seq]
            await self._journal_step(ctx.flow_uuid, seq, step.name, "rolling_back")
            try:
                await self._rollback_step(ctx, step)
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
                await self._hook(definition.on_failure, ctx, "on_failure")
            except _HookFailed as exc:
                log.error("flow failure hook failed", extra={
                    "flow": ctx.flow_uuid, "resource": ctx.resource_uuid, "error": str(exc)})
        await self._finish(ctx.flow_uuid, "failed", ctx.error)
        log.warning("flow failed and was rolled back", extra={
            "flow": ctx.flow_uuid, "kind": ctx.kind, "resource": ctx.resource_uuid,
            "error": ctx.error})

    # -- the journal ----------------------------------------------------------------------

    async def _with_retry(self, write: Callable[[], Awaitable[T]], what: str,
                          flow_uuid: str) -> T:
        """Run a database write, retrying failures with backoff; JournalUnavailable after
        the journal deadline. FlowLost and _Ended pass through at once."""
        delays = iter(self.retry.delays(self.retry.journal_deadline))
        while True:
            try:
                return await write()
            except (FlowLost, _Ended, asyncio.CancelledError):
                raise
            except Exception as exc:
                delay = next(delays, None)
                if delay is None:
                    raise JournalUnavailable(f"{what}: {describe(exc)}") from exc
                log.warning("journal write failed; retrying", extra={
                    "flow": flow_uuid, "write": what, "retry_in": delay,
                    "error": describe(exc)})
            await asyncio.sleep(delay)

    async def _write(self, flow_uuid: str, apply: Callable[[FlowRecord], T], what: str) -> T:
        """A journal write through the group commit, retried like any journal write."""
        async def write() -> T:
            return await self.journal.write(flow_uuid, apply)  # type: ignore[no-any-return]

        return await self._with_retry(write, what, flow_uuid)

    async def _check_owner(self, flow_uuid: str) -> None:
        async def check() -> None:
            async with self.db.session() as session:
                owner = (await session.execute(select(FlowRow.owner).where(
                    FlowRow.uuid == flow_uuid))).scalar_one_or_none()
                if owner not in (None, self.owner):
                    raise FlowLost(flow_uuid)

        await self._with_retry(check, "check the owner", flow_uuid)

    async def _journal_step(
        self, flow_uuid: str, seq: int, name: str, state: str, *, started: bool = False,
        error: str | None = None, data: dict[str, Any] | None = None,
        done: tuple[int, str] | None = None, skipped: Sequence[tuple[int, str]] = (),
    ) -> None:
        """Record step ``seq`` in ``state``; with it, step ``done`` finished and the
        ``skipped`` steps passed over."""
        def write(record: FlowRecord) -> None:
            row = _owned(record, flow_uuid, self.owner)
            now = utcnow()
            if done is not None:
                _mark_step(record, *done, "done", now=now)
            _mark_skipped(record, skipped, now)
            _mark_step(record, seq, name, state, started=started, error=error, now=now)
            if data is not None:
                row.context = dict(data)

        await self._write(flow_uuid, write, f"journal step {name} {state}")

    async def _journal_quietly(self, flow_uuid: str, seq: int, name: str, state: str,
                               error: str | None = None) -> None:
        """A journal write whose loss changes nothing (the rollback that follows records
        the step's fate again)."""
        try:
            await self._journal_step(flow_uuid, seq, name, state, error=error)
        except JournalUnavailable as exc:
            log.warning("journal write lost", extra={"flow": flow_uuid, "step": name,
                                                     "error": str(exc)})

    async def _finish(self, flow_uuid: str, state: str, error: str | None, *,
                      last: tuple[int, str] | None = None,
                      skipped: Sequence[tuple[int, str]] = (),
                      data: dict[str, Any] | None = None,
                      statements: list[Executable] | None = None) -> None:
        """End the flow in ``state``; with ``last``, record that step done too, and the
        ``skipped`` steps passed over; run ``statements`` in the same transaction."""
        statements = list(statements or [])

        def write(record: FlowRecord) -> None:
            row = _owned(record, flow_uuid, self.owner)
            now = utcnow()
            if last is not None:
                _mark_step(record, last[0], last[1], "done", now=now)
            _mark_skipped(record, skipped, now)
            if data is not None:
                row.context = dict(data)
            row.state = state
            row.error = error
            row.finished_at = now
            record.statements.extend(statements)

        await self._write(flow_uuid, write, f"end the flow {state}")


def _owned(record: FlowRecord, flow_uuid: str, owner: str) -> FlowRow:
    """The flow's row, when this server still owns it (FlowLost otherwise)."""
    row = record.row
    assert row is not None, f"flow {flow_uuid} vanished"
    if row.owner not in (None, owner):
        raise FlowLost(flow_uuid)  # taken over: the new owner writes from now
    return row


def _mark_step(record: FlowRecord, seq: int, name: str, state: str, *,
               started: bool = False, error: str | None = None,
               now: datetime | None = None) -> None:
    """Record step ``seq`` of the flow in ``state`` (its start or end time with it)."""
    now = now or utcnow()
    row = record.row
    assert row is not None
    step = record.step(seq, name, state)
    step.state = state
    if started:
        step.started_at = now
        row.current_step = name
    elif state in ("done", "failed", "rolled_back", "rollback_failed"):
        step.finished_at = now
    if error is not None:
        step.error = error
    row.updated_at = now


def _mark_skipped(record: FlowRecord, skipped: Sequence[tuple[int, str]],
                  now: datetime) -> None:
    """Record steps passed over as not needed (:meth:`Step.needed`)."""
    for seq, name in skipped:
        step = record.step(seq, name, SKIPPED)
        step.state, step.finished_at = SKIPPED, now


class _Ended(Exception):
    """The flow has already ended (another task of this process finished it)."""


class _HookFailed(Exception):
    """A hook kept failing through its retries."""
