"""HTTP face of the domain server."""

from __future__ import annotations

from fastapi import Depends, FastAPI

from yun.domain.registry import Registry
from yun.proto.auth import Identity
from yun.proto.errors import Forbidden
from yun.proto.messages import (
    ComponentInfo,
    HeartbeatRequest,
    HeartbeatResponse,
    JoinRequest,
    JoinResponse,
)
from yun.proto.server import install_problem_handlers, peer_identity


def create_domain_app(registry: Registry) -> FastAPI:
    """The domain server's routes: join, heartbeat, leave and the component list."""
    app = FastAPI(title="Yun domain server", version="1")
    install_problem_handlers(app)
    auth = peer_identity(lambda: registry._secret)
    caller_dep = Depends(auth)

    def _self_only(caller: Identity, component_id: str) -> None:
        if caller.component_id != component_id:
            raise Forbidden(f"{caller.component_id} may not speak for {component_id}")

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok", "domain": registry.domain}

    @app.post("/v1/join", response_model=JoinResponse)
    async def join(req: JoinRequest) -> JoinResponse:
        return registry.join(req)

    @app.post("/v1/components/{component_id}/heartbeat", response_model=HeartbeatResponse)
    async def heartbeat(component_id: str, req: HeartbeatRequest, caller: Identity = caller_dep
                        ) -> HeartbeatResponse:
        _self_only(caller, component_id)
        member = registry.heartbeat(component_id, req.url)
        return HeartbeatResponse(peers=registry.peers_of(member), generation=registry.generation)

    @app.post("/v1/components/{component_id}/leave", status_code=204)
    async def leave(component_id: str, caller: Identity = caller_dep) -> None:
        _self_only(caller, component_id)
        registry.leave(component_id)

    @app.get("/v1/components", response_model=list[ComponentInfo])
    async def components(caller: Identity = caller_dep) -> list[ComponentInfo]:
        return [m.info() for m in registry.members.values()]

    return app
