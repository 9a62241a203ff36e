"""SimCluster's teardown: a service whose stop hangs is cancelled after STOP_TIMEOUT and
reported as a warning naming it and where it waited, the others stop meanwhile."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import pytest

from yun.testing import cluster


@dataclass
class Settings:
    name: str


class Service:
    def __init__(self, name: str, hang: bool = False) -> None:
        self.settings = Settings(name)
        self.hang = hang
        self.stopped = False

    async def stop(self) -> None:
        if self.hang:
            await self._wait_for_ever()
        self.stopped = True

    async def _wait_for_ever(self) -> None:
        await asyncio.Event().wait()


async def test_a_hanging_stop_is_cancelled_and_named_in_a_warning(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cluster, "STOP_TIMEOUT", 0.2)
    stuck, fine = Service("control", hang=True), Service("gateway")
    with pytest.warns(RuntimeWarning) as caught:
        await asyncio.wait_for(cluster._stop_all([stuck, fine, None]), 5)
    assert fine.stopped and not stuck.stopped
    [warning] = caught
    text = str(warning.message)
    assert text.startswith("Service control did not stop within 0.2 s"), text
    # The whole chain of awaits, down to the one that never returned.
    assert "in stop" in text and "in _wait_for_ever" in text, text


async def test_stops_that_return_warn_of_nothing(recwarn: pytest.WarningsRecorder) -> None:
    services = [Service("a"), Service("b")]
    await cluster._stop_all(services)
    assert all(s.stopped for s in services)
    assert not [w for w in recwarn if issubclass(w.category, RuntimeWarning)]
