"""Compute nodes (super administrator)."""

from __future__ import annotations

from fastapi import Response

from yun.gateway.routers.common import (
    Ctx,
    IdempotencyKey,
    Listing,
    RefPath,
    Up,
    answer,
    make_router,
)
from yun.proto.resources import Node, NodeLabelsUpdate, Page

router = make_router("nodes")


@router.get("/nodes", response_model=Page[Node])
async def list_nodes(ctx: Ctx, up: Up, listing: Listing) -> Response:
    """The compute nodes: pool, admin state, labels, inventory, reservations and load."""
    return answer(await up.call(ctx, "GET", "/nodes", params=listing), Page[Node])


@router.get("/nodes/{ref}", response_model=Node)
async def show_node(ref: RefPath, ctx: Ctx, up: Up) -> Response:
    """One node, by uuid or name."""
    return answer(await up.call(ctx, "GET", "/nodes/{ref}", path={"ref": ref}), Node)


@router.put("/nodes/{ref}/labels", response_model=Node)
async def set_node_labels(ref: RefPath, body: NodeLabelsUpdate, ctx: Ctx, up: Up,
                          idempotency_key: IdempotencyKey = None) -> Response:
    """Replace a node's labels (e.g. `ssd=true`), which a VM's `node_labels` must match
    for the node to host it (super administrator)."""
    return answer(await up.call(ctx, "PUT", "/nodes/{ref}/labels", path={"ref": ref},
                                body=body, idempotency_key=idempotency_key), Node)
