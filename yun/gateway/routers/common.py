"""What every router shares: typed, bounded parameters and the relay of answers."""

from __future__ import annotations

import functools
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Path, Query, Request, Response
from pydantic import TypeAdapter, ValidationError

from yun.gateway.auth import Authenticator, current_context, get_authenticator
from yun.gateway.upstream import REPLAYED_HEADER, Reply, Upstream
from yun.proto.context import RequestContext
from yun.proto.errors import PeerError
from yun.proto.messages import NAME_PATTERN
from yun.proto.resources import Accepted

API_PREFIX = "/api/v1"
UUID_PATTERN = r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$"
MAX_OFFSET = 1_000_000
MAX_WAIT = 600.0
# How much longer than a task wait the gateway waits for the control server's answer.
WAIT_MARGIN = 30.0

RefPath = Annotated[str, Path(
    min_length=1, max_length=63, pattern=NAME_PATTERN,
    description="the resource's uuid or name: letters, digits, '.', '_' and '-', starting "
                "with a letter or digit, at most 63 characters")]
UuidPath = Annotated[str, Path(
    min_length=36, max_length=36, pattern=UUID_PATTERN,
    description="a uuid, lower-case and hyphenated")]
Wait = Annotated[float, Query(
    ge=0, le=MAX_WAIT, description="seconds to wait for the task to end (0: do not wait)")]
Cascade = Annotated[bool, Query(description="also delete what depends on it")]
IdempotencyKey = Annotated[str | None, Header(
    min_length=1, max_length=255,
    description="makes the request repeatable: a repeat with the same body answers the "
                "first answer")]


async def get_upstream(request: Request) -> Upstream:
    """FastAPI dependency: the gateway's way to the control servers."""
    upstream: Upstream = request.app.state.upstream
    return upstream


Ctx = Annotated[RequestContext, Depends(current_context)]
Up = Annotated[Upstream, Depends(get_upstream)]
# For routes that change credentials: they drop what the gateway cached about them.
Auth = Annotated[Authenticator, Depends(get_authenticator)]


async def list_query(
    q: Annotated[str | None, Query(
        max_length=4096, description="filter, e.g. `vcpus>=2 and tag:env=prod`")] = None,
    sort: Annotated[str | None, Query(
        max_length=256, description="sort keys, e.g. `-created_at,name`")] = None,
    limit: Annotated[int, Query(ge=1, le=1000, description="items per page")] = 100,
    offset: Annotated[int, Query(ge=0, le=MAX_OFFSET, description="items to skip")] = 0,
    cursor: Annotated[str | None, Query(
        max_length=1024, description="continue after a page (its `next_cursor`)")] = None,
    count: Annotated[bool, Query(description="also count every match (`total`)")] = False,
) -> dict[str, Any]:
    """The list parameters every list route takes, as forwarded to the control server."""
    params: dict[str, Any] = {"limit": limit, "offset": offset}
    if q is not None:
        params["q"] = q
    if sort is not None:
        params["sort"] = sort
    if cursor is not None:
        params["cursor"] = cursor
    if count:
        params["count"] = True
    return params


Listing = Annotated[dict[str, Any], Depends(list_query)]


def make_router(tag: str) -> APIRouter:
    """A router for the routes of one resource, grouped under ``tag`` in the OpenAPI."""
    return APIRouter(prefix=API_PREFIX, tags=[tag])


@functools.lru_cache(maxsize=256)
def _adapter(model: Any) -> TypeAdapter[Any]:
    return TypeAdapter(model)


def answer(reply: Reply, model: Any | None) -> Response:
    """The control server's answer, relayed: its status, its body checked against
    ``model`` (None: no body) and its ``Idempotent-Replayed`` mark."""
    headers = {REPLAYED_HEADER: "true"} if reply.replayed else None
    if model is None or reply.status == 204:
        return Response(status_code=204, headers=headers)
    adapter = _adapter(model)
    try:
        # Parsed and checked in one pass from the bytes received, when there are some.
        value = (adapter.validate_json(reply.json) if reply.json is not None
                 else adapter.validate_python(reply.data))
    except ValidationError as exc:
        name = getattr(model, "__name__", str(model))
        raise PeerError(f"the control server answered a malformed {name}") from exc
    return Response(adapter.dump_json(value), status_code=reply.status, headers=headers,
                    media_type="application/json")


async def accepted(up: Upstream, ctx: RequestContext, reply: Reply, wait: float) -> Response:
    """Answer an ``Accepted`` (202, or 200 when nothing had to be done), first waiting up
    to ``wait`` seconds for its task when asked to."""
    if reply.status == 204:
        return answer(reply, None)
    try:
        done = Accepted.model_validate(reply.data)
    except ValidationError as exc:
        raise PeerError("the control server answered a malformed Accepted") from exc
    if wait > 0 and done.task is not None:
        task = await up.call(ctx, "GET", "/tasks/{task_uuid}",
                             path={"task_uuid": done.task.uuid}, params={"wait": wait},
                             timeout=wait + WAIT_MARGIN)
        reply = Reply(reply.status, {**done.model_dump(mode="json"), "task": task.data},
                      reply.replayed)
    return answer(reply, Accepted)
