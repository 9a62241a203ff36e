"""Node routes (administrators only) and the routes nodes and storage servers call."""

from __future__ import annotations

from fastapi import APIRouter, Depends

from yun.control.access.policy import Permission, Scope, require
from yun.control.api.bundle import BASE, ApiBundle
from yun.control.api.deps import Listing
from yun.control.db.models import NodeRow
from yun.control.db.tags import tags_of
from yun.control.services.common import find
from yun.control.services.listing import list_page, page_of
from yun.control.services.nodes import node_model, vm_counts
from yun.proto.auth import Identity
from yun.proto.errors import Forbidden
from yun.proto.messages import NodeReport, StorageImageReport
from yun.proto.resources import Image, Node, Page


def node_router(api: ApiBundle) -> APIRouter:
    r = api.router("nodes")
    scope = api.scope

    @r.get("/nodes", response_model=Page[Node], name="node.list")
    async def list_nodes(params: Listing, sc: Scope = scope) -> Page[Node]:
        require(sc.context, Permission.MANAGE_PLATFORM, "list nodes")
        async with api.ctx.db.session() as session:
            page = await list_page(session, "node", sc, params)
            counts = await vm_counts(session)
            tags = await tags_of(session, [n.uuid for n in page.rows])
        items = [node_model(n, counts.get(n.uuid, 0)) for n in page.rows]
        for item in items:
            item.tags = tags.get(item.uuid, {})
        return page_of(items, page, params)

    @r.get("/nodes/{ref}", response_model=Node, name="node.show")
    async def show_node(ref: str, sc: Scope = scope) -> Node:
        require(sc.context, Permission.MANAGE_PLATFORM, "show nodes")
        async with api.ctx.db.session() as session:
            row = await find(session, NodeRow, ref, "node", sc)
            counts = await vm_counts(session)
            node = node_model(row, counts.get(row.uuid, 0))
            node.tags = (await tags_of(session, [row.uuid]))[row.uuid]
            return node

    return r


def component_router(api: ApiBundle) -> APIRouter:
    """Routes for other components: node reports and stored images."""
    r = APIRouter(prefix=BASE, include_in_schema=False)
    node_caller = Depends(api.deps.node)
    storage_caller = Depends(api.deps.storage)

    @r.post("/nodes/report", status_code=204, response_model=None)
    async def node_report(report: NodeReport, caller: Identity = node_caller) -> None:
        if caller.component_id != report.node_id:
            raise Forbidden(f"{caller.component_id} may not report for node {report.node_id}")
        await api.nodes.report(report)

    @r.post("/images/{image_uuid}/stored", response_model=Image,
            dependencies=[storage_caller])
    async def image_stored(image_uuid: str, report: StorageImageReport) -> Image:
        return await api.images.stored(report.model_copy(update={"image_id": image_uuid}))

    return r
