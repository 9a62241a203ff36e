"""SSH public keys of users (for cloud-init in the guests they create)."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response

from yun.control.access.policy import Scope
from yun.control.api.bundle import ApiBundle
from yun.control.api.deps import Listing
from yun.control.api.routing import audit_resource
from yun.control.services.listing import each, listed
from yun.proto.context import RequestContext
from yun.proto.resources import Page, SshKey, SshKeyCreate


def ssh_key_router(api: ApiBundle) -> APIRouter:
    r = api.router("ssh-keys")
    user, scope = api.user, api.scope
    svc = api.ssh_keys

    @r.post("/ssh-keys", response_model=SshKey, status_code=201, name="ssh_key.create")
    async def create_ssh_key(req: SshKeyCreate, request: Request,
                             ctx: RequestContext = user) -> SshKey:
        made = await svc.create(req, ctx)
        audit_resource(request, "ssh_key", made.uuid, made.project_uuid)
        return made

    @r.get("/ssh-keys", response_model=Page[SshKey], name="ssh_key.list")
    async def list_ssh_keys(params: Listing, sc: Scope = scope) -> Page[SshKey]:
        return await listed(api.ctx.db, "ssh_key", sc, params, each(SshKey.model_validate))

    @r.get("/ssh-keys/{ref}", response_model=SshKey, name="ssh_key.show")
    async def show_ssh_key(ref: str, sc: Scope = scope) -> SshKey:
        return await svc.get(ref, sc)

    @r.delete("/ssh-keys/{ref}", status_code=204, response_model=None, name="ssh_key.delete")
    async def delete_ssh_key(ref: str, request: Request, sc: Scope = scope) -> Response:
        audit_resource(request, "ssh_key", await svc.delete(ref, sc))
        return Response(status_code=204)

    return r
