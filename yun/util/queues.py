"""Per-resource work queues (Z-QUEUE): operations on one resource run one at a time, in order."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from yun.util.metrics import QUEUE_KEYS, QUEUE_WAITERS


class KeyedQueues:
    """A FIFO lock per resource key, forgotten when nobody waits on it.

    ``name`` labels its depth in the metrics (``yun_queue_keys``, ``yun_queue_waiters``);
    queues of one name in one process add up (the gauges are moved up and down, not set).
    """

    def __init__(self, name: str = "resources") -> None:
        self._locks: dict[str, asyncio.Lock] = {}
        self._users: dict[str, int] = {}
        self._keys_gauge = QUEUE_KEYS.labels(name)
        self._waiters_gauge = QUEUE_WAITERS.labels(name)

    @asynccontextmanager
    async def hold(self, key: str) -> AsyncIterator[None]:
        """Wait for the turn of ``key`` and keep it for the block."""
        lock = self._locks.get(key)
        if lock is None:
            lock = self._locks[key] = asyncio.Lock()
            self._keys_gauge.inc()
        users = self._users.get(key, 0)
        self._users[key] = users + 1
        # Someone holds or awaits the key already: this one queues behind them.
        waiting = users > 0
        if waiting:
            self._waiters_gauge.inc()
        try:
            async with lock:  # asyncio.Lock wakes waiters in arrival order
                if waiting:
                    waiting = False
                    self._waiters_gauge.dec()
                yield
        finally:
            if waiting:  # cancelled before its turn came
                self._waiters_gauge.dec()
            self._users[key] -= 1
            if self._users[key] == 0:
                del self._users[key]
                del self._locks[key]
                self._keys_gauge.dec()

    def busy(self, key: str) -> bool:
        return key in self._locks

    def keys(self) -> list[str]:
        """The keys held or waited for now."""
        return list(self._locks)
