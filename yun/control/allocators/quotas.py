"""Quotas per project: limits and use of each resource, claimed in the same transaction
as what consumes them, by a conditional UPDATE, so concurrent requests never pass a limit."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping

from sqlalchemy import case, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from yun.control.db.models import ProjectRow, QuotaRow
from yun.proto.errors import YunError
from yun.proto.identity import Quota, QuotaLine, QuotaResource

log = logging.getLogger("yun.control.quotas")

UNLIMITED = -1
class QuotaExceeded(YunError):
    status = 409
    title = "Quota exceeded"


def vm_amounts(vcpus: int, memory_mb: int, disk_gb: int) -> dict[QuotaResource, int]:
    """What one VM counts against its project's quota."""
    return {QuotaResource.VMS: 1, QuotaResource.VCPUS: vcpus,
            QuotaResource.MEMORY_MB: memory_mb, QuotaResource.DISK_GB: disk_gb}


async def create_quota(session: AsyncSession, project_uuid: str,
                       limits: Mapping[QuotaResource, int]) -> None:
    for resource in QuotaResource:
        session.add(QuotaRow(project_uuid=project_uuid, resource=resource.value,
                             limit=limits.get(resource, UNLIMITED), used=0))


async def claim(session: AsyncSession, project: ProjectRow | str,
                amounts: Mapping[QuotaResource, int]) -> None:
    """Count ``amounts`` against the project's quota, or raise :class:`QuotaExceeded`
    naming the first limit it would pass (the caller's transaction then rolls back).

    One conditional UPDATE counts every resource: each row is counted only while it stays
    within its limit, and the rows it returns say which were; a VM create claims four
    resources, and four statements per create were a measurable share of the server's
    work at hundreds of creates per second."""
    project_uuid = project if isinstance(project, str) else project.uuid
    wanted = {resource.value: amount for resource, amount in amounts.items() if amount > 0}
    if not wanted:
        return
    await _lock(session, project_uuid, wanted)
    amount_of = case(wanted, value=QuotaRow.resource)
    counted = set((await session.scalars(
        update(QuotaRow)
        .where(QuotaRow.project_uuid == project_uuid, QuotaRow.resource.in_(wanted),
               (QuotaRow.limit < 0) | (QuotaRow.used + amount_of <= QuotaRow.limit))
        .values(used=QuotaRow.used + amount_of)
        .returning(QuotaRow.resource)
        .execution_options(synchronize_session=False))).all())
    for resource, amount in amounts.items():
        if amount <= 0 or resource.value in counted:
            continue
        row = await session.get(QuotaRow, (project_uuid, resource.value))
        name = project if isinstance(project, str) else project.name
        if row is None:
            raise QuotaExceeded(f"project {name} has no quota for {resource.value}")
        await session.refresh(row)
        raise QuotaExceeded(
            f"quota exceeded: project {name} may use {row.limit} {resource.value}, uses "
            f"{row.used}, and this request needs {amount} more",
            errors=[{"quota": resource.value, "limit": row.limit, "used": row.used,
                     "requested": amount}])


async def _lock(session: AsyncSession, project_uuid: str, resources: Iterable[str]) -> None:
    """Lock the project's quota rows of ``resources`` in one order, the same for every
    claim and release: concurrent multi-row UPDATEs lock rows in scan order and deadlock
    (PostgreSQL; SQLite has a single writer and needs no lock)."""
    if session.get_bind().dialect.name == "sqlite":
        return
    await session.execute(
        select(QuotaRow.resource).where(QuotaRow.project_uuid == project_uuid,
                                        QuotaRow.resource.in_(list(resources)))
        .order_by(QuotaRow.resource).with_for_update())


async def release(session: AsyncSession, project_uuid: str,
                  amounts: Mapping[QuotaResource, int]) -> None:
    """Give back what a deleted resource counted (never below zero)."""
    await _lock(session, project_uuid, [r.value for r, a in amounts.items() if a > 0])
    for resource, amount in amounts.items():
        if amount <= 0:
            continue
        await session.execute(
            update(QuotaRow)
            .where(QuotaRow.project_uuid == project_uuid, QuotaRow.resource == resource.value)
            .values(used=QuotaRow.used - amount)
            .execution_options(synchronize_session=False))
        await session.execute(
            update(QuotaRow)
            .where(QuotaRow.project_uuid == project_uuid, QuotaRow.used < 0)
            .values(used=0).execution_options(synchronize_session=False))


async def quota_of(session: AsyncSession, project: ProjectRow) -> Quota:
    rows = {r.resource: r for r in (await session.scalars(
        select(QuotaRow).where(QuotaRow.project_uuid == project.uuid))).all()}
    lines = [QuotaLine(resource=r, limit=rows[r.value].limit if r.value in rows else UNLIMITED,
                       used=rows[r.value].used if r.value in rows else 0)
             for r in QuotaResource]
    return Quota(project_uuid=project.uuid, project_name=project.name, lines=lines)


async def set_limits(session: AsyncSession, project: ProjectRow,
                     limits: Mapping[QuotaResource, int]) -> Quota:
    for resource, limit in limits.items():
        row = await session.get(QuotaRow, (project.uuid, resource.value))
        if row is None:
            session.add(QuotaRow(project_uuid=project.uuid, resource=resource.value,
                                 limit=limit, used=0))
        else:
            row.limit = limit
    await session.flush()
    log.info("quota changed", extra={"project": project.uuid, "project_name": project.name,
                                     "limits": {k.value: v for k, v in limits.items()}})
    return await quota_of(session, project)
