"""Every request gets an id: the client's ``X-Request-Id`` when it is sane, else a new one.

The id is kept in the ASGI scope's state (``request.state.request_id``), travels to the
control server in the request context and the internal request-id header, lands in
the audit log, and is echoed in every answer, errors included.
"""

from __future__ import annotations

import re
import uuid

from starlette.datastructures import Headers, MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

PUBLIC_HEADER = "X-Request-Id"
_SANE = re.compile(r"[A-Za-z0-9._-]{1,64}")


def choose_request_id(offered: str | None) -> str:
    """``offered`` if it is a token of at most 64 ``[A-Za-z0-9._-]``, else a new uuid4 hex."""
    if offered is not None and _SANE.fullmatch(offered):
        return offered
    return uuid.uuid4().hex


class RequestIdMiddleware:
    """Pure ASGI: picks the request id before anything else runs and echoes it."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = choose_request_id(Headers(scope=scope).get(PUBLIC_HEADER))
        scope.setdefault("state", {})["request_id"] = request_id

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                MutableHeaders(scope=message)[PUBLIC_HEADER] = request_id
            await send(message)

        await self.app(scope, receive, send_with_id)


def request_id_of(scope: Scope) -> str:
    """The id :class:`RequestIdMiddleware` chose (a new one if it did not run)."""
    state = scope.setdefault("state", {})
    if "request_id" not in state:
        state["request_id"] = uuid.uuid4().hex
    return str(state["request_id"])
