"""Lists of every resource through the one query language (Z-QUERY): which fields each
resource exposes to ``q`` and ``sort``, and the page they make."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from sqlalchemy import ColumnElement, and_
from sqlalchemy.ext.asyncio import AsyncSession

from yun.control.access.policy import Scope
from yun.control.access.visibility import visible
from yun.control.db.models import (
    AddressPoolRow,
    ApiKeyRow,
    AuditRow,
    DepartmentRow,
    EventRow,
    FlowRow,
    ImageRow,
    NodeRow,
    PoolRow,
    ProjectRow,
    PublicIpRow,
    RoleAssignmentRow,
    SshKeyRow,
    TokenRow,
    UserRow,
    VmGroupRow,
    VmRow,
    VolumeRow,
    ZoneRow,
)
from yun.control.db.query import Field, PageResult, Queryable, fetch_page
from yun.control.db.session import Database
from yun.proto.identity import Role
from yun.proto.query import SortKey
from yun.proto.resources import (
    AddressPoolKind,
    GroupPolicy,
    ImageStatus,
    NetworkMode,
    NodeAdminState,
    NodeStatus,
    Page,
    StorageMode,
    TaskState,
    VmState,
    VolumeKind,
    VolumeStatus,
)

T = TypeVar("T")

NEWEST_FIRST = (SortKey("created_at", True),)


def _enum(column: Any, values: Any) -> Field:
    return Field(column, "enum", frozenset(v.value for v in values))


def _common(model: Any) -> dict[str, Field]:
    return {"uuid": Field(model.uuid), "name": Field(model.name),
            "description": Field(model.description, sortable=False),
            "created_at": Field(model.created_at, "datetime"),
            "updated_at": Field(model.updated_at, "datetime")}


QUERYABLES: dict[str, Queryable] = {
    "vm": Queryable(VmRow, {
        **_common(VmRow), "state": _enum(VmRow.state, VmState),
        "power_state": Field(VmRow.power_state), "vcpus": Field(VmRow.vcpus, "int"),
        "memory_mb": Field(VmRow.memory_mb, "int"), "disk_gb": Field(VmRow.disk_gb, "int"),
        "image_uuid": Field(VmRow.image_uuid), "node_uuid": Field(VmRow.node_uuid),
        "ip": Field(VmRow.ip), "mac": Field(VmRow.mac), "project_uuid": Field(VmRow.project_uuid),
        "pool_uuid": Field(VmRow.pool_uuid), "group_uuid": Field(VmRow.group_uuid),
        "error": Field(VmRow.error, sortable=False),
    }, VmRow.uuid, NEWEST_FIRST, VmRow.uuid, "vm"),
    "image": Queryable(ImageRow, {
        **_common(ImageRow), "status": _enum(ImageRow.status, ImageStatus),
        "format": Field(ImageRow.format), "size": Field(ImageRow.size, "int"),
        "virtual_size": Field(ImageRow.virtual_size, "int"), "sha256": Field(ImageRow.sha256),
        "visibility": Field(ImageRow.visibility), "project_uuid": Field(ImageRow.project_uuid),
    }, ImageRow.uuid, NEWEST_FIRST, ImageRow.uuid, "image"),
    "node": Queryable(NodeRow, {
        **_common(NodeRow), "status": _enum(NodeRow.status, NodeStatus),
        "hypervisor": Field(NodeRow.hypervisor), "accel": Field(NodeRow.accel),
        "admin_state": _enum(NodeRow.admin_state, NodeAdminState),
        "pool_uuid": Field(NodeRow.pool_uuid),
        "cpu_load": Field(NodeRow.cpu_load, "float"), "url": Field(NodeRow.url),
        "last_report_at": Field(NodeRow.last_report_at, "datetime"),
    }, NodeRow.uuid, (SortKey("name", False),), NodeRow.uuid, "node"),
    "zone": Queryable(ZoneRow, _common(ZoneRow), ZoneRow.uuid, (SortKey("name", False),),
                      ZoneRow.uuid, "zone"),
    "pool": Queryable(PoolRow, {
        **_common(PoolRow), "zone_uuid": Field(PoolRow.zone_uuid),
        "network_mode": _enum(PoolRow.network_mode, NetworkMode),
        "storage_mode": _enum(PoolRow.storage_mode, StorageMode),
        "ha": Field(PoolRow.ha, "bool"), "thin": Field(PoolRow.thin, "bool"),
        "cpu_ratio": Field(PoolRow.cpu_ratio, "float"),
        "memory_ratio": Field(PoolRow.memory_ratio, "float"),
    }, PoolRow.uuid, (SortKey("name", False),), PoolRow.uuid, "pool"),
    "address_pool": Queryable(AddressPoolRow, {
        **_common(AddressPoolRow), "kind": _enum(AddressPoolRow.kind, AddressPoolKind),
        "network": Field(AddressPoolRow.network),
    }, AddressPoolRow.uuid, (SortKey("name", False),), AddressPoolRow.uuid, "address_pool"),
    # Rows of public_ips; the elastic IP routes add ``kind = 'eip'`` to the scope.
    "eip": Queryable(PublicIpRow, {
        **_common(PublicIpRow), "ip": Field(PublicIpRow.ip),
        "address_pool_uuid": Field(PublicIpRow.address_pool_uuid),
        "project_uuid": Field(PublicIpRow.project_uuid), "vm_uuid": Field(PublicIpRow.vm_uuid),
    }, PublicIpRow.uuid, NEWEST_FIRST, PublicIpRow.uuid, "eip"),
    "vm_group": Queryable(VmGroupRow, {
        **_common(VmGroupRow), "policy": _enum(VmGroupRow.policy, GroupPolicy),
        "project_uuid": Field(VmGroupRow.project_uuid),
    }, VmGroupRow.uuid, NEWEST_FIRST, VmGroupRow.uuid, "vm_group"),
    "task": Queryable(FlowRow, {
        "uuid": Field(FlowRow.uuid), "kind": Field(FlowRow.kind),
        "resource_type": Field(FlowRow.resource_type),
        "resource_uuid": Field(FlowRow.resource_uuid),
        "project_uuid": Field(FlowRow.project_uuid),
        "state": _enum(FlowRow.state, TaskState), "current_step": Field(FlowRow.current_step),
        "created_at": Field(FlowRow.created_at, "datetime"),
        "updated_at": Field(FlowRow.updated_at, "datetime"),
        "finished_at": Field(FlowRow.finished_at, "datetime"),
    }, FlowRow.uuid, NEWEST_FIRST),
    "department": Queryable(DepartmentRow, _common(DepartmentRow), DepartmentRow.uuid,
                            (SortKey("name", False),), DepartmentRow.uuid, "department"),
    "project": Queryable(ProjectRow, {
        **_common(ProjectRow), "department_uuid": Field(ProjectRow.department_uuid),
    }, ProjectRow.uuid, (SortKey("name", False),), ProjectRow.uuid, "project"),
    "user": Queryable(UserRow, {
        **_common(UserRow), "department_uuid": Field(UserRow.department_uuid),
        "enabled": Field(UserRow.enabled, "bool"), "email": Field(UserRow.email),
    }, UserRow.uuid, (SortKey("name", False),), UserRow.uuid, "user"),
    "role_assignment": Queryable(RoleAssignmentRow, {
        "uuid": Field(RoleAssignmentRow.uuid), "user_uuid": Field(RoleAssignmentRow.user_uuid),
        "role": _enum(RoleAssignmentRow.role, Role),
        "project_uuid": Field(RoleAssignmentRow.project_uuid),
        "department_uuid": Field(RoleAssignmentRow.department_uuid),
        "created_at": Field(RoleAssignmentRow.created_at, "datetime"),
    }, RoleAssignmentRow.uuid, NEWEST_FIRST),
    "key": Queryable(ApiKeyRow, {
        **_common(ApiKeyRow), "access_key": Field(ApiKeyRow.access_key),
        "enabled": Field(ApiKeyRow.enabled, "bool"),
        "project_uuid": Field(ApiKeyRow.project_uuid),
        "last_used_at": Field(ApiKeyRow.last_used_at, "datetime"),
    }, ApiKeyRow.uuid, NEWEST_FIRST),
    "ssh_key": Queryable(SshKeyRow, {
        "uuid": Field(SshKeyRow.uuid), "name": Field(SshKeyRow.name),
        "fingerprint": Field(SshKeyRow.fingerprint), "user_uuid": Field(SshKeyRow.user_uuid),
        "project_uuid": Field(SshKeyRow.project_uuid),
        "created_at": Field(SshKeyRow.created_at, "datetime"),
        "updated_at": Field(SshKeyRow.updated_at, "datetime"),
    }, SshKeyRow.uuid, NEWEST_FIRST),
    "token": Queryable(TokenRow, {
        "uuid": Field(TokenRow.uuid), "project_uuid": Field(TokenRow.project_uuid),
        "created_at": Field(TokenRow.created_at, "datetime"),
        "expires_at": Field(TokenRow.expires_at, "datetime"),
        "revoked_at": Field(TokenRow.revoked_at, "datetime"),
    }, TokenRow.uuid, NEWEST_FIRST),
    "volume": Queryable(VolumeRow, {
        **_common(VolumeRow), "status": _enum(VolumeRow.status, VolumeStatus),
        "kind": _enum(VolumeRow.kind, VolumeKind), "size_gb": Field(VolumeRow.size_gb, "int"),
        "thin": Field(VolumeRow.thin, "bool"),
        "storage_mode": _enum(VolumeRow.storage_mode, StorageMode),
        "pool_uuid": Field(VolumeRow.pool_uuid), "node_uuid": Field(VolumeRow.node_uuid),
        "vm_uuid": Field(VolumeRow.vm_uuid), "image_uuid": Field(VolumeRow.image_uuid),
        "project_uuid": Field(VolumeRow.project_uuid),
        "delete_with_vm": Field(VolumeRow.delete_with_vm, "bool"),
    }, VolumeRow.uuid, NEWEST_FIRST, VolumeRow.uuid, "volume"),
    "event": Queryable(EventRow, {
        "id": Field(EventRow.id, "int"), "at": Field(EventRow.at, "datetime"),
        "kind": Field(EventRow.kind), "severity": Field(EventRow.severity),
        "state": Field(EventRow.state), "resource_type": Field(EventRow.resource_type),
        "resource_uuid": Field(EventRow.resource_uuid),
        "message": Field(EventRow.message, sortable=False),
    }, EventRow.id, (SortKey("id", True),)),
    "audit": Queryable(AuditRow, {
        "id": Field(AuditRow.id, "int"), "at": Field(AuditRow.at, "datetime"),
        "request_id": Field(AuditRow.request_id), "user_uuid": Field(AuditRow.user_uuid),
        "user_name": Field(AuditRow.user_name), "project_uuid": Field(AuditRow.project_uuid),
        "action": Field(AuditRow.action), "resource_type": Field(AuditRow.resource_type),
        "resource_uuid": Field(AuditRow.resource_uuid), "source_ip": Field(AuditRow.source_ip),
        "status": Field(AuditRow.status, "int"), "result": Field(AuditRow.result),
    }, AuditRow.id, (SortKey("id", True),)),
}


@dataclass(frozen=True)
class ListParams:
    """The list parameters every list route takes."""

    q: str | None = None
    sort: str | None = None
    limit: int = 100
    offset: int = 0
    cursor: str | None = None
    count: bool = False


Convert = Callable[[AsyncSession, list[Any]], Awaitable[list[T]]]


def each(model: Callable[[Any], T]) -> Convert[T]:
    """A row converter for models made from one row alone."""
    async def convert(_session: AsyncSession, rows: list[Any]) -> list[T]:
        return [model(row) for row in rows]
    return convert


async def listed(db: Database, kind: str, scope: Scope, params: ListParams,
                 convert: Convert[T], where: ColumnElement[bool] | None = None) -> Page[T]:
    """The API page of ``kind`` that ``scope`` sees (and ``where`` admits), its rows made
    models by ``convert`` (which may read more, e.g. tags, in the same session)."""
    async with db.reading() as session:
        result = await list_page(session, kind, scope, params, where)
        return page_of(await convert(session, result.rows), result, params)


def page_of(items: list[T], result: PageResult, params: ListParams) -> Page[T]:
    """The API page of ``items`` (the models of ``result.rows``)."""
    return Page[T](items=items, total=result.total, limit=params.limit, offset=params.offset,
                   next_cursor=result.next_cursor)


async def list_page(session: AsyncSession, kind: str, scope: Scope, params: ListParams,
                    where: ColumnElement[bool] | None = None) -> PageResult:
    """One page of ``kind`` that ``scope`` sees (and ``where`` admits), filtered, sorted
    and paginated."""
    queryable = QUERYABLES[kind]
    seen = visible(queryable.model, scope)
    return await fetch_page(session, queryable,
                            scope=seen if where is None else and_(seen, where),
                            q=params.q, sort=params.sort, limit=params.limit,
                            offset=params.offset, cursor=params.cursor, count=params.count)
