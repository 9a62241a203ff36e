"""Group commit: writes of concurrent requests and flows share one transaction.

At a few hundred operations in flight, one transaction per small write was most of the
control server's work (and on PostgreSQL each commit paid its own flush). A
:class:`GroupCommit` queues writes and applies everything queued in one transaction:
while a batch commits, the next writes gather into the next batch, so an idle server
commits a lone write at once and a busy one commits many per transaction. A write's
caller waits for the commit, so a write that returned is in the database, as before.

A write whose ``apply`` raises fails alone (its exception goes to its caller; it must
check before it changes anything); the others of the batch commit. A failed commit
fails every write of the batch, and each caller handles that as it handled a failed
transaction before.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from sqlalchemy.ext.asyncio import AsyncSession

from yun.control.db.session import Database

T = TypeVar("T")
K = TypeVar("K")

# Enough for every operation in flight at the API's usual concurrency in one commit,
# small enough that a batch's statements stay short.
MAX_BATCH = 256


@dataclass
class BatchStats:
    """What a writer did since the process started (read by metrics and benchmarks)."""

    batches: int = 0
    writes: int = 0
    largest_batch: int = 0
    seconds: float = 0.0


@dataclass
class _Pending(Generic[K]):
    key: K
    apply: Callable[[Any], Any]
    future: asyncio.Future[Any]


class GroupCommit(Generic[K]):
    """Applies queued writes in shared transactions.

    A write is ``apply(target)``: by default the target is the batch's session;
    subclasses give writes a richer target by overriding :meth:`prepare` and
    :meth:`target` (e.g. rows read for the whole batch in one statement)."""

    def __init__(self, db: Database, name: str) -> None:
        self.db = db
        self.name = name
        self._queue: list[_Pending[K]] = []
        self._worker: asyncio.Task[None] | None = None
        self.stats = BatchStats()
        # Called with (writes in the batch, seconds the transaction took) after each
        # commit: the metrics hook in here.
        self.on_batch: Callable[[int, float], None] | None = None

    async def write(self, key: K, apply: Callable[[Any], T]) -> T:
        """Apply ``apply`` in the next batch; its result once the batch has committed
        (or what ``apply`` or the commit raised)."""
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._queue.append(_Pending(key, apply, future))
        if self._worker is None or self._worker.done():
            self._worker = asyncio.create_task(self._drain(), name=f"group-commit-{self.name}")
        return await future  # type: ignore[no-any-return]

    async def close(self) -> None:
        """Stop the worker; writes still queued are cancelled."""
        if self._worker is not None:
            self._worker.cancel()
            await asyncio.gather(self._worker, return_exceptions=True)
        for pending in self._queue:
            if not pending.future.done():
                pending.future.cancel()
        self._queue.clear()

    async def prepare(self, session: AsyncSession, keys: list[K]) -> Any:
        """Read what the batch's writes need (default: nothing)."""
        return None

    def target(self, session: AsyncSession, prepared: Any, key: K) -> Any:
        """What one write's ``apply`` is given (default: the session)."""
        return session

    async def applied(self, session: AsyncSession, target: Any) -> None:
        """After one write's ``apply`` (e.g. add what it made to the session)."""

    async def _drain(self) -> None:
        while self._queue:
            batch, self._queue = self._queue[:MAX_BATCH], self._queue[MAX_BATCH:]
            batch = [p for p in batch if not p.future.done()]  # a caller gave up
            if batch:
                await self._commit(batch)

    async def _commit(self, batch: list[_Pending[K]]) -> None:
        began = time.perf_counter()
        results: list[tuple[_Pending[K], bool, Any]] = []
        try:
            async with self.db.session() as session:
                prepared = await self.prepare(session, [p.key for p in batch])
                for pending in batch:
                    target = self.target(session, prepared, pending.key)
                    try:
                        results.append((pending, True, pending.apply(target)))
                    except Exception as exc:  # this write alone fails
                        results.append((pending, False, exc))
                        continue
                    await self.applied(session, target)
        except BaseException as exc:
            for pending in batch:
                if pending.future.done():
                    continue
                if isinstance(exc, Exception):
                    pending.future.set_exception(exc)
                else:
                    pending.future.cancel()
            if not isinstance(exc, Exception):
                raise
            return
        seconds = time.perf_counter() - began
        stats = self.stats
        stats.batches += 1
        stats.writes += len(batch)
        stats.largest_batch = max(stats.largest_batch, len(batch))
        stats.seconds += seconds
        if self.on_batch is not None:
            self.on_batch(len(batch), seconds)
        for pending, ok, value in results:
            if pending.future.done():
                continue
            if ok:
                pending.future.set_result(value)
            else:
                pending.future.set_exception(value)
