"""Small bounded in-memory stores of the gateway: a TTL cache and a set of seen values.

Both are bounded so that a flood of distinct tokens or signatures cannot grow the
gateway's memory without limit; both live in one event loop and need no locks.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Generic, TypeVar

V = TypeVar("V")


class TtlCache(Generic[V]):
    """A least-recently-used cache whose entries also expire after their own TTL."""

    def __init__(self, maxsize: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.maxsize = maxsize
        self._clock = clock
        self._data: OrderedDict[str, tuple[float, V]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._data)

    def get(self, key: str) -> V | None:
        """The value under ``key``, or None if there is none or it has expired."""
        entry = self._data.get(key)
        if entry is None:
            return None
        deadline, value = entry
        if deadline <= self._clock():
            del self._data[key]
            return None
        self._data.move_to_end(key)
        return value

    def put(self, key: str, value: V, ttl: float) -> None:
        """Keep ``value`` for ``ttl`` seconds (not at all if ``ttl`` <= 0)."""
        if ttl <= 0:
            self._data.pop(key, None)
            return
        self._data[key] = (self._clock() + ttl, value)
        self._data.move_to_end(key)
        while len(self._data) > self.maxsize:
            self._data.popitem(last=False)

    def discard_where(self, predicate: Callable[[V], bool]) -> int:
        """Forget every value ``predicate`` holds for; how many were forgotten."""
        doomed = [key for key, (_, value) in self._data.items() if predicate(value)]
        for key in doomed:
            del self._data[key]
        return len(doomed)

    def clear(self) -> None:
        self._data.clear()


class ExpiringSet:
    """Values remembered until a wall-clock deadline each: the signatures already used.

    When full, the oldest value is forgotten first; the bound is chosen far above what
    the rate limit lets clients send within one replay window.
    """

    def __init__(self, maxsize: int, clock: Callable[[], float] = time.time) -> None:
        self.maxsize = maxsize
        self._clock = clock
        self._data: OrderedDict[str, float] = OrderedDict()

    def __len__(self) -> int:
        return len(self._data)

    def add(self, value: str, until: float) -> bool:
        """Remember ``value`` until ``until`` (epoch seconds); False if it was already there."""
        now = self._clock()
        self._purge(now)
        deadline = self._data.get(value)
        if deadline is not None and deadline > now:
            return False
        self._data[value] = until
        while len(self._data) > self.maxsize:
            self._data.popitem(last=False)
        return True

    def _purge(self, now: float) -> None:
        # Values are added roughly in deadline order, so the expired ones sit at the front.
        while self._data:
            first, deadline = next(iter(self._data.items()))
            if deadline > now:
                break
            del self._data[first]
