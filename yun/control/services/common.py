"""Lookups shared by the resource services: every one takes the caller's scope."""

from __future__ import annotations

from typing import TypeVar

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from yun.control.access.policy import Scope
from yun.control.access.visibility import visible
from yun.control.db.prepared import row_by_uuid
from yun.proto.errors import Conflict, NotFound
from yun.util.ids import canonical_uuid

R = TypeVar("R")


def is_uuid(text: str) -> bool:
    return canonical_uuid(text) is not None


async def find(session: AsyncSession, model: type[R], ref: str, what: str,
               scope: Scope) -> R:
    """The row of ``model`` that ``scope`` sees whose uuid or (unambiguous) name is ``ref``.

    A row outside the scope is answered exactly like a missing one: 404."""
    where = visible(model, scope)
    key = canonical_uuid(ref)
    if key is not None:
        statement = row_by_uuid(model)
        if not scope.everything:  # the prepared statement serves the common case as it is
            statement = statement.where(where)
        row = (await session.scalars(statement, {"uuid": key})).first()
        if row is not None:
            return row  # type: ignore[no-any-return]
    if not hasattr(model, "name"):
        raise NotFound(f"no {what} '{ref}'")
    rows = (await session.scalars(select(model).where(
        model.name == ref, where).limit(2))).all()  # type: ignore[attr-defined]
    if not rows:
        raise NotFound(f"no {what} '{ref}'")
    if len(rows) > 1:
        raise Conflict(f"more than one {what} is named '{ref}'; use its uuid")
    return rows[0]
