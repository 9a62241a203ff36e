"""``yielding_first``: an HTTP request lets the loop run what is ready before it is served;
other ASGI events (lifespan) go straight through."""

from __future__ import annotations

import asyncio
from typing import Any

from yun.util.serve import yielding_first


async def test_an_http_request_waits_one_turn_and_lifespan_none() -> None:
    seen: list[str] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        seen.append(f"app {scope['type']}")

    async def other() -> None:
        seen.append("other task")

    wrapped = yielding_first(app)  # type: ignore[arg-type]
    task = asyncio.get_running_loop().create_task(other())
    await wrapped({"type": "lifespan"}, None, None)  # type: ignore[arg-type]
    await wrapped({"type": "http"}, None, None)  # type: ignore[arg-type]
    await task
    assert seen == ["app lifespan", "other task", "app http"]
