"""The public REST API (C-GW): /api/v1, OpenAPI at /docs, problems as application/problem+json.

The gateway keeps no state but caches: it authenticates the caller (``auth``), refuses
malformed, oversized and excessive requests (``limits``), validates parameters against
the public models (``routers``) and forwards to a control server (``upstream``) with
the caller's signed context. Image bytes are streamed straight to the storage server
the control server chose, never buffered here. This module only wires the parts.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import ResponseValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Route

from yun.config import GatewaySettings
from yun.gateway.auth import Authenticator
from yun.gateway.limits import InputGuardMiddleware, RateLimitMiddleware
from yun.gateway.openapi import install_openapi
from yun.gateway.requestid import RequestIdMiddleware
from yun.gateway.routers import ROUTERS
from yun.gateway.upstream import Upstream
from yun.proto.components import ComponentType
from yun.proto.errors import PeerError, Problem, YunError
from yun.proto.membership import Membership
from yun.proto.server import install_problem_handlers, problem_response
from yun.util.metrics import install_metrics

log = logging.getLogger("yun.gateway")


def create_gateway_app(membership: Membership, settings: GatewaySettings) -> FastAPI:
    """The gateway's ASGI application, speaking to control servers through ``membership``."""
    app = FastAPI(
        title="Yun REST API", version="1", docs_url=None, redoc_url=None,
        description="Virtual machines, images, compute pools, zones, nodes, projects and "
                    "users of a Yun cloud. "
                    "Authenticate with a token from `POST /api/v1/auth/tokens` or a signed "
                    "API key request. Long operations answer 202 with a task; "
                    "`Idempotency-Key` makes a request repeatable.",
    )
    upstream = Upstream(membership)
    authenticator = Authenticator(upstream, settings)
    app.state.upstream = upstream
    app.state.authenticator = authenticator

    install_problem_handlers(app)
    _install_gateway_handlers(app)
    # Added innermost first: the request id is chosen before anything can refuse the request.
    app.add_middleware(InputGuardMiddleware, max_json_body=settings.max_json_body)
    app.add_middleware(RateLimitMiddleware, rate=settings.rate_limit,
                       burst=settings.rate_burst, identify=authenticator.cached_user)
    app.add_middleware(RequestIdMiddleware)

    @app.get("/healthz", include_in_schema=False)
    async def healthz() -> dict[str, Any]:
        return {"status": "ok",
                "control_servers": len(membership.peers_of(ComponentType.CONTROL))}

    for router in ROUTERS:
        app.include_router(router)
    _serve_docs_offline(app)
    install_openapi(app)
    # Outermost middleware: it also counts what the guards refused (400, 413, 429).
    install_metrics(app, "gateway", expose=settings.expose_metrics)
    return app


def _install_gateway_handlers(app: FastAPI) -> None:
    """Problem answers that also carry the headers HTTP asks for (``WWW-Authenticate``
    on 401, ``Allow`` on 405)."""

    @app.exception_handler(YunError)
    async def _yun_error(request: Request, exc: YunError) -> JSONResponse:
        if exc.status >= 500:
            log.warning("request failed: %s", exc.detail, extra={"path": request.url.path})
        response = problem_response(exc.problem(instance=request.url.path))
        if exc.status == 401:
            response.headers["WWW-Authenticate"] = 'Bearer realm="yun"'
        return response

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        detail = str(exc.detail)
        headers = dict(exc.headers or {})
        if exc.status_code == 405:
            allowed = allowed_methods(app, request)
            headers["Allow"] = ", ".join(allowed)
            detail = (f"{request.method} is not allowed on {request.url.path}; "
                      f"it accepts {', '.join(allowed)}")
        elif exc.status_code == 404:
            detail = f"no route {request.url.path}"
        response = problem_response(Problem(
            title=str(exc.detail), status=exc.status_code, detail=detail,
            instance=request.url.path))
        response.headers.update(headers)
        return response

    @app.exception_handler(ResponseValidationError)
    async def _malformed(request: Request, exc: ResponseValidationError) -> JSONResponse:
        error = PeerError("the control server answered something the API does not define")
        log.warning("malformed answer: %s", exc.errors()[:3], extra={"path": request.url.path})
        return problem_response(error.problem(instance=request.url.path))


def allowed_methods(app: FastAPI, request: Request) -> list[str]:
    """Every method some route accepts for the request's path (all routes, not the first)."""
    path = request.scope.get("path", "")
    routes = [*app.router.routes, *(r for router in ROUTERS for r in router.routes)]
    methods: set[str] = set()
    for route in routes:
        # Included routers are not flattened into app.router.routes (FastAPI >= 0.16x),
        # hence the routers' own routes, matched by their path pattern alone.
        if isinstance(route, Route) and route.methods and route.path_regex.match(path):
            methods |= route.methods
    return sorted(methods)


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
