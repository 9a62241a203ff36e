"""The audit log."""

from __future__ import annotations

from fastapi import Response

from yun.gateway.routers.common import Ctx, Listing, Up, answer, make_router
from yun.proto.identity import AuditRecord
from yun.proto.resources import Page

router = make_router("audit")


@router.get("/audit", response_model=Page[AuditRecord])
async def list_audit(ctx: Ctx, up: Up, listing: Listing) -> Response:
    """Who did what, when, from where: the project's records for its administrator, more
    for administrators above."""
    return answer(await up.call(ctx, "GET", "/audit", params=listing), Page[AuditRecord])
