"""Lookups and listing shared by the resource services."""

from __future__ import annotations

from typing import Any, TypeVar

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from yun.proto.errors import Conflict, NotFound
from yun.util.ids import canonical_uuid

R = TypeVar("R")


def is_uuid(text: str) -> bool:
    return canonical_uuid(text) is not None


async def find(session: AsyncSession, model: type[R], ref: str, what: str) -> R:
    """The row of ``model`` whose uuid or (unambiguous) name is ``ref``."""
    if is_uuid(ref):
        row = await session.get(model, ref)
        if row is not None:
            return row
    rows = (await session.scalars(
        select(model).where(model.name == ref).limit(2))).all()  # type: ignore[attr-defined]
    if not rows:
        raise NotFound(f"no {what} '{ref}'")
    if len(rows) > 1:
        raise Conflict(f"more than one {what} is named '{ref}'; use its uuid")
    return rows[0]


async def page(
    session: AsyncSession, model: Any, filters: dict[str, Any], tag: str | None,
    limit: int, offset: int,
) -> tuple[list[Any], int]:
    """Rows of ``model`` matching every filter (and carrying ``tag``), newest first."""
    query = select(model)
    for column, value in filters.items():
        if value is not None:
            query = query.where(getattr(model, column) == value)
    query = query.order_by(model.created_at.desc(), model.uuid)
    if tag:
        # Tags are a JSON list; filtering in Python keeps SQLite and PostgreSQL alike.
        rows = [r for r in (await session.scalars(query)).all() if tag in (r.tags or [])]
        return rows[offset:offset + limit], len(rows)
    total = await session.scalar(select(func.count()).select_from(query.subquery())) or 0
    rows = list((await session.scalars(query.limit(limit).offset(offset))).all())
    return rows, total
