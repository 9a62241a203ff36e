"""Tags (Z-TAG): key=value labels on any resource, kept in one table and queried in SQL."""

from __future__ import annotations

from collections.abc import Iterable

from sqlalchemy import bindparam, delete, select
from sqlalchemy.ext.asyncio import AsyncSession

from yun.control.db.models import TagRow
from yun.control.db.prepared import column_rows
from yun.proto.errors import Unprocessable
from yun.proto.resources import SYSTEM_TAG_PREFIX

MAX_TAGS = 50
# Columns, not entities: a page of 50 VMs carries a hundred tags or more, and an ORM
# instance per tag costs far more than its three strings.
_TAGS_OF = select(TagRow.resource_uuid, TagRow.key, TagRow.value).where(
    TagRow.resource_uuid.in_(bindparam("uuids", expanding=True))).order_by(TagRow.key)


async def tags_of(session: AsyncSession, uuids: Iterable[str]) -> dict[str, dict[str, str]]:
    """The tags of each resource, in one query."""
    wanted = list(dict.fromkeys(uuids))
    found: dict[str, dict[str, str]] = {u: {} for u in wanted}
    for chunk in range(0, len(wanted), 500):
        rows = await column_rows(session, _TAGS_OF, {"uuids": wanted[chunk:chunk + 500]})
        for resource_uuid, key, value in rows:
            found[resource_uuid][key] = value
    return found


async def update_tags(session: AsyncSession, resource_type: str, resource_uuid: str,
                      set_: dict[str, str], remove: Iterable[str] = ()) -> dict[str, str]:
    """Add or replace ``set_`` and delete ``remove``; return the tags as they are now."""
    current = (await tags_of(session, [resource_uuid]))[resource_uuid]
    removing = [k for k in remove if k in current]
    if removing:
        await session.execute(delete(TagRow).where(TagRow.resource_uuid == resource_uuid,
                                                   TagRow.key.in_(removing)))
    for key in removing:
        current.pop(key)
    for key, value in set_.items():
        row = await session.get(TagRow, (resource_uuid, key))
        if row is None:
            session.add(TagRow(resource_uuid=resource_uuid, key=key, value=value,
                               resource_type=resource_type))
        else:
            row.value = value
        current[key] = value
    if len(current) > MAX_TAGS:
        raise Unprocessable(f"a resource has at most {MAX_TAGS} tags; this one would have "
                            f"{len(current)}")
    return dict(sorted(current.items()))


async def replace_user_tags(session: AsyncSession, resource_type: str, resource_uuid: str,
                            tags: dict[str, str]) -> dict[str, str]:
    """Make the resource's non-platform tags exactly ``tags``; ``sys:`` tags stay."""
    current = (await tags_of(session, [resource_uuid]))[resource_uuid]
    stale = [k for k in current if not k.lower().startswith(SYSTEM_TAG_PREFIX)
             and k not in tags]
    return await update_tags(session, resource_type, resource_uuid, tags, stale)


async def drop_tags(session: AsyncSession, resource_uuid: str) -> None:
    """Forget every tag of a deleted resource."""
    await session.execute(delete(TagRow).where(TagRow.resource_uuid == resource_uuid))
