"""Events (F-THIN alarms): what operators are told about, recorded by the control
server and listed by administrators (``GET /events``).

An alarm is a pair of events of one ``kind`` on one resource: ``raised`` (severity
warning) and later ``cleared`` (info). Storage directories of nodes raise
``storage.threshold`` when their use passes the node's threshold (see
:mod:`yun.control.services.nodes`)."""

from __future__ import annotations

import logging
from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, and_, true
from sqlalchemy.ext.asyncio import AsyncSession

from yun.control.access.policy import Permission, Scope, require
from yun.control.db.models import EventRow
from yun.control.db.session import Database
from yun.control.services.listing import ListParams, each, listed
from yun.proto.resources import Event, EventState, Page

log = logging.getLogger("yun.control.events")

STORAGE_THRESHOLD = "storage.threshold"


def record_event(session: AsyncSession, kind: str, state: EventState, resource_type: str,
                 resource_uuid: str | None, message: str,
                 data: dict[str, Any] | None = None) -> EventRow:
    """Add one event to ``session`` (committed with the caller's transaction); a raised
    alarm is a warning, anything else is information."""
    row = EventRow(kind=kind, state=state.value,
                   severity="warning" if state == EventState.RAISED else "info",
                   resource_type=resource_type, resource_uuid=resource_uuid,
                   message=message, data=dict(data or {}))
    session.add(row)
    return row


def event_filter(kind: str | None, resource: str | None,
                 since: datetime | None) -> ColumnElement[bool]:
    """The WHERE clause of the list's own filters (the ``q`` language filters more)."""
    clauses: list[ColumnElement[bool]] = []
    if kind:
        clauses.append(EventRow.kind == kind)
    if resource:
        clauses.append(EventRow.resource_uuid == resource)
    if since is not None:
        clauses.append(EventRow.at >= since)
    return and_(true(), *clauses)


async def list_events(db: Database, scope: Scope, params: ListParams, kind: str | None,
                      resource: str | None, since: datetime | None) -> Page[Event]:
    """The events, newest first (administrators of the platform only)."""
    require(scope.context, Permission.MANAGE_PLATFORM, "list events")
    return await listed(db, "event", scope, params, each(Event.model_validate),
                        event_filter(kind, resource, since))
