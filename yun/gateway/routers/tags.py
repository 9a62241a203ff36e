"""Tags of every taggable resource: ``/{kind}/{ref}/tags``."""

from __future__ import annotations

from fastapi import APIRouter, Response
from pydantic import BaseModel, Field

from yun.gateway.routers.common import (
    API_PREFIX,
    Ctx,
    IdempotencyKey,
    RefPath,
    Up,
    answer,
)
from yun.proto.resources import TagsReplace, TagsUpdate

TAGGED_KINDS = ("vms", "images", "nodes", "projects", "users", "departments")


class TagSet(BaseModel):
    """A resource's tags, the platform's own (``sys:``) included."""

    tags: dict[str, str] = Field(default_factory=dict)


router = APIRouter(prefix=API_PREFIX)


def _add_routes(kind: str) -> None:
    """GET, PUT and PATCH ``/{kind}/{ref}/tags``, under ``kind``'s OpenAPI group."""
    template = f"/{kind}/{{ref}}/tags"

    async def show_tags(ref: RefPath, ctx: Ctx, up: Up) -> Response:
        return answer(await up.call(ctx, "GET", template, path={"ref": ref}), TagSet)

    async def replace_tags(ref: RefPath, body: TagsReplace, ctx: Ctx, up: Up,
                           idempotency_key: IdempotencyKey = None) -> Response:
        return answer(await up.call(ctx, "PUT", template, path={"ref": ref}, body=body,
                                    idempotency_key=idempotency_key), TagSet)

    async def update_tags(ref: RefPath, body: TagsUpdate, ctx: Ctx, up: Up,
                          idempotency_key: IdempotencyKey = None) -> Response:
        return answer(await up.call(ctx, "PATCH", template, path={"ref": ref}, body=body,
                                    idempotency_key=idempotency_key), TagSet)

    noun = kind.rstrip("s")
    routes = (
        ("GET", show_tags, "show", f"The tags of one {noun}."),
        ("PUT", replace_tags, "replace",
         f"Replace every tag of one {noun} that is not a platform (`sys:`) tag."),
        ("PATCH", update_tags, "update",
         f"Set (`set`) or remove (`remove`) some tags of one {noun}."),
    )
    for method, endpoint, verb, description in routes:
        router.add_api_route(template, endpoint, methods=[method], response_model=TagSet,
                             tags=[kind], name=f"{verb}_{noun}_tags",
                             description=description)


for _kind in TAGGED_KINDS:
    _add_routes(_kind)
