"""Server side of the internal protocol: problem answers and credential checks for FastAPI."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Awaitable, Callable, Iterable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from yun.proto import PROTOCOL_VERSION, VERSION_HEADER
from yun.proto.auth import Identity, Verifier
from yun.proto.components import ComponentType
from yun.proto.errors import (
    PROBLEM_MEDIA_TYPE,
    BadRequest,
    Forbidden,
    Problem,
    YunError,
)

log = logging.getLogger("yun.proto")


def problem_response(problem: Problem) -> JSONResponse:
    return JSONResponse(
        problem.model_dump(mode="json", exclude_none=True),
        status_code=problem.status,
        media_type=PROBLEM_MEDIA_TYPE,
    )


def install_problem_handlers(app: FastAPI) -> None:
    """Answer every error as application/problem+json, never with a stack trace."""

    @app.exception_handler(YunError)
    async def _yun_error(request: Request, exc: YunError) -> JSONResponse:
        if exc.status >= 500:
            log.warning("request failed: %s", exc.detail, extra={"path": request.url.path})
        return problem_response(exc.problem(instance=request.url.path))

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [
            {
                "field": ".".join(str(p) for p in err.get("loc", ()) if p != "body"),
                "message": err.get("msg", ""),
            }
            for err in exc.errors()
        ]
        detail = "; ".join(f"{e['field'] or 'body'}: {e['message']}" for e in errors)
        return problem_response(
            Problem(
                type="https://yun.dev/problems/invalid-request",
                title="Invalid request",
                status=422,
                detail=detail,
                instance=request.url.path,
                errors=errors,
            )
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return problem_response(
            Problem(title=str(exc.detail), status=exc.status_code, detail=str(exc.detail),
                    instance=request.url.path)
        )

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        # The details stay in the log: an answer must not leak internals (SQL, paths).
        error_id = uuid.uuid4().hex[:12]
        log.exception("unexpected error", extra={"path": request.url.path, "error_id": error_id})
        return problem_response(
            Problem(title="Internal error", status=500,
                    detail=f"unexpected {exc.__class__.__name__}; the server log has error "
                           f"{error_id}", instance=request.url.path)
        )


IDENTITY_SCOPE_KEY = "yun.identity"


def request_target(request: Request) -> str:
    """The path and query of ``request`` as the client sent them (what it signed)."""
    raw = request.scope.get("raw_path") or request.url.path.encode()
    query = request.scope.get("query_string") or b""
    return (raw + b"?" + query if query else raw).decode("latin-1")


def verified_caller(verifier: Verifier, request: Request) -> Identity:
    """The verified caller of ``request``, checked once per request (a second check
    would see the request's own nonce as a replay)."""
    cached = request.scope.get(IDENTITY_SCOPE_KEY)
    if isinstance(cached, Identity):
        return cached
    version = request.headers.get(VERSION_HEADER)
    if version is not None and version != str(PROTOCOL_VERSION):
        raise BadRequest(
            f"protocol version {version} is not supported; this component speaks "
            f"{PROTOCOL_VERSION}"
        )
    identity = verifier.verify(request.method, request_target(request), request.headers)
    request.scope[IDENTITY_SCOPE_KEY] = identity
    return identity


def peer_identity(
    verifier: Verifier, allowed: Iterable[ComponentType] | None = None,
) -> Callable[[Request], Awaitable[Identity]]:
    """A FastAPI dependency admitting only requests signed by a member of this domain.

    ``allowed`` limits which component types may call the route (F-ASSOC).
    """
    allowed_set = frozenset(allowed) if allowed is not None else None

    async def dependency(request: Request) -> Identity:
        identity = verified_caller(verifier, request)
        if allowed_set is not None and identity.component_type not in allowed_set:
            raise Forbidden(
                f"a {identity.component_type} component may not call {request.url.path}"
            )
        return identity

    return dependency
