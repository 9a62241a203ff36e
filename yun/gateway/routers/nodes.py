"""Compute nodes (super administrator)."""

from __future__ import annotations

from fastapi import Response

from yun.gateway.routers.common import Ctx, Listing, RefPath, Up, answer, make_router
from yun.proto.resources import Node, Page

router = make_router("nodes")


@router.get("/nodes", response_model=Page[Node])
async def list_nodes(ctx: Ctx, up: Up, listing: Listing) -> Response:
    """The compute nodes, their capacity, reservations and load."""
    return answer(await up.call(ctx, "GET", "/nodes", params=listing), Page[Node])


@router.get("/nodes/{ref}", response_model=Node)
async def show_node(ref: RefPath, ctx: Ctx, up: Up) -> Response:
    """One node, by uuid or name."""
    return answer(await up.call(ctx, "GET", "/nodes/{ref}", path={"ref": ref}), Node)
