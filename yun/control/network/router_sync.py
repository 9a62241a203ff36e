"""The control server's side of the routers' sync protocol.

A router pulls the whole rule set (``POST /internal/v1/router/rules`` with a
:class:`~yun.proto.network.RouterHello`): :func:`record_hello` records it and answers
:func:`~yun.control.network.router_rules.load_rule_set`. When the rules change, the
change's transaction notes it (:func:`yun.control.network.changes.note_change`) and the
caller then calls :func:`notify_routers`, which tells every known router to pull again.
Notices are best effort: a router that misses one catches up at its next periodic pull.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime, timedelta
from typing import Protocol

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from yun.config import ControlSettings
from yun.control.db.models import RouterRow
from yun.control.db.session import Database
from yun.control.network.changes import generation as current_generation
from yun.control.network.router_rules import load_rule_set
from yun.proto.components import ComponentType
from yun.proto.errors import YunError
from yun.proto.membership import Membership
from yun.proto.network import RouterHello, RouterList, RouterNotice, RouterRuleSet, RouterStatus

log = logging.getLogger("yun.control.routers")

NOTICE_TIMEOUT = 3.0  # seconds: a notice is best effort, the periodic pull is the backstop


class RouterControl(Protocol):
    """What :func:`notify_routers` needs of a control server (its ControlContext has it)."""

    settings: ControlSettings
    db: Database
    membership: Membership


def _now() -> datetime:
    return datetime.now(UTC)


def _aware(value: datetime | None) -> datetime | None:
    if value is not None and value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value


async def record_hello(session: AsyncSession, router_id: str, name: str, url: str,
                       hello: RouterHello) -> RouterRuleSet:
    """Record (or refresh) the router that pulled and answer the current rule set."""
    row = await session.get(RouterRow, router_id)
    if row is None:
        row = RouterRow(uuid=router_id, name=(name or router_id)[:63], url=url,
                        lan_address=hello.lan_address)
        session.add(row)
    else:
        if name:
            row.name = name[:63]
        if url:
            row.url = url
        row.lan_address = hello.lan_address
    row.applied_generation = hello.applied_generation
    row.last_seen_at = _now()
    return await load_rule_set(session)


async def router_urls(control: RouterControl) -> dict[str, str]:
    """The routers to notify: those that pulled within the router timeout, and the
    router peers of this control server's membership (a router that just joined)."""
    since = _now() - timedelta(seconds=control.settings.router_timeout)
    urls: dict[str, str] = {}
    async with control.db.session() as session:
        for uuid, url, seen in await session.execute(
                select(RouterRow.uuid, RouterRow.url, RouterRow.last_seen_at)):
            seen = _aware(seen)
            if url and seen is not None and seen >= since:
                urls[uuid] = url
    for peer in control.membership.peers_of(ComponentType.ROUTER):
        urls[peer.component_id] = peer.url
    return urls


async def notify_routers(control: RouterControl) -> int:
    """Tell every known router that the rule set changed (it pulls it then).

    Concurrent, short timeout, never raises: a router that is down or misses the notice
    catches up by itself at its next periodic pull. Returns how many routers took it."""
    try:
        urls = await router_urls(control)
        if not urls:
            return 0
        async with control.db.session() as session:
            notice = RouterNotice(generation=await current_generation(session))
    except Exception as exc:  # never fail the caller (a flow step) for a notice
        log.warning("could not list the routers to notify: %s", exc)
        return 0

    async def one(router_id: str, url: str) -> bool:
        try:
            await control.membership.client_for_url(url).request(
                "POST", "/internal/v1/notice", body=notice, timeout=NOTICE_TIMEOUT)
            return True
        except (YunError, OSError, RuntimeError) as exc:
            log.info("router did not take the change notice (it catches up by itself): %s",
                     exc, extra={"router": router_id, "generation": notice.generation})
            return False

    results = await asyncio.gather(*(one(i, u) for i, u in urls.items()),
                                   return_exceptions=True)
    return sum(1 for r in results if r is True)


async def list_routers(session: AsyncSession, router_timeout: float) -> RouterList:
    """Every known router with its applied generation against the current one."""
    gen = await current_generation(session)
    since = _now() - timedelta(seconds=router_timeout)
    items = []
    for row in await session.scalars(select(RouterRow).order_by(RouterRow.name)):
        seen = _aware(row.last_seen_at)
        items.append(RouterStatus(
            uuid=row.uuid, name=row.name, url=row.url, lan_address=row.lan_address,
            applied_generation=row.applied_generation, current_generation=gen,
            in_sync=row.applied_generation == gen,
            live=seen is not None and seen >= since,
            last_seen_at=seen.isoformat() if seen else None))
    return RouterList(items=items, generation=gen)
