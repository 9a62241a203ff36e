"""Group commit of the flow journal: the journal writes of concurrent flows share a transaction.

Every flow writes its journal several times (the flow taken, each step started and
done, the flow's end). The :class:`JournalWriter` applies the writes queued by all
flows in one transaction (:class:`~yun.control.db.batch.GroupCommit`): the flows' rows
and their steps are read in two statements (locked on PostgreSQL, so a takeover's
conditional UPDATE waits for the batch and the batch sees the owner a takeover left),
and each write is applied to its flow's :class:`FlowRecord`. A write that finds its flow
taken over or ended fails alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from sqlalchemy import Executable, select
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import lazyload

from yun.control.db.batch import GroupCommit
from yun.control.db.models import FlowRow, FlowStepRow
from yun.control.db.session import Database


@dataclass
class FlowRecord:
    """One flow's row (None when the flow is gone) and its steps by sequence number, as
    a journal write sees them inside the batch's transaction."""

    row: FlowRow | None
    steps: dict[int, FlowStepRow]
    added: list[FlowStepRow] = field(default_factory=list)
    # Statements of the flow's own (e.g. its resource's new state) to run in the batch.
    statements: list[Executable] = field(default_factory=list)

    def step(self, seq: int, name: str, state: str) -> FlowStepRow:
        """The flow's step ``seq``, made (as ``name`` in ``state``) when it has no row yet."""
        step = self.steps.get(seq)
        if step is None:
            assert self.row is not None
            step = FlowStepRow(flow_uuid=self.row.uuid, seq=seq, name=name, state=state)
            self.steps[seq] = step
            self.added.append(step)
        return step


_Prepared = tuple[dict[str, FlowRow], dict[str, dict[int, FlowStepRow]]]


class JournalWriter(GroupCommit[str]):
    """The flow journal's group commit; a write is ``apply(record: FlowRecord)``."""

    def __init__(self, db: Database) -> None:
        super().__init__(db, "journal")

    async def prepare(self, session: AsyncSession, keys: list[str]) -> _Prepared:
        uuids = sorted(set(keys))
        query = select(FlowRow).where(FlowRow.uuid.in_(uuids)).options(lazyload(FlowRow.steps))
        if not self.db.url.startswith("sqlite"):
            query = query.with_for_update()
        rows = {r.uuid: r for r in (await session.scalars(query)).all()}
        steps: dict[str, dict[int, FlowStepRow]] = {u: {} for u in uuids}
        for step in (await session.scalars(select(FlowStepRow).where(
                FlowStepRow.flow_uuid.in_(uuids)))).all():
            steps[step.flow_uuid][step.seq] = step
        return rows, steps

    def target(self, session: AsyncSession, prepared: _Prepared, key: str) -> FlowRecord:
        rows, steps = prepared
        return FlowRecord(rows.get(key), steps[key])

    async def applied(self, session: AsyncSession, target: FlowRecord) -> None:
        session.add_all(target.added)
        target.added.clear()
        for statement in target.statements:
            await session.execute(statement)
        target.statements.clear()
