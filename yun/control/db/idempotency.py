"""What the Idempotency-Key machinery shares between the API layer and the services.

The route class (``yun.control.api.routing``) sets :data:`current_key` to the scoped key
while a keyed request runs, so a service whose effect must survive a control server
crash (a VM create) can record the key with what it makes, in the same transaction,
and find it again when the request is carried out a second time.
"""

from __future__ import annotations

from contextvars import ContextVar
from datetime import datetime

from sqlalchemy import delete

from yun.control.db.models import IdempotencyRow, utcnow
from yun.control.db.session import Database

# The scoped Idempotency-Key (sha256 of user and key) of the request being handled.
current_key: ContextVar[str | None] = ContextVar("yun_idempotency_key", default=None)


async def purge_expired(db: Database, now: datetime | None = None) -> int:
    """Forget the keys past their retention; returns how many were deleted."""
    async with db.session() as session:
        result = await session.execute(
            delete(IdempotencyRow).where(IdempotencyRow.expires_at < (now or utcnow()))
            .execution_options(synchronize_session=False))
        return int(result.rowcount or 0)  # type: ignore[attr-defined]
