"""The generation of the routers' rule set: the largest id of ``network_changes``.

Every transaction that changes what a router applies (a public address or port mapped
to a VM or unmapped, a node's subnet or address) records a change in the same
transaction. Routers compare generations to know whether they are behind.
"""

from __future__ import annotations

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from yun.control.db.models import NetworkChangeRow


def note_change(session: AsyncSession, subject: str) -> None:
    """Record that the routers' rules change with this transaction (about ``subject``)."""
    session.add(NetworkChangeRow(subject=subject[:64]))


async def generation(session: AsyncSession) -> int:
    """The current generation (0 before any change)."""
    value = await session.scalar(select(func.max(NetworkChangeRow.id)))
    return int(value or 0)
