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
from yun.proto.auth import SCHEME, Identity, verify_credential
from yun.proto.components import ComponentType
from yun.proto.errors import (
    PROBLEM_MEDIA_TYPE,
    BadRequest,
    Forbidden,
    Problem,
    Unauthorized,
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


def peer_identity(
    secret_provider: Callable[[], str | None],
    allowed: Iterable[ComponentType] | None = None,
) -> Callable[[Request], Awaitable[Identity]]:
    """A FastAPI dependency admitting only requests signed with a credential of this domain.

    ``allowed`` limits which component types may call the route (F-ASSOC).
    """
    allowed_set = frozenset(allowed) if allowed is not None else None

    async def dependency(request: Request) -> Identity:
        version = request.headers.get(VERSION_HEADER)
        if version is not None and version != str(PROTOCOL_VERSION):
            raise BadRequest(
                f"protocol version {version} is not supported; this component speaks "
                f"{PROTOCOL_VERSION}"
            )
        secret = secret_provider()
        if secret is None:
            raise Unauthorized("this component has not joined a domain yet")
        header = request.headers.get("Authorization", "")
        scheme, _, credential = header.partition(" ")
        if scheme != SCHEME or not credential:
            raise Unauthorized(f"missing '{SCHEME}' credential in the Authorization header")
        identity = verify_credential(secret, credential.strip())
        if allowed_set is not None and identity.component_type not in allowed_set:
            raise Forbidden(
                f"a {identity.component_type} component may not call {request.url.path}"
            )
        return identity

    return dependency
