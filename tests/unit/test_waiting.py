"""The one polling helper of the suites: sync or async checks, bounded."""

from __future__ import annotations

import pytest

from yun.testing.waiting import eventually


async def test_returns_the_first_truthy_value_of_a_sync_or_async_check() -> None:
    calls = []

    def sync_check() -> int:
        calls.append(1)
        return len(calls) if len(calls) >= 3 else 0

    async def async_check() -> str:
        return "ready"

    assert await eventually(sync_check, interval=0.01) == 3
    assert await eventually(async_check) == "ready"


async def test_fails_naming_what_never_held() -> None:
    with pytest.raises(AssertionError, match=r"the node up never held within 0\.05 s"):
        await eventually(lambda: False, timeout=0.05, what="the node up", interval=0.01)
