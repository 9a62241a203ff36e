"""The route class of the control server's user API: every mutation is made repeatable
by its Idempotency-Key (U-IDEMP) and written to the audit log, in one place.

An action's name is its route's name (``vm.create``); a handler that knows the resource
it touched says so with :func:`audit_resource`.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import Request, Response
from fastapi.routing import APIRoute
from sqlalchemy.exc import IntegrityError

from yun.control.db.models import AuditRow, IdempotencyRow
from yun.proto import REQUEST_ID_HEADER
from yun.proto.context import CONTEXT_HEADER, RequestContext, decode_context
from yun.proto.errors import Conflict, Unprocessable, YunError
from yun.proto.server import verified_caller

log = logging.getLogger("yun.control.api")

MUTATING = frozenset({"POST", "PUT", "PATCH", "DELETE"})
IDEMPOTENCY_HEADER = "Idempotency-Key"
IN_PROGRESS = 0
# How long a repeat waits for the first request with its key to finish before answering
# 409: long enough for any request that only starts a task.
REPEAT_WAIT = 15.0
# Routes that keep their own idempotency (an upload records its key with the image).
NOT_REPLAYED = frozenset({"image.create", "auth.login"})


def audit_resource(request: Request, resource_type: str, resource_uuid: str | None,
                   project_uuid: str | None = None) -> None:
    """Name the resource a mutating request touched, for its audit record."""
    request.state.audit_resource = (resource_type, resource_uuid, project_uuid)


class ControlRoute(APIRoute):
    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()
        action = self.name
        replayable = action not in NOT_REPLAYED

        async def route(request: Request) -> Response:
            if request.method not in MUTATING:
                return await handler(request)
            control = request.app.state.control
            ctx = _context(control, request)
            key = request.headers.get(IDEMPOTENCY_HEADER)
            try:
                if key is not None and replayable and isinstance(ctx, RequestContext):
                    response = await _idempotent(control.db, request, ctx, key, handler)
                else:
                    response = await handler(request)
            except YunError as exc:
                await _audit(control.db, request, ctx, action, exc.status, exc.detail)
                raise
            except Exception as exc:
                await _audit(control.db, request, ctx, action, 500,
                             f"unexpected {exc.__class__.__name__}")
                raise
            await _audit(control.db, request, ctx, action, response.status_code, None,
                         _answered_uuid(response))
            return response

        return route


def _context(control: Any, request: Request) -> Any:
    """The verified context, or None (the route's own dependency refuses a bad one).

    The request is verified here, once; the route's dependency reuses the result.
    """
    header = request.headers.get(CONTEXT_HEADER)
    if not header:
        return None
    try:
        caller = verified_caller(control.membership.verifier, request)
        return decode_context(header, caller.component_type)
    except YunError:
        return None


async def _fingerprint(request: Request) -> str:
    digest = hashlib.sha256()
    for part in (request.method.encode(), request.url.path.encode(),
                 str(request.url.query).encode(), await request.body()):
        digest.update(part)
        digest.update(b"\0")
    return digest.hexdigest()


def _scoped_key(user_uuid: str, key: str) -> str:
    return hashlib.sha256(f"{user_uuid}\0{key}".encode()).hexdigest()


async def _idempotent(db: Any, request: Request, ctx: RequestContext, key: str,
                      handler: Callable[[Request], Coroutine[Any, Any, Response]]) -> Response:
    """Run the request once per (user, key); answer repeats with the first answer."""
    if not 1 <= len(key) <= 255:
        raise Unprocessable(f"{IDEMPOTENCY_HEADER} must have 1 to 255 characters")
    scoped, fp = _scoped_key(ctx.user_uuid, key), await _fingerprint(request)
    deadline = asyncio.get_running_loop().time() + REPEAT_WAIT
    while True:
        try:
            async with db.session() as session:
                session.add(IdempotencyRow(key=scoped, user_uuid=ctx.user_uuid,
                                           fingerprint=fp, status_code=IN_PROGRESS, body={}))
            break
        except IntegrityError:
            async with db.session() as session:
                row = await session.get(IdempotencyRow, scoped)
                if row is None:
                    continue  # the first attempt failed and released the key: run it now
                if row.fingerprint != fp:
                    raise Unprocessable(f"{IDEMPOTENCY_HEADER} '{key}' was already used for "
                                        "a different request") from None
                if row.status_code != IN_PROGRESS:
                    return Response(json.dumps(row.body), status_code=row.status_code,
                                    media_type="application/json",
                                    headers={"Idempotent-Replayed": "true"})
            if asyncio.get_running_loop().time() > deadline:
                raise Conflict(f"a request with {IDEMPOTENCY_HEADER} '{key}' is still in "
                               "progress; retry later") from None
            await asyncio.sleep(0.05)
    try:
        response = await handler(request)
    except BaseException:
        # A refused or interrupted request is not recorded: a retry with the same key runs
        # it again (a refusal changed nothing; an interruption is rolled back by its flow).
        await _release(db, scoped)
        raise
    if not 200 <= response.status_code < 300:
        await _release(db, scoped)
        return response
    body = bytes(response.body) if response.body else b""
    async with db.session() as session:
        row = await session.get(IdempotencyRow, scoped)
        if row is not None:
            row.status_code = response.status_code
            row.body = json.loads(body) if body else None
    return response


async def _release(db: Any, scoped: str) -> None:
    async with db.session() as session:
        row = await session.get(IdempotencyRow, scoped)
        if row is not None:
            await session.delete(row)


def _answered_uuid(response: Response) -> tuple[str | None, str | None]:
    """The uuid and project of the resource a JSON answer describes (for replayed answers,
    whose handler did not run)."""
    try:
        body = json.loads(bytes(response.body)) if response.body else None
    except ValueError:
        return None, None
    if isinstance(body, dict):
        resource = body.get("resource")
        item: dict[str, Any] = resource if isinstance(resource, dict) else body
        uuid, project = item.get("uuid"), item.get("project_uuid")
        return (uuid if isinstance(uuid, str) else None,
                project if isinstance(project, str) else None)
    return None, None


async def _audit(db: Any, request: Request, ctx: Any, action: str, status: int,
                 detail: str | None,
                 answered: tuple[str | None, str | None] = (None, None)) -> None:
    """One audit record for a mutating request; a failure to write it is logged, not
    answered (the request itself has happened)."""
    resource_type, resource_uuid, project_uuid = getattr(
        request.state, "audit_resource", (None, None, None))
    if resource_uuid is None:
        resource_uuid = answered[0] or request.path_params.get("ref") or \
            request.path_params.get("assignment_uuid") or request.path_params.get("token_uuid")
        project_uuid = project_uuid or answered[1]
    user = ctx if isinstance(ctx, RequestContext) else None
    record = AuditRow(
        request_id=(getattr(ctx, "request_id", "") or request.headers.get(REQUEST_ID_HEADER, "")
                    )[:64],
        user_uuid=user.user_uuid if user else None, user_name=user.user_name if user else None,
        project_uuid=project_uuid or (user.project_uuid if user else None), action=action,
        resource_type=resource_type or action.split(".")[0], resource_uuid=resource_uuid,
        source_ip=getattr(ctx, "source_ip", None), status=status,
        result="ok" if status < 400 else "error", detail=(detail or None) and detail[:2000])
    try:
        async with db.session() as session:
            session.add(record)
    except Exception:
        log.exception("could not write the audit record", extra={"action": action,
                                                               "status": status})
