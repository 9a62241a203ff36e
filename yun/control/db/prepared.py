"""Statements built once, and run without the ORM's per-statement work, for the hot reads.

Measured on the control server (SQLite, one VM's GET, issue 10): building a SELECT
afresh (its clauses, their coercions, its cache key) and running it through the ORM cost
about 0.25-0.29 ms of CPU per statement. The same statement built once, at import, with
bound parameters cost 0.14-0.17 ms (SQLAlchemy memoizes a statement object's cache key,
so a run goes straight to the compiled statement), and 0.10 ms run on the session's
connection instead of through the ORM when it selects columns, not entities. A VM's
GET runs five statements.

So the reads every API call or flow step makes (a row by its uuid, tags, placement
names, forwards) keep their statements here or next to their callers as module
constants with ``bindparam``s (``expanding=True`` for a list), and run column statements
with :func:`column_rows`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, TypeVarTuple

from sqlalchemy import Row, Select, bindparam, select
from sqlalchemy.ext.asyncio import AsyncSession

Ts = TypeVarTuple("Ts")


async def column_rows(session: AsyncSession, statement: Select[*Ts],
                      params: Mapping[str, Any] | None = None
                      ) -> Sequence[Row[*Ts]]:
    """The rows of ``statement``, a SELECT of columns, run on ``session``'s connection
    in its transaction.

    Changes pending in the session are flushed first, as the ORM's autoflush would, so
    the rows include them. Entities (``select(VmRow)``) must go through the session
    instead: on the connection they would come back as plain rows."""
    if session.new or session.dirty or session.deleted:
        await session.flush()
    connection = await session.connection()
    return (await connection.execute(statement, dict(params or {}))).all()


_BY_UUID: dict[type[Any], Select[Any]] = {}


def row_by_uuid(model: type[Any]) -> Select[Any]:
    """``SELECT model WHERE uuid = :uuid LIMIT 1``, built once per model."""
    statement = _BY_UUID.get(model)
    if statement is None:
        statement = _BY_UUID[model] = select(model).where(
            model.uuid == bindparam("uuid")).limit(1)
    return statement
