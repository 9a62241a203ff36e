"""Rows a test or benchmark writes straight into a migrated control database."""

from __future__ import annotations

from sqlalchemy import insert, select
from sqlalchemy.ext.asyncio import AsyncSession

from yun.control.db.models import ImageRow, PoolRow, ProjectRow


async def default_project_pool_image(session: AsyncSession,
                                     image_uuid: str = "img") -> tuple[str | None, str]:
    """Add an active image ``image_uuid`` (named the same) to the ``default`` project;
    return that project's and the ``default`` pool's uuids, for the VM and node rows
    the caller writes next."""
    project = (await session.scalars(select(ProjectRow.uuid))).first()
    pool = (await session.scalars(select(PoolRow.uuid).where(PoolRow.name == "default"))).one()
    await session.execute(insert(ImageRow), [dict(uuid=image_uuid, name=image_uuid,
                                                  status="active", project_uuid=project)])
    return project, pool
