"""The control server's internal API: for the gateway (user requests, each carrying a
signed request context), the nodes and the storage servers. One router module per
resource; the same paths as the public API, under ``/internal/v1``."""

from __future__ import annotations

from fastapi import FastAPI

from yun.control.api.accounts import account_router
from yun.control.api.addresses import address_router
from yun.control.api.audit import audit_router
from yun.control.api.auth import auth_router
from yun.control.api.bundle import ApiBundle
from yun.control.api.images import image_router
from yun.control.api.nodes import component_router, node_router
from yun.control.api.pools import pool_router
from yun.control.api.routers import router_router, router_sync_router
from yun.control.api.ssh_keys import ssh_key_router
from yun.control.api.tags import tag_router
from yun.control.api.tasks import task_router
from yun.control.api.tenancy import tenancy_router
from yun.control.api.vm_groups import vm_group_router
from yun.control.api.vms import vm_router
from yun.control.api.volumes import volume_router
from yun.control.context import ControlContext
from yun.control.services.nodes import NodeRegistry
from yun.proto.server import install_problem_handlers
from yun.util.metrics import install_metrics


def create_control_app(ctx: ControlContext, nodes: NodeRegistry) -> FastAPI:
    app = FastAPI(title="Yun control server (internal)", version="1")
    app.state.control = ctx
    install_problem_handlers(app)
    api = ApiBundle(ctx, nodes)

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    # In the order of how often they are asked: FastAPI tries routes one after the other
    # (≈ 2 µs each), and a VM's GET behind every other router cost ≈ 0.1 ms to find.
    # Paths of different routers never overlap (tests/unit/test_route_order.py), so the
    # order changes nothing else.
    for router in (component_router, task_router, vm_router, auth_router, tenancy_router,
                   account_router, audit_router, node_router, image_router,
                   tag_router, pool_router, vm_group_router, address_router,
                   router_router, router_sync_router, volume_router,
                   ssh_key_router):
        app.include_router(router(api))
    install_metrics(app, "control")
    return app
