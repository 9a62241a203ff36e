"""``wait_set``, the wait between rounds of every service loop: a cancellation that
arrives as the event is set ends the loop (``asyncio.wait_for`` on Python 3.11 swallowed
it at three of these six offsets, and a node agent's stop then hung in CI)."""

from __future__ import annotations

import asyncio

import pytest

from yun.util.lifecycle import wait_set


async def _rounds(event: asyncio.Event) -> None:
    while True:
        await wait_set(event, 10)
        event.clear()


@pytest.mark.parametrize("ticks", range(6))
async def test_a_cancel_as_the_event_is_set_ends_the_loop(ticks: int) -> None:
    event = asyncio.Event()
    task = asyncio.create_task(_rounds(event))
    await asyncio.sleep(0.01)
    event.set()
    for _ in range(ticks):
        await asyncio.sleep(0)
    task.cancel()
    done, _ = await asyncio.wait({task}, timeout=2)
    if not done:  # leave nothing running behind a failure
        task.cancel()
    assert done and task.cancelled(), f"the loop went on after a cancel {ticks} ticks late"


async def test_says_whether_the_event_was_set_or_the_time_ran_out() -> None:
    event = asyncio.Event()
    assert await wait_set(event, 0.01) is False
    asyncio.get_running_loop().call_later(0.01, event.set)
    assert await wait_set(event, 5) is True
