"""The control server's internal API: for the gateway, the nodes and the storage servers."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Depends, FastAPI, Query, Request
from fastapi.responses import JSONResponse

from yun.control.context import ControlContext
from yun.control.db.models import FlowRow, ImageRow, NodeRow, VmRow
from yun.control.idempotency import idempotent
from yun.control.services.common import find, page
from yun.control.services.images import ImageService
from yun.control.services.nodes import NodeRegistry, node_model, vm_counts
from yun.control.services.tasks import get_task, task_model
from yun.control.services.vms import VmService, vm_with_node
from yun.proto.auth import Identity
from yun.proto.components import ComponentType as CT
from yun.proto.messages import NodeReport, StorageImageReport
from yun.proto.resources import (
    Accepted,
    Console,
    Image,
    ImageCreate,
    ImageUploadTicket,
    Node,
    Page,
    Task,
    Vm,
    VmCreate,
    VmStop,
)
from yun.proto.server import install_problem_handlers, peer_identity

Limit = Annotated[int, Query(ge=1, le=1000)]
Offset = Annotated[int, Query(ge=0)]


def create_control_app(ctx: ControlContext, nodes: NodeRegistry) -> FastAPI:
    app = FastAPI(title="Yun control server (internal)", version="1")
    install_problem_handlers(app)
    secret = lambda: ctx.membership.domain_secret or None  # noqa: E731
    api_caller = Depends(peer_identity(secret, {CT.GATEWAY, CT.CONTROL}))
    node_caller = Depends(peer_identity(secret, {CT.NODE}))
    storage_caller = Depends(peer_identity(secret, {CT.STORAGE}))
    vms, images = VmService(ctx), ImageService(ctx)
    base = "/internal/v1"

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    # -- from nodes and storage servers ----------------------------------------------------

    @app.post(f"{base}/nodes/report", status_code=204, dependencies=[node_caller])
    async def node_report(report: NodeReport, caller: Identity = node_caller) -> None:
        if caller.component_id != report.node_id:
            from yun.proto.errors import Forbidden
            raise Forbidden(f"{caller.component_id} may not report for node {report.node_id}")
        await nodes.report(report)

    @app.post(f"{base}/images/{{image_uuid}}/stored", response_model=Image,
              dependencies=[storage_caller])
    async def image_stored(image_uuid: str, report: StorageImageReport) -> Image:
        return await images.stored(report.model_copy(update={"image_id": image_uuid}))

    # -- nodes -------------------------------------------------------------------------------

    @app.get(f"{base}/nodes", response_model=Page[Node], dependencies=[api_caller])
    async def list_nodes(status: str | None = None, name: str | None = None,
                         tag: str | None = None, limit: Limit = 100, offset: Offset = 0
                         ) -> Page[Node]:
        async with ctx.db.session() as session:
            rows, total = await page(session, NodeRow, {"status": status, "name": name}, tag,
                                     limit, offset)
            counts = await vm_counts(session)
        return Page(items=[node_model(r, counts.get(r.uuid, 0)) for r in rows], total=total,
                    limit=limit, offset=offset)

    @app.get(f"{base}/nodes/{{node_uuid}}", response_model=Node, dependencies=[api_caller])
    async def show_node(node_uuid: str) -> Node:
        async with ctx.db.session() as session:
            row = await find(session, NodeRow, node_uuid, "node")
            counts = await vm_counts(session)
            return node_model(row, counts.get(row.uuid, 0))

    # -- images ------------------------------------------------------------------------------

    @app.post(f"{base}/images", response_model=ImageUploadTicket, status_code=201,
              dependencies=[api_caller])
    async def create_image(req: ImageCreate) -> ImageUploadTicket:
        return await images.create(req)

    @app.get(f"{base}/images", response_model=Page[Image], dependencies=[api_caller])
    async def list_images(status: str | None = None, name: str | None = None,
                          format: str | None = None, tag: str | None = None,
                          limit: Limit = 100, offset: Offset = 0) -> Page[Image]:
        async with ctx.db.session() as session:
            rows, total = await page(session, ImageRow,
                                     {"status": status, "name": name, "format": format},
                                     tag, limit, offset)
        return Page(items=[Image.model_validate(r) for r in rows], total=total, limit=limit,
                    offset=offset)

    @app.get(f"{base}/images/{{ref}}", response_model=Image, dependencies=[api_caller])
    async def show_image(ref: str) -> Image:
        return await images.get(ref)

    @app.delete(f"{base}/images/{{ref}}", status_code=204, dependencies=[api_caller])
    async def delete_image(ref: str) -> None:
        await images.delete(ref)

    # -- VMs ---------------------------------------------------------------------------------

    @app.post(f"{base}/vms", response_model=Accepted, status_code=202,
              dependencies=[api_caller])
    async def create_vm(req: VmCreate, request: Request) -> JSONResponse:
        async def handler() -> tuple[int, Any]:
            return 202, (await vms.create(req)).model_dump(mode="json")
        return await idempotent(ctx.db, request, handler)

    @app.get(f"{base}/vms", response_model=Page[Vm], dependencies=[api_caller])
    async def list_vms(state: str | None = None, name: str | None = None,
                       node_uuid: str | None = None, project: str | None = None,
                       image_uuid: str | None = None, tag: str | None = None,
                       limit: Limit = 100, offset: Offset = 0) -> Page[Vm]:
        async with ctx.db.session() as session:
            rows, total = await page(
                session, VmRow, {"state": state, "name": name, "node_uuid": node_uuid,
                                 "project": project, "image_uuid": image_uuid},
                tag, limit, offset)
            items = [await vm_with_node(session, r) for r in rows]
        return Page(items=items, total=total, limit=limit, offset=offset)

    @app.get(f"{base}/vms/{{ref}}", response_model=Vm, dependencies=[api_caller])
    async def show_vm(ref: str) -> Vm:
        return await vms.get(ref)

    @app.delete(f"{base}/vms/{{ref}}", response_model=Accepted, status_code=202,
                dependencies=[api_caller])
    async def delete_vm(ref: str, request: Request) -> JSONResponse:
        async def handler() -> tuple[int, Any]:
            return 202, (await vms.delete(ref)).model_dump(mode="json")
        return await idempotent(ctx.db, request, handler)

    for action in ("start", "reboot"):
        def _route(action: str = action) -> None:
            @app.post(f"{base}/vms/{{ref}}/{action}", response_model=Accepted,
                      status_code=202, dependencies=[api_caller], name=f"{action}_vm")
            async def power(ref: str, request: Request) -> JSONResponse:
                async def handler() -> tuple[int, Any]:
                    return 202, (await vms.action(ref, action)).model_dump(mode="json")
                return await idempotent(ctx.db, request, handler)
        _route()

    @app.post(f"{base}/vms/{{ref}}/stop", response_model=Accepted, status_code=202,
              dependencies=[api_caller])
    async def stop_vm(ref: str, request: Request, body: VmStop | None = None) -> JSONResponse:
        async def handler() -> tuple[int, Any]:
            return 202, (await vms.action(ref, "stop", body)).model_dump(mode="json")
        return await idempotent(ctx.db, request, handler)

    @app.get(f"{base}/vms/{{ref}}/console-log", dependencies=[api_caller])
    async def console_log(ref: str, max_bytes: Annotated[int, Query(ge=1, le=1 << 20)] = 65536
                          ) -> dict[str, str]:
        return {"text": await vms.console_log(ref, max_bytes)}

    @app.get(f"{base}/vms/{{ref}}/console", response_model=Console, dependencies=[api_caller])
    async def console(ref: str) -> Console:
        return await vms.console(ref)

    # -- tasks -------------------------------------------------------------------------------

    @app.get(f"{base}/tasks", response_model=Page[Task], dependencies=[api_caller])
    async def list_tasks(state: str | None = None, kind: str | None = None,
                         resource_uuid: str | None = None, limit: Limit = 100,
                         offset: Offset = 0) -> Page[Task]:
        async with ctx.db.session() as session:
            rows, total = await page(session, FlowRow,
                                     {"state": state, "kind": kind,
                                      "resource_uuid": resource_uuid}, None, limit, offset)
        return Page(items=[task_model(r) for r in rows], total=total, limit=limit,
                    offset=offset)

    @app.get(f"{base}/tasks/{{task_uuid}}", response_model=Task, dependencies=[api_caller])
    async def show_task(task_uuid: str,
                        wait: Annotated[float, Query(ge=0, le=600)] = 0) -> Task:
        if wait:
            await ctx.engine.wait(task_uuid, wait)
        async with ctx.db.session() as session:
            return task_model(await get_task(session, task_uuid))

    return app
