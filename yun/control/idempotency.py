"""Idempotency-Key (U-IDEMP): the first answer to a keyed request is recorded and replayed."""

from __future__ import annotations

import hashlib
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse
from sqlalchemy.exc import IntegrityError

from yun.control.db.models import IdempotencyRow
from yun.control.db.session import Database
from yun.proto.errors import Conflict, Unprocessable

HEADER = "Idempotency-Key"
IN_PROGRESS = 0


async def fingerprint(request: Request) -> str:
    body = await request.body()
    digest = hashlib.sha256()
    for part in (request.method.encode(), request.url.path.encode(),
                 str(request.url.query).encode(), body):
        digest.update(part)
        digest.update(b"\0")
    return digest.hexdigest()


async def idempotent(
    db: Database, request: Request, handler: Callable[[], Awaitable[tuple[int, Any]]]
) -> JSONResponse:
    """Run ``handler`` once per Idempotency-Key; replay its answer to repeats of the request."""
    key = request.headers.get(HEADER)
    if key is None:
        status, body = await handler()
        return JSONResponse(body, status_code=status)
    if not 1 <= len(key) <= 255:
        raise Unprocessable(f"{HEADER} must have 1 to 255 characters")
    fp = await fingerprint(request)
    try:
        async with db.session() as session:
            session.add(IdempotencyRow(key=key, fingerprint=fp, status_code=IN_PROGRESS,
                                       body=None))
    except IntegrityError:
        async with db.session() as session:
            row = await session.get(IdempotencyRow, key)
            if row is None:  # removed by a failed first attempt in between: try again
                return await idempotent(db, request, handler)
            if row.fingerprint != fp:
                raise Unprocessable(
                    f"{HEADER} '{key}' was already used for a different request") from None
            if row.status_code == IN_PROGRESS:
                raise Conflict(f"a request with {HEADER} '{key}' is still in progress") from None
            return JSONResponse(row.body, status_code=row.status_code,
                                headers={"Idempotent-Replayed": "true"})
    try:
        status, body = await handler()
    except BaseException:
        # A refused or interrupted request is not recorded: the client may retry it with
        # the same key (a refusal changed nothing; an interruption is rolled back by its flow).
        async with db.session() as session:
            row = await session.get(IdempotencyRow, key)
            if row is not None:
                await session.delete(row)
        raise
    async with db.session() as session:
        row = await session.get(IdempotencyRow, key)
        if row is not None:
            row.status_code, row.body = status, body
    return JSONResponse(body, status_code=status)
