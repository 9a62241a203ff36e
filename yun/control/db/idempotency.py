"""What the Idempotency-Key machinery shares between the API layer and the services.

The route class (``yun.control.api.routing``) sets :data:`current_key` to the scoped key
while a keyed request runs, so a service whose effect must survive a control server
crash (a VM create) can record the key with what it makes, in the same transaction,
and find it again when the request is carried out a second time.
"""

from __future__ import annotations

import hashlib
from contextvars import ContextVar
from datetime import datetime

from sqlalchemy import delete, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from yun.control.db.models import IdempotencyRow, VmRow, utcnow
from yun.control.db.session import Database

# The scoped Idempotency-Key (sha256 of user and key) of the request being handled.
current_key: ContextVar[str | None] = ContextVar("yun_idempotency_key", default=None)


def scoped_key(user_uuid: str, key: str) -> str:
    """The stored form of a client's key: keys are scoped per user."""
    return hashlib.sha256(f"{user_uuid}\0{key}".encode()).hexdigest()


async def forget_expired(session: AsyncSession, now: datetime,
                         key: str | None = None) -> int:
    """Delete keys past their retention (all, or just ``key``) and unbind them from the
    VMs they made, so an expired key used again is a new key; returns how many."""
    where = [IdempotencyRow.expires_at <= now]
    if key is not None:
        where.append(IdempotencyRow.key == key)
    expired = select(IdempotencyRow.key).where(*where).scalar_subquery()
    await session.execute(update(VmRow).where(VmRow.idempotency_key.in_(expired))
                          .values(idempotency_key=None)
                          .execution_options(synchronize_session=False))
    result = await session.execute(delete(IdempotencyRow).where(*where)
                                   .execution_options(synchronize_session=False))
    return int(result.rowcount or 0)  # type: ignore[attr-defined]


async def purge_expired(db: Database, now: datetime | None = None) -> int:
    """Forget the keys past their retention (the background job); returns how many."""
    async with db.session() as session:
        return await forget_expired(session, now or utcnow())
