"""VM groups: affinity (members on one node) and anti-affinity (each on its own node)."""

from __future__ import annotations

import logging
import uuid as uuidlib

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from yun.control.access.policy import (
    Permission,
    Scope,
    require_in_project,
    require_project_write,
)
from yun.control.context import ControlContext
from yun.control.db.models import VmGroupRow, VmRow
from yun.control.db.tags import drop_tags, tags_of, update_tags
from yun.control.services.common import find
from yun.proto.errors import Conflict
from yun.proto.resources import GroupPolicy, VmGroup, VmGroupCreate

log = logging.getLogger("yun.control.vm_groups")


async def vm_group_models(session: AsyncSession, rows: list[VmGroupRow]) -> list[VmGroup]:
    uuids = [r.uuid for r in rows]
    members: dict[str, list[str]] = {}
    if uuids:
        for vm_uuid, group_uuid in (await session.execute(
                select(VmRow.uuid, VmRow.group_uuid).where(VmRow.group_uuid.in_(uuids))
                .order_by(VmRow.created_at))).all():
            if group_uuid:
                members.setdefault(group_uuid, []).append(vm_uuid)
    tags = await tags_of(session, uuids)
    return [VmGroup(uuid=r.uuid, name=r.name, description=r.description,
                    project_uuid=r.project_uuid, tags=tags.get(r.uuid, {}),
                    created_at=r.created_at, updated_at=r.updated_at,
                    policy=GroupPolicy(r.policy), members=members.get(r.uuid, []))
            for r in rows]


class VmGroupService:
    def __init__(self, ctx: ControlContext) -> None:
        self.ctx = ctx

    async def create(self, req: VmGroupCreate, scope: Scope) -> VmGroup:
        user = scope.context
        require_project_write(user, "create VM groups")
        async with self.ctx.db.session() as session:
            taken = (await session.scalars(select(VmGroupRow.uuid).where(
                VmGroupRow.project_uuid == user.project_uuid,
                VmGroupRow.name == req.name))).first()
            if taken:
                raise Conflict(f"project {user.project_name} already has a VM group named "
                               f"{req.name}")
            row = VmGroupRow(uuid=str(uuidlib.uuid4()), name=req.name,
                             description=req.description, project_uuid=user.project_uuid,
                             policy=req.policy)
            session.add(row)
            if req.tags:
                await update_tags(session, "vm_group", row.uuid, req.tags)
            await session.flush()
            log.info("VM group created", extra={"vm_group": row.uuid, "vm_group_name": row.name,
                                                "policy": row.policy})
            return (await vm_group_models(session, [row]))[0]

    async def get(self, ref: str, scope: Scope) -> VmGroup:
        async with self.ctx.db.reading() as session:
            return (await vm_group_models(session, [await find(
                session, VmGroupRow, ref, "VM group", scope)]))[0]

    async def delete(self, ref: str, scope: Scope) -> VmGroup:
        async with self.ctx.db.session() as session:
            row = await find(session, VmGroupRow, ref, "VM group", scope)
            require_in_project(scope.context, Permission.WRITE, row.project_uuid,
                               what=f"delete VM group {row.name}")
            await session.refresh(row, with_for_update=True)
            members = (await session.scalars(select(VmRow.name).where(
                VmRow.group_uuid == row.uuid).limit(5))).all()
            if members:
                raise Conflict(f"VM group {row.name} still has VMs: {', '.join(members)}")
            model = (await vm_group_models(session, [row]))[0]
            await drop_tags(session, row.uuid)
            await session.delete(row)
            log.info("VM group deleted", extra={"vm_group": row.uuid, "vm_group_name": row.name})
            return model
