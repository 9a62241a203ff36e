"""Node routes (administrators only) and the routes nodes and storage servers call."""

from __future__ import annotations

from fastapi import APIRouter, Depends

from yun.control.access.policy import Permission, Scope, require
from yun.control.api.bundle import BASE, ApiBundle
from yun.control.api.deps import Listing
from yun.control.db.models import NodeRow
from yun.control.services.common import find
from yun.control.services.listing import listed
from yun.control.services.nodes import node_models
from yun.proto.auth import Identity
from yun.proto.errors import Forbidden
from yun.proto.messages import (
    NodeReport,
    NodeReportAnswer,
    StorageImageReport,
    UploadAborted,
)
from yun.proto.resources import Image, Node, Page


def node_router(api: ApiBundle) -> APIRouter:
    r = api.router("nodes")
    scope = api.scope

    @r.get("/nodes", response_model=Page[Node], name="node.list")
    async def list_nodes(params: Listing, sc: Scope = scope) -> Page[Node]:
        require(sc.context, Permission.MANAGE_PLATFORM, "list nodes")
        return await listed(api.ctx.db, "node", sc, params,
                            lambda session, rows: node_models(session, rows, api.ctx.loads))

    @r.get("/nodes/{ref}", response_model=Node, name="node.show")
    async def show_node(ref: str, sc: Scope = scope) -> Node:
        require(sc.context, Permission.MANAGE_PLATFORM, "show nodes")
        async with api.ctx.db.reading() as session:
            row = await find(session, NodeRow, ref, "node", sc)
            return (await node_models(session, [row], api.ctx.loads))[0]

    return r


def component_router(api: ApiBundle) -> APIRouter:
    """Routes for other components: node reports and stored images."""
    r = APIRouter(prefix=BASE, include_in_schema=False)
    node_caller = Depends(api.deps.node)
    storage_caller = Depends(api.deps.storage)

    # Defaults left out: an older node refuses the answer's fields it does not know.
    @r.post("/nodes/report", response_model=NodeReportAnswer,
            response_model_exclude_defaults=True)
    async def node_report(report: NodeReport, caller: Identity = node_caller,
                          deltas: bool = False) -> NodeReportAnswer:
        """A node's report; ``deltas``: the node reads the answer's delta fields."""
        if caller.component_id != report.node_id:
            raise Forbidden(f"{caller.component_id} may not report for node {report.node_id}")
        answer = await api.nodes.report(report)
        if not deltas:
            return NodeReportAnswer(sandbox=answer.sandbox)
        return answer

    @r.post("/images/{image_uuid}/stored", response_model=Image,
            dependencies=[storage_caller])
    async def image_stored(image_uuid: str, report: StorageImageReport) -> Image:
        return await api.images.stored(report.model_copy(update={"image_id": image_uuid}))

    @r.post("/images/{image_uuid}/aborted", status_code=204, response_model=None,
            dependencies=[storage_caller])
    async def image_upload_aborted(image_uuid: str, report: UploadAborted) -> None:
        await api.images.aborted(image_uuid, report.reason)

    return r
