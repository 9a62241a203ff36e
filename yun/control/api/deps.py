"""Dependencies of the control server's routes: who called, for whom, and list parameters."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Query, Request

from yun.control.context import ControlContext
from yun.control.services.listing import ListParams
from yun.proto.auth import Identity
from yun.proto.components import ComponentType as CT
from yun.proto.context import CONTEXT_HEADER, AnonymousContext, RequestContext, decode_context
from yun.proto.errors import Unauthorized
from yun.proto.server import peer_identity


@dataclass(frozen=True)
class Deps:
    """The dependencies of one control server's app."""

    gateway: Callable[..., Awaitable[Identity]]
    node: Callable[..., Awaitable[Identity]]
    storage: Callable[..., Awaitable[Identity]]


def make_deps(ctx: ControlContext) -> Deps:
    """User routes admit the gateway (and other control servers), node reports nodes only,
    image reports storage servers only."""
    verifier = ctx.membership.verifier
    return Deps(gateway=peer_identity(verifier, {CT.GATEWAY, CT.CONTROL}),
                node=peer_identity(verifier, {CT.NODE}),
                storage=peer_identity(verifier, {CT.STORAGE}))


def context_of(ctx: ControlContext, request: Request, caller: Identity
               ) -> RequestContext | AnonymousContext:
    """The request context the gateway forwarded, bound to the request by its signature
    (cached on the request)."""
    cached = getattr(request.state, "yun_context", None)
    if cached is not None:
        return cached  # type: ignore[no-any-return]
    header = request.headers.get(CONTEXT_HEADER)
    if not header:
        raise Unauthorized(f"a user request needs the {CONTEXT_HEADER} header")
    found = decode_context(header, caller.component_type)
    request.state.yun_context = found
    return found


async def list_params(
    q: Annotated[str | None, Query(max_length=4096)] = None,
    sort: Annotated[str | None, Query(max_length=256)] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    offset: Annotated[int, Query(ge=0, le=1_000_000)] = 0,
    cursor: Annotated[str | None, Query(max_length=1024)] = None,
    count: bool = False,
) -> ListParams:
    return ListParams(q=q, sort=sort, limit=limit, offset=offset, cursor=cursor, count=count)


Listing = Annotated[ListParams, Depends(list_params)]


class UserDeps:
    """Builds the ``user`` dependency (the signed context of a user request) for one app."""

    def __init__(self, ctx: ControlContext, deps: Deps) -> None:
        self.ctx = ctx
        gateway = deps.gateway

        # async: a plain def would run in FastAPI's thread pool, a thread hop per request.
        async def user(request: Request,
                       caller: Identity = Depends(gateway)) -> RequestContext:
            found = context_of(ctx, request, caller)
            if not isinstance(found, RequestContext):
                raise Unauthorized("this route needs a logged-in user")
            return found

        async def anonymous(request: Request, caller: Identity = Depends(gateway)
                            ) -> AnonymousContext | RequestContext:
            return context_of(ctx, request, caller)

        self.user = user
        self.anonymous = anonymous
