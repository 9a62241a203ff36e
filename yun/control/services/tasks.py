"""Tasks: the API's view of flows."""

from __future__ import annotations

from sqlalchemy.ext.asyncio import AsyncSession

from yun.control.access.policy import Scope
from yun.control.access.visibility import visible
from yun.control.db.models import FlowRow
from yun.control.db.prepared import row_by_uuid
from yun.proto.errors import NotFound
from yun.proto.resources import Task, TaskState, TaskStep
from yun.util.ids import canonical_uuid


def task_model(row: FlowRow) -> Task:
    return Task(
        uuid=row.uuid, kind=row.kind, resource_type=row.resource_type,
        resource_uuid=row.resource_uuid, project_uuid=row.project_uuid,
        state=TaskState(row.state), current_step=row.current_step, error=row.error,
        created_at=row.created_at, updated_at=row.updated_at, finished_at=row.finished_at,
        steps=[TaskStep(name=s.name, state=s.state, started_at=s.started_at,
                        finished_at=s.finished_at, error=s.error) for s in row.steps],
    )


async def get_task(session: AsyncSession, task_uuid: str, scope: Scope) -> FlowRow:
    key = canonical_uuid(task_uuid)
    row = None
    if key is not None:
        statement = row_by_uuid(FlowRow)
        if not scope.everything:
            statement = statement.where(visible(FlowRow, scope))
        row = (await session.scalars(statement, {"uuid": key})).first()
    if row is None:
        raise NotFound(f"no task {task_uuid}")
    return row
