"""The audit log: who did what, in which project, from where, with what result."""

from __future__ import annotations

from fastapi import APIRouter

from yun.control.access.policy import Permission, Scope, require
from yun.control.api.bundle import ApiBundle
from yun.control.api.deps import Listing
from yun.control.services.listing import each, listed
from yun.proto.identity import AuditRecord
from yun.proto.resources import Page


def audit_router(api: ApiBundle) -> APIRouter:
    r = api.router("audit")
    scope = api.scope

    @r.get("/audit", response_model=Page[AuditRecord], name="audit.list")
    async def list_audit(params: Listing, sc: Scope = scope) -> Page[AuditRecord]:
        if not sc.context.admin_of_departments:
            require(sc.context, Permission.MANAGE_PROJECT, "read the audit log")
        return await listed(api.ctx.db, "audit", sc, params,
                            each(AuditRecord.model_validate))

    return r
