"""HTTP face of the domain server.

Routes and who may call them:

=================================================  ===========================================
``GET /healthz``                                    anyone
``POST /v1/join/challenge``, ``POST /v1/join``      anyone (the proofs of the domain secret
                                                    decide; no client certificate yet)
``POST /v1/components/{id}/heartbeat``, ``.../leave``  the component ``id`` itself
``GET /v1/components``                              any member
``DELETE /v1/components/{id}``                      a control server (an operator's removal)
=================================================  ===========================================
"""

from __future__ import annotations

from fastapi import Depends, FastAPI

from yun.domain.registry import Registry
from yun.proto.auth import Identity, Verifier
from yun.proto.components import ComponentType
from yun.proto.errors import Forbidden
from yun.proto.messages import (
    ComponentInfo,
    HeartbeatRequest,
    HeartbeatResponse,
    JoinChallenge,
    JoinChallengeRequest,
    JoinRequest,
    JoinResponse,
)
from yun.proto.server import install_problem_handlers, peer_identity
from yun.util.metrics import install_metrics


def create_domain_app(registry: Registry, verifier: Verifier) -> FastAPI:
    """The domain server's routes: join, heartbeat, leave, removal and the component list."""
    app = FastAPI(title="Yun domain server", version="1")
    install_problem_handlers(app)
    caller_dep = Depends(peer_identity(verifier))
    control_dep = Depends(peer_identity(verifier, {ComponentType.CONTROL}))

    def _self_only(caller: Identity, component_id: str) -> None:
        if caller.component_id != component_id:
            raise Forbidden(f"{caller.component_id} may not speak for {component_id}")

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok", "domain": registry.domain}

    @app.post("/v1/join/challenge", response_model=JoinChallenge)
    async def join_challenge(req: JoinChallengeRequest) -> JoinChallenge:
        return registry.challenge(req)

    @app.post("/v1/join", response_model=JoinResponse)
    async def join(req: JoinRequest) -> JoinResponse:
        return registry.join(req)

    @app.post("/v1/components/{component_id}/heartbeat", response_model=HeartbeatResponse)
    async def heartbeat(component_id: str, req: HeartbeatRequest, caller: Identity = caller_dep
                        ) -> HeartbeatResponse:
        _self_only(caller, component_id)
        member = registry.heartbeat(component_id, req.url)
        renewed = registry.renewal(member)
        return HeartbeatResponse(
            peers=registry.peers_of(member), generation=registry.generation,
            revoked=list(registry.revoked.values()),
            revocation_generation=registry.revocation_generation,
            credential=renewed[0] if renewed else None,
            certificate_pem=renewed[1].decode() if renewed else None)

    @app.post("/v1/components/{component_id}/leave", status_code=204)
    async def leave(component_id: str, caller: Identity = caller_dep) -> None:
        _self_only(caller, component_id)
        registry.leave(component_id)

    @app.delete("/v1/components/{component_id}", status_code=204)
    async def remove(component_id: str, caller: Identity = control_dep) -> None:
        registry.remove(component_id, by=caller.component_id)

    @app.get("/v1/components", response_model=list[ComponentInfo])
    async def components(caller: Identity = caller_dep) -> list[ComponentInfo]:
        return [m.info() for m in registry.members.values()]

    install_metrics(app, "domain")
    return app
