"""Intelligent routers: the rule-set pull (routers only) and their list (administrators)."""

from __future__ import annotations

from fastapi import APIRouter, Depends

from yun.control.access.policy import Permission, Scope, require
from yun.control.api.bundle import BASE, ApiBundle
from yun.control.network.router_sync import list_routers, record_hello
from yun.proto.auth import Identity
from yun.proto.components import ComponentType as CT
from yun.proto.network import RouterHello, RouterList, RouterRuleSet
from yun.proto.server import peer_identity


def router_sync_router(api: ApiBundle) -> APIRouter:
    """``POST /internal/v1/router/rules``: a router pulls the rule set (routers only)."""
    r = APIRouter(prefix=BASE, include_in_schema=False)
    router_caller = Depends(peer_identity(api.ctx.membership.verifier, {CT.ROUTER}))

    @r.post("/router/rules", response_model=RouterRuleSet)
    async def pull_rules(hello: RouterHello, caller: Identity = router_caller
                         ) -> RouterRuleSet:
        # The router's own word first: a router that just joined may not be among this
        # control server's peers yet.
        peer = api.ctx.membership.peers.get(caller.component_id)
        async with api.ctx.db.session() as session:
            return await record_hello(
                session, caller.component_id, hello.name or (peer.name if peer else ""),
                hello.url or (peer.url if peer else ""), hello)

    return r


def router_router(api: ApiBundle) -> APIRouter:
    """``GET /internal/v1/routers``: the routers and their generations (administrators,
    through the gateway)."""
    users = api.router("routers")
    scope = api.scope

    @users.get("/routers", response_model=RouterList, name="router.list")
    async def routers(sc: Scope = scope) -> RouterList:
        require(sc.context, Permission.MANAGE_PLATFORM, "list routers")
        async with api.ctx.db.reading() as session:
            return await list_routers(session, api.ctx.settings.router_timeout)

    return users
