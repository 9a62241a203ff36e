"""Running a service until SIGTERM/SIGINT, then stopping it in order."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Awaitable, Callable, Iterator
from types import FrameType
from typing import Any, TypeVar

import uvloop

from yun.util.heap import settle_started_heap
from yun.util.metrics import watch_collector

T = TypeVar("T")


async def run_until_signalled(
    start: Callable[[], Awaitable[None]], stop: Callable[[], Awaitable[None]]
) -> None:
    """Start a service, wait for SIGTERM or SIGINT, stop it."""
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stopping.set)
    await start()
    watch_collector()
    settle_started_heap()
    try:
        await stopping.wait()
    finally:
        await stop()


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Turn SIGTERM into KeyboardInterrupt within the block, so that every ``finally``
    of a synchronous program (a benchmark, a test harness) still cleans up."""

    def handler(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


async def wait_set(event: asyncio.Event, timeout: float) -> bool:
    """Wait until ``event`` is set (True) or ``timeout`` seconds pass (False).

    The services' loops wait like this between rounds; ``asyncio.wait_for`` must not be
    used for it: on Python 3.11 a cancellation that arrives as the event is set is
    swallowed (the waiting task returns instead of raising), so the loop goes round
    again and the service's stop, awaiting that task, never returns."""
    try:
        async with asyncio.timeout(timeout):
            await event.wait()
    except TimeoutError:
        return False
    return True


def run_service(main: Awaitable[T]) -> T:
    """Run a component's main coroutine on uvloop: the event loop itself is a large part
    of a busy server's CPU, and uvloop's costs a fraction of asyncio's own."""
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(_awaited(main))


async def _awaited(main: Awaitable[Any]) -> Any:
    return await main
