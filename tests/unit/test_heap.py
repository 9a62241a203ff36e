"""The garbage collector of a started component: its startup heap frozen, its young
generation collected less often, its time counted in /metrics."""

from __future__ import annotations

import asyncio
import gc
import os
import signal
from collections.abc import Iterator

import pytest
from prometheus_client.parser import text_string_to_metric_families

from yun.util import heap, metrics
from yun.util.lifecycle import run_until_signalled


@pytest.fixture
def collector_restored() -> Iterator[None]:
    """Leave the test process's collector as it was found."""
    threshold = gc.get_threshold()
    callbacks = list(gc.callbacks)
    yield
    gc.unfreeze()
    gc.set_threshold(*threshold)
    gc.callbacks[:] = callbacks


class Cycle:
    def __init__(self) -> None:
        self.me = self


def test_settling_freezes_the_heap_and_garbage_made_later_is_still_collected(
        collector_restored: None) -> None:
    _, older, oldest = gc.get_threshold()
    heap.settle_started_heap()
    assert gc.get_freeze_count() > 1000  # modules, classes, this test's own objects
    assert gc.get_threshold() == (heap.YOUNG_THRESHOLD, older, oldest)
    Cycle()  # unreachable at once, but only the collector can free it
    assert any(isinstance(o, Cycle) for o in gc.get_objects())
    gc.collect()
    assert not any(isinstance(o, Cycle) for o in gc.get_objects())


def _gc_seconds() -> dict[str, float]:
    body, _ = metrics.render()
    for family in text_string_to_metric_families(body.decode()):
        if family.name == "yun_gc_seconds":
            return {s.labels["generation"]: s.value for s in family.samples
                    if s.name == "yun_gc_seconds_total"}
    raise AssertionError("no yun_gc_seconds in /metrics")


def test_the_collectors_time_is_counted_once_per_collection(
        collector_restored: None) -> None:
    metrics.watch_collector()
    metrics.watch_collector()  # twice: still one callback
    assert gc.callbacks.count(metrics._time_collections) == 1
    before = _gc_seconds().get("2", 0.0)
    gc.collect()
    assert _gc_seconds()["2"] > before


def test_a_served_component_settles_its_heap_once_started(collector_restored: None) -> None:
    seen: dict[str, object] = {}

    async def start() -> None:
        seen["threshold while starting"] = gc.get_threshold()[0]
        asyncio.get_running_loop().call_soon(os.kill, os.getpid(), signal.SIGTERM)

    async def stop() -> None:
        seen["threshold when stopping"] = gc.get_threshold()[0]

    gc.set_threshold(700, *gc.get_threshold()[1:])
    asyncio.run(run_until_signalled(start, stop))
    assert seen == {"threshold while starting": 700,
                    "threshold when stopping": heap.YOUNG_THRESHOLD}
    assert metrics._time_collections in gc.callbacks
