"""Waiting, bounded, for a condition in a test: the one polling helper of the suites."""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Callable
from typing import Any


async def eventually(check: Callable[[], Any], *, timeout: float = 30.0,
                     what: str = "the condition", interval: float = 0.1) -> Any:
    """Call ``check`` (a function, or one returning an awaitable) until it returns a
    truthy value, and return that value; fail the test naming ``what`` after
    ``timeout`` seconds. A check that runs commands goes in a thread:
    ``lambda: asyncio.to_thread(check)``."""
    deadline = time.monotonic() + timeout
    while True:  # bounded by the deadline
        value = check()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} never held within {timeout} s")
        await asyncio.sleep(interval)
