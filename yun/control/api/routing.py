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
from datetime import datetime, timedelta
from typing import Any

from fastapi import Request, Response
from fastapi.routing import APIRoute
from sqlalchemy import delete, update
from sqlalchemy.exc import IntegrityError

from yun.control.db.idempotency import current_key, forget_expired, scoped_key
from yun.control.db.models import AuditRow, IdempotencyRow, utcnow
from yun.control.flows.engine import is_busy_violation
from yun.proto import REQUEST_ID_HEADER
from yun.proto.components import ComponentType
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
                try:
                    if key is not None and replayable and isinstance(ctx, RequestContext):
                        response = await _idempotent(control.db, request, ctx, key, handler)
                    else:
                        response = await handler(request)
                except IntegrityError as exc:
                    # A second unfinished flow of one resource, refused by the database:
                    # a concurrent request started one first.
                    if not is_busy_violation(exc):
                        raise
                    raise Conflict("the resource is busy with another task started at the "
                                   "same time; retry when it has finished") from None
            except YunError as exc:
                await _audit(control, request, ctx, action, exc.status, exc.detail)
                raise
            except Exception as exc:
                await _audit(control, request, ctx, action, 500,
                             f"unexpected {exc.__class__.__name__}")
                raise
            await _audit(control, request, ctx, action, response.status_code, None,
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


async def _idempotent(db: Any, request: Request, ctx: RequestContext, key: str,
                      handler: Callable[[Request], Coroutine[Any, Any, Response]]) -> Response:
    """Run the request once per (user, key); answer repeats with the first answer.

    The key row names the control server incarnation holding it while the request runs.
    A repeat that finds it held by an incarnation that is gone (a crash between storing
    the key and storing the answer) takes it over and carries the request out again: the
    services make that safe (a VM create finds the VM it made under the key)."""
    if not 1 <= len(key) <= 255:
        raise Unprocessable(f"{IDEMPOTENCY_HEADER} must have 1 to 255 characters")
    control = request.app.state.control
    me, boot = _incarnation(control)
    retention = timedelta(seconds=control.settings.idempotency_retention)
    scoped, fp = scoped_key(ctx.user_uuid, key), await _fingerprint(request)
    deadline = asyncio.get_running_loop().time() + REPEAT_WAIT
    while True:
        now = utcnow()
        try:
            async with db.session() as session:
                session.add(IdempotencyRow(key=scoped, user_uuid=ctx.user_uuid,
                                           fingerprint=fp, status_code=IN_PROGRESS, body={},
                                           owner=me, owner_boot=boot, created_at=now,
                                           expires_at=now + retention))
            break
        except IntegrityError:
            async with db.session() as session:
                row = await session.get(IdempotencyRow, scoped)
                if row is None:
                    continue  # the first attempt failed and released the key: run it now
                if row.expires_at is not None and row.expires_at <= now:
                    # Past retention: an expired key is a new key.
                    await forget_expired(session, now, scoped)
                    continue
                if row.fingerprint != fp:
                    raise Unprocessable(f"{IDEMPOTENCY_HEADER} '{key}' was already used for "
                                        "a different request") from None
                if row.status_code != IN_PROGRESS:
                    return Response(json.dumps(row.body), status_code=row.status_code,
                                    media_type="application/json",
                                    headers={"Idempotent-Replayed": "true"})
                holder, holder_boot = row.owner, row.owner_boot
            if _holder_is_gone(control, me, boot, holder, holder_boot) and \
                    await _take_over(db, scoped, holder, holder_boot, me, boot, now + retention):
                log.warning("taking over an Idempotency-Key left in progress by a control "
                            "server that is gone; carrying the request out again", extra={
                                "key": scoped, "user": ctx.user_uuid, "previous_owner": holder,
                                "previous_boot": holder_boot, "owner": me})
                break
            if asyncio.get_running_loop().time() > deadline:
                raise Conflict(f"a request with {IDEMPOTENCY_HEADER} '{key}' is still in "
                               "progress; retry later") from None
            await asyncio.sleep(0.05)
    token = current_key.set(scoped)
    try:
        response = await handler(request)
    except BaseException:
        # A refused or interrupted request is not recorded: a retry with the same key runs
        # it again (a refusal changed nothing; an interruption is rolled back by its flow).
        await _release(db, scoped, boot)
        raise
    finally:
        current_key.reset(token)
    if not 200 <= response.status_code < 300:
        await _release(db, scoped, boot)
        return response
    body = bytes(response.body) if response.body else b""
    async with db.session() as session:
        await session.execute(
            update(IdempotencyRow).where(IdempotencyRow.key == scoped,
                                         IdempotencyRow.owner_boot == boot)
            .values(status_code=response.status_code, body=json.loads(body) if body else None)
            .execution_options(synchronize_session=False))
    return response


def _incarnation(control: Any) -> tuple[str, str]:
    """This control server (component id) and this process of it (boot id)."""
    return (control.membership.component_id or "control", control.engine.boot_id)


def _holder_is_gone(control: Any, me: str, boot: str, holder: str | None,
                    holder_boot: str | None) -> bool:
    """Whether the incarnation holding a key in progress can no longer answer it: a
    previous life of this server, a control server that left, or a row from before
    holders were recorded."""
    if holder_boot == boot:
        return False  # this very process runs it: wait for it
    if holder is None or holder == me:
        return True
    alive = {p.component_id for p in control.membership.peers_of(ComponentType.CONTROL)}
    return holder not in alive


async def _take_over(db: Any, scoped: str, holder: str | None, holder_boot: str | None,
                     me: str, boot: str, expires_at: datetime) -> bool:
    """Claim a key held by a gone incarnation; False if another retry claimed it first."""
    async with db.session() as session:
        claim = update(IdempotencyRow).where(IdempotencyRow.key == scoped,
                                             IdempotencyRow.status_code == IN_PROGRESS)
        claim = claim.where(IdempotencyRow.owner.is_(None) if holder is None
                            else IdempotencyRow.owner == holder)
        claim = claim.where(IdempotencyRow.owner_boot.is_(None) if holder_boot is None
                            else IdempotencyRow.owner_boot == holder_boot)
        result = await session.execute(
            claim.values(owner=me, owner_boot=boot, expires_at=expires_at)
            .execution_options(synchronize_session=False))
        return bool(result.rowcount == 1)


async def _release(db: Any, scoped: str, boot: str) -> None:
    async with db.session() as session:
        await session.execute(delete(IdempotencyRow).where(
            IdempotencyRow.key == scoped, IdempotencyRow.owner_boot == boot,
            IdempotencyRow.status_code == IN_PROGRESS))


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


async def _audit(control: Any, request: Request, ctx: Any, action: str, status: int,
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
        await control.audit.write(action, lambda session: session.add(record))
    except Exception:
        log.exception("could not write the audit record", extra={"action": action,
                                                               "status": status})
