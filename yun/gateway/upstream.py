"""The one way the gateway calls a control server: ``Upstream.call``.

Every public route forwards to the same path under ``/internal/v1``. The internal
path is built from a constant template whose placeholders are filled only with values
that passed the reference rules (a name or uuid, or a canonical uuid for ``*_uuid``
placeholders) and are then percent-encoded whole, so no user input can add a query,
cut the path with ``#`` or climb with ``..``. The caller's identity travels in
``X-Yun-Context``, covered by the gateway's request signature; the control server trusts
nothing else about the user.
"""

from __future__ import annotations

import itertools
import json as json_module
import logging
import re
import time
from collections.abc import Mapping
from typing import Any
from urllib.parse import quote

from pydantic import BaseModel

from yun.proto.client import error_for
from yun.proto.components import ComponentType
from yun.proto.context import CONTEXT_HEADER, AnonymousContext, RequestContext, encode_context
from yun.proto.errors import PeerError, Unavailable, Unprocessable
from yun.proto.http11 import Answer, NoAnswer, NotSent
from yun.proto.membership import Membership
from yun.proto.messages import NAME_PATTERN
from yun.util.ids import uuid_problem
from yun.util.metrics import UPSTREAM_SECONDS

log = logging.getLogger("yun.gateway")

INTERNAL_PREFIX = "/internal/v1"
DEFAULT_TIMEOUT = 30.0
IDEMPOTENCY_HEADER = "Idempotency-Key"
REPLAYED_HEADER = "Idempotent-Replayed"
REF_MAX_LENGTH = 63

_PLACEHOLDER = re.compile(r"\{([a-z_]+)\}")
_TEMPLATE = re.compile(r"^(/[a-z-]+|/\{[a-z_]+\})+$")
_REF = re.compile(NAME_PATTERN)


class Reply:
    """A control server's successful answer: status, body and whether it replays the
    first answer to an ``Idempotency-Key``.

    ``data`` is the body decoded (JSON, text or None). A JSON body is also kept as
    received (``json``): a relayed answer is checked and written again straight from
    those bytes (:func:`yun.gateway.routers.common.answer`), never decoded into Python
    objects first.
    """

    __slots__ = ("_data", "json", "replayed", "status")

    def __init__(self, status: int, data: Any = None, replayed: bool = False, *,
                 json: bytes | None = None) -> None:
        self.status, self.replayed, self.json = status, replayed, json
        self._data = data

    @property
    def data(self) -> Any:
        if self._data is None and self.json is not None:
            self._data = json_module.loads(self.json)
        return self._data

    def __repr__(self) -> str:
        return f"Reply(status={self.status}, replayed={self.replayed})"


def placeholder_problem(name: str, value: object) -> str | None:
    """Why ``value`` may not fill the placeholder ``name`` of a path, or None if it may."""
    if not isinstance(value, str):
        return f"{name}: expected a string"
    if name.endswith("uuid"):
        return uuid_problem(value, name)
    if not 1 <= len(value) <= REF_MAX_LENGTH or not _REF.fullmatch(value):
        # fullmatch, not match: ``$`` alone would also accept a final newline.
        return (f"invalid {name} {value[:80]!r}: expected a uuid or a name of letters, "
                f"digits, '.', '_' and '-' (at most {REF_MAX_LENGTH} characters)")
    return None


def fill_path(template: str, values: Mapping[str, str] | None = None) -> str:
    """``template`` with each ``{name}`` replaced by the checked, percent-encoded value.

    Raises :class:`Unprocessable` naming the parameter when a value is not acceptable.
    """
    if not _TEMPLATE.match(template):
        raise ValueError(f"not a path template: {template!r}")
    values = values or {}
    names = _PLACEHOLDER.findall(template)
    if set(names) != set(values):
        raise ValueError(f"template {template!r} needs {sorted(names)}, got {sorted(values)}")
    for name in names:
        problem = placeholder_problem(name, values[name])
        if problem is not None:
            raise Unprocessable(problem, errors=[{"field": f"path.{name}", "message": problem}])
    return _PLACEHOLDER.sub(lambda m: quote(values[m[1]], safe=""), template)


