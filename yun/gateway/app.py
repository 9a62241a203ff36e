"""The public REST API (C-GW): /api/v1, OpenAPI at /docs, problems as application/problem+json.

The gateway keeps no state: it checks the caller's token, validates the request
against the public models, and forwards it to a control server over the internal
protocol. Image bytes are streamed straight to the storage server the control
server chose, never buffered here.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import AsyncIterator
from typing import Annotated, Any

import httpx
from fastapi import Depends, FastAPI, Query, Request
from fastapi.responses import HTMLResponse, PlainTextResponse

from yun.proto.client import PeerClient, error_for
from yun.proto.components import ComponentType
from yun.proto.errors import PeerError, Unauthorized, Unavailable, YunError
from yun.proto.membership import Membership
from yun.proto.resources import (
    Accepted,
    Console,
    Image,
    ImageCreate,
    ImageFormat,
    ImageUploadTicket,
    Node,
    Page,
    ResourceName,
    Task,
    Vm,
    VmCreate,
    VmStop,
)
from yun.proto.server import install_problem_handlers

log = logging.getLogger("yun.gateway")

Limit = Annotated[int, Query(ge=1, le=1000)]
Offset = Annotated[int, Query(ge=0)]
Wait = Annotated[float, Query(ge=0, le=600, description="seconds to wait for the task to end")]
INTERNAL = "/internal/v1"


def create_gateway_app(membership: Membership, admin_token: str) -> FastAPI:
    app = FastAPI(
        title="Yun REST API", version="1", docs_url=None, redoc_url=None,
        description="Virtual machines, images and nodes of a Yun cloud. Long operations "
                    "answer 202 with a task; `Idempotency-Key` makes a request repeatable.",
    )
    install_problem_handlers(app)
    _serve_docs_offline(app)

    def authorize(request: Request) -> None:
        header = request.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise Unauthorized("send 'Authorization: Bearer <token>'")
        if not admin_token or not hmac.compare_digest(token.encode(), admin_token.encode()):
            raise Unauthorized("the token is not valid")

    auth = [Depends(authorize)]

    def control() -> PeerClient:
        controls = membership.peers_of(ComponentType.CONTROL)
        if not controls:
            raise Unavailable("no control server is available; try again shortly")
        return membership.client(controls[0])

    def forward_headers(request: Request) -> dict[str, str]:
        key = request.headers.get("Idempotency-Key")
        return {"Idempotency-Key": key} if key is not None else {}

    async def call(method: str, path: str, request: Request | None = None, **kw: Any) -> Any:
        headers = forward_headers(request) if request is not None else None
        return await control().request(method, f"{INTERNAL}{path}", headers=headers, **kw)

    async def waited(accepted: dict[str, Any], wait: float) -> dict[str, Any]:
        if wait > 0:
            task = await call("GET", f"/tasks/{accepted['task']['uuid']}",
                              params={"wait": wait}, timeout=wait + 30)
            accepted["task"] = task
        return accepted

    @app.get("/healthz", include_in_schema=False)
    async def healthz() -> dict[str, Any]:
        return {"status": "ok",
                "control_servers": len(membership.peers_of(ComponentType.CONTROL))}

    # -- nodes -------------------------------------------------------------------------------

    @app.get("/api/v1/nodes", response_model=Page[Node], dependencies=auth, tags=["nodes"])
    async def list_nodes(status: str | None = None, name: str | None = None,
                         tag: str | None = None, limit: Limit = 100, offset: Offset = 0) -> Any:
        return await call("GET", "/nodes", params=_params(
            status=status, name=name, tag=tag, limit=limit, offset=offset))

    @app.get("/api/v1/nodes/{ref}", response_model=Node, dependencies=auth, tags=["nodes"])
    async def show_node(ref: str) -> Any:
        return await call("GET", f"/nodes/{ref}")

    # -- images ------------------------------------------------------------------------------

    @app.post(
        "/api/v1/images", response_model=Image, status_code=201, dependencies=auth,
        tags=["images"],
        openapi_extra={"requestBody": {"required": True, "content": {
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}},
    )
    async def upload_image(
        request: Request, name: ResourceName, format: ImageFormat | None = None,
        description: Annotated[str, Query(max_length=1024)] = "",
    ) -> Any:
        """Upload a disk image (qcow2, vmdk, vdi, vhdx, vpc, ISO; raw when declared) as the
        request body. Its format is detected, its checksum computed; a file that is not an
        image is refused and leaves nothing behind."""
        ticket = ImageUploadTicket.model_validate(await call(
            "POST", "/images",
            body=ImageCreate(name=name, description=description, format=format)))
        image_uuid = ticket.image.uuid
        try:
            await _stream_to_storage(membership, ticket, request, format)
        except BaseException:
            try:
                await call("DELETE", f"/images/{image_uuid}")
            except YunError as exc:
                log.warning("could not remove the record of a failed upload: %s", exc,
                            extra={"image": image_uuid})
            raise
        return await call("GET", f"/images/{image_uuid}")

    @app.get("/api/v1/images", response_model=Page[Image], dependencies=auth, tags=["images"])
    async def list_images(status: str | None = None, name: str | None = None,
                          format: str | None = None, tag: str | None = None,
                          limit: Limit = 100, offset: Offset = 0) -> Any:
        return await call("GET", "/images", params=_params(
            status=status, name=name, format=format, tag=tag, limit=limit, offset=offset))

    @app.get("/api/v1/images/{ref}", response_model=Image, dependencies=auth, tags=["images"])
    async def show_image(ref: str) -> Any:
        return await call("GET", f"/images/{ref}")

    @app.delete("/api/v1/images/{ref}", status_code=204, dependencies=auth, tags=["images"])
    async def delete_image(ref: str) -> None:
        await call("DELETE", f"/images/{ref}")

    # -- VMs ---------------------------------------------------------------------------------

    @app.post("/api/v1/vms", response_model=Accepted, status_code=202, dependencies=auth,
              tags=["vms"])
    async def create_vm(body: VmCreate, request: Request, wait: Wait = 0) -> Any:
        return await waited(await call("POST", "/vms", request, body=body), wait)

    @app.get("/api/v1/vms", response_model=Page[Vm], dependencies=auth, tags=["vms"])
    async def list_vms(state: str | None = None, name: str | None = None,
                       node_uuid: str | None = None, project: str | None = None,
                       image_uuid: str | None = None, tag: str | None = None,
                       limit: Limit = 100, offset: Offset = 0) -> Any:
        return await call("GET", "/vms", params=_params(
            state=state, name=name, node_uuid=node_uuid, project=project,
            image_uuid=image_uuid, tag=tag, limit=limit, offset=offset))

    @app.get("/api/v1/vms/{ref}", response_model=Vm, dependencies=auth, tags=["vms"])
    async def show_vm(ref: str) -> Any:
        return await call("GET", f"/vms/{ref}")

    @app.delete("/api/v1/vms/{ref}", response_model=Accepted, status_code=202,
                dependencies=auth, tags=["vms"])
    async def delete_vm(ref: str, request: Request, wait: Wait = 0) -> Any:
        return await waited(await call("DELETE", f"/vms/{ref}", request), wait)

    @app.post("/api/v1/vms/{ref}/start", response_model=Accepted, status_code=202,
              dependencies=auth, tags=["vms"])
    async def start_vm(ref: str, request: Request, wait: Wait = 0) -> Any:
        return await waited(await call("POST", f"/vms/{ref}/start", request), wait)

    @app.post("/api/v1/vms/{ref}/stop", response_model=Accepted, status_code=202,
              dependencies=auth, tags=["vms"])
    async def stop_vm(ref: str, request: Request, body: VmStop | None = None,
                      wait: Wait = 0) -> Any:
        return await waited(await call("POST", f"/vms/{ref}/stop", request,
                                       body=body or VmStop()), wait)

    @app.post("/api/v1/vms/{ref}/reboot", response_model=Accepted, status_code=202,
              dependencies=auth, tags=["vms"])
    async def reboot_vm(ref: str, request: Request, wait: Wait = 0) -> Any:
        return await waited(await call("POST", f"/vms/{ref}/reboot", request), wait)

    @app.get("/api/v1/vms/{ref}/console-log", response_class=PlainTextResponse,
             dependencies=auth, tags=["vms"])
    async def console_log(ref: str, max_bytes: Annotated[int, Query(ge=1, le=1 << 20)] = 65536
                          ) -> str:
        data = await call("GET", f"/vms/{ref}/console-log", params={"max_bytes": max_bytes})
        return str(data["text"])

    @app.get("/api/v1/vms/{ref}/console", response_model=Console, dependencies=auth,
             tags=["vms"])
    async def console(ref: str) -> Any:
        return await call("GET", f"/vms/{ref}/console")

    # -- tasks -------------------------------------------------------------------------------

    @app.get("/api/v1/tasks", response_model=Page[Task], dependencies=auth, tags=["tasks"])
    async def list_tasks(state: str | None = None, kind: str | None = None,
                         resource_uuid: str | None = None, limit: Limit = 100,
                         offset: Offset = 0) -> Any:
        return await call("GET", "/tasks", params=_params(
            state=state, kind=kind, resource_uuid=resource_uuid, limit=limit, offset=offset))

    @app.get("/api/v1/tasks/{task_uuid}", response_model=Task, dependencies=auth,
             tags=["tasks"])
    async def show_task(task_uuid: str, wait: Wait = 0) -> Any:
        return await call("GET", f"/tasks/{task_uuid}", params={"wait": wait},
                          timeout=wait + 30)

    return app


def _serve_docs_offline(app: FastAPI) -> None:
    """Swagger UI at /docs from files shipped in the virtualenv: a data centre's API
    documentation must not depend on a CDN being reachable."""
    from fastapi.openapi.docs import get_swagger_ui_html
    from fastapi.staticfiles import StaticFiles
    from swagger_ui_bundle import swagger_ui_path

    app.mount("/docs-assets", StaticFiles(directory=swagger_ui_path), name="docs-assets")

    @app.get("/docs", include_in_schema=False)
    async def docs() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url="/openapi.json", title="Yun REST API",
            swagger_js_url="/docs-assets/swagger-ui-bundle.js",
            swagger_css_url="/docs-assets/swagger-ui.css",
            swagger_favicon_url="/docs-assets/favicon-32x32.png",
        )


def _params(**values: Any) -> dict[str, Any]:
    return {k: v for k, v in values.items() if v is not None}


async def _stream_to_storage(membership: Membership, ticket: ImageUploadTicket,
                             request: Request, declared: ImageFormat | None) -> None:
    """Send the request body to the storage server as it arrives."""
    storage = membership.client_for_url(ticket.storage_url)

    async def body() -> AsyncIterator[bytes]:
        async for chunk in request.stream():
            yield chunk

    params = {"name": ticket.image.name}
    if declared is not None:
        params["format"] = declared.value
    try:
        resp = await storage.http.put(
            f"/internal/v1/images/{ticket.image.uuid}/data", content=body(), params=params,
            headers={**storage.headers(), "Content-Type": "application/octet-stream"},
            timeout=httpx.Timeout(60.0, read=3600.0),
        )
    except httpx.HTTPError as exc:
        raise PeerError(f"storage server unreachable: {exc}") from exc
    if not resp.is_success:
        raise error_for(resp, ticket.storage_url)
