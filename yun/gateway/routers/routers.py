"""Intelligent routers (administrators): which generation of the rule set each applied."""

from __future__ import annotations

from fastapi import Response

from yun.gateway.routers.common import Ctx, Up, answer, make_router
from yun.proto.network import RouterList

router = make_router("routers")


@router.get("/routers", response_model=RouterList)
async def list_routers(ctx: Ctx, up: Up) -> Response:
    """The intelligent routers: LAN address, the generation of the rule set each applied
    against the current one, and whether each pulled recently (live)."""
    return answer(await up.call(ctx, "GET", "/routers"), RouterList)