def _payload(body: BaseModel | Mapping[str, Any] | None) -> Any:
    if isinstance(body, BaseModel):
        # Only what the client set: the control server applies the same defaults, and a
        # PATCH must not turn an omitted field into an explicit null.
        return body.model_dump(mode="json", exclude_unset=True)
    return dict(body) if body is not None else None


def _reply(resp: Answer, replayed: bool) -> Reply:
    if resp.status_code == 204 or not resp.content:
        return Reply(resp.status_code, None, replayed)
    media = resp.headers.get("content-type", "").split(";")[0].strip().lower()
    if media == "application/json" or media.endswith("+json"):
        return Reply(resp.status_code, replayed=replayed, json=resp.content)
    return Reply(resp.status_code, resp.text, replayed)


class Upstream:
    """Calls control servers for the gateway, in turn, skipping unreachable ones."""

    def __init__(self, membership: Membership) -> None:
        self.membership = membership
        self._turn = itertools.count()

    async def call(
        self,
        ctx: RequestContext | AnonymousContext,
        method: str,
        template: str,
        *,
        path: Mapping[str, str] | None = None,
        params: Mapping[str, Any] | None = None,
        body: BaseModel | Mapping[str, Any] | None = None,
        idempotency_key: str | None = None,
        timeout: float | None = None,
    ) -> Reply:
        """Send ``method`` to ``/internal/v1`` + the filled ``template`` on a control server.

        Errors the control server answers come back as the same :class:`YunError`; no
        control server at all is :class:`Unavailable` (503).
        """
        url = INTERNAL_PREFIX + fill_path(template, path)
        component_id = self.membership.component_id
        if component_id is None:
            raise Unavailable("the gateway has not joined its work domain yet; try again shortly")
        peers = self.membership.peers_of(ComponentType.CONTROL)
        if not peers:
            raise Unavailable("no control server is available; try again shortly")
        extra = {CONTEXT_HEADER: encode_context(ctx)}
        if idempotency_key is not None:
            extra[IDEMPOTENCY_HEADER] = idempotency_key
        start = next(self._turn) % len(peers)
        for peer in peers[start:] + peers[:start]:
            client = self.membership.client(peer)
            headers = {**client.headers(ctx.request_id or None), **extra}
            sent = time.perf_counter()
            status = "error"  # no answer (connection refused, timeout, broken off)
            try:
                resp = await client.send(
                    method, url, json=_payload(body), params=_query(params), headers=headers,
                    timeout=timeout if timeout is not None else DEFAULT_TIMEOUT)
                status = str(resp.status_code)
            except NotSent as exc:
                # Nothing was sent, so even a POST may go to the next control server.
                log.warning("control server unreachable: %s", exc,
                            extra={"peer": peer.url, "request_id": ctx.request_id})
                continue
            except NoAnswer as exc:
                raise PeerError(f"control server {peer.name} did not answer "
                                f"{method} {url}: {exc}") from exc
            finally:
                # The template, not the filled path: a bounded label.
                UPSTREAM_SECONDS.labels(method, template, status).observe(
                    time.perf_counter() - sent)
            if not resp.is_success:
                raise error_for(resp, f"control server {peer.name}")
            replayed = resp.headers.get(REPLAYED_HEADER.lower(), "").lower() == "true"
            return _reply(resp, replayed)
        raise Unavailable("no control server is reachable; try again shortly")


def _query(params: Mapping[str, Any] | None) -> dict[str, Any] | None:
    if not params:
        return None
    out: dict[str, Any] = {}
    for key, value in params.items():
        if value is None:
            continue
        # httpx would send True as "True"; FastAPI on the other side expects "true".
        out[key] = ("true" if value else "false") if isinstance(value, bool) else value
    return out
