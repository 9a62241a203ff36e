"""The router's internal API: the control servers' change notices."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import Depends, FastAPI

from yun.proto.auth import Verifier
from yun.proto.components import ComponentType as CT
from yun.proto.network import RouterNotice
from yun.proto.server import install_problem_handlers, peer_identity
from yun.util.metrics import install_metrics


def create_router_app(verifier: Verifier, on_notice: Callable[[RouterNotice], Awaitable[None]],
                      status: Callable[[], dict[str, Any]]) -> FastAPI:
    """``POST /internal/v1/notice`` (control servers only): the rule set changed, pull it;
    ``GET /internal/v1/status``: what the router applied."""
    app = FastAPI(title="Yun intelligent router (internal)", version="1")
    install_problem_handlers(app)
    caller = Depends(peer_identity(verifier, {CT.CONTROL}))

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/internal/v1/notice", status_code=202, dependencies=[caller])
    async def notice(body: RouterNotice) -> dict[str, int]:
        await on_notice(body)
        return {"generation": body.generation}

    @app.get("/internal/v1/status", dependencies=[caller])
    async def get_status() -> dict[str, Any]:
        return status()

    install_metrics(app, "router")
    return app
