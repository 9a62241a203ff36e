"""The quota of the credential's project."""

from __future__ import annotations

from fastapi import Response

from yun.gateway.routers.common import Ctx, Up, answer, make_router
from yun.proto.identity import Quota

router = make_router("quotas")


@router.get("/quota", response_model=Quota)
async def show_quota(ctx: Ctx, up: Up) -> Response:
    """The limits and usage of the project the caller's credential is scoped to."""
    return answer(await up.call(ctx, "GET", "/quota"), Quota)
