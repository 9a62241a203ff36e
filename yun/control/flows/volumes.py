"""A VM's volumes as the VM flows see them (C-STO, Z-CASCADE).

Every VM has a root volume (``kind`` root, ``disk_id`` "root"), recorded with the VM;
data volumes are attached to at most one VM under their own ``disk_id``. The VM's
domain spec lists them all: the root disk is made when missing (``create=True``), the
data disks must exist (``create=False``: a missing data volume is data lost, never
replaced by a blank), so a restart or a redefinition of the domain keeps them.

A VM's delete takes its root volume and the data volumes marked ``delete_with_vm``
(a delete with ``keep_volumes`` clears that mark first); the others are detached and
kept, ``available``.
"""

from __future__ import annotations

import logging
import uuid as uuidlib

from sqlalchemy import or_, select
from sqlalchemy.ext.asyncio import AsyncSession

from yun.control.allocators import quotas
from yun.control.db.models import ImageRow, NodeRow, PoolRow, VmRow, VolumeRow
from yun.proto.identity import QuotaResource
from yun.proto.messages import DiskSpec
from yun.proto.resources import StorageMode, VolumeKind, VolumeStatus

log = logging.getLogger("yun.control.volumes")

ROOT_DISK = "root"


def root_volume(vm: VmRow, pool: PoolRow | None) -> VolumeRow:
    """The root volume of a new VM: its size, image, and its pool's storage mode and
    thin setting (known once the VM has a pool; the provision step fills them in for a
    VM created in a zone)."""
    return VolumeRow(
        uuid=str(uuidlib.uuid4()), name=f"{vm.name}-root"[:63], project_uuid=vm.project_uuid,
        pool_uuid=pool.uuid if pool is not None else None, node_uuid=vm.node_uuid,
        vm_uuid=vm.uuid, disk_id=ROOT_DISK, kind=VolumeKind.ROOT, size_gb=vm.disk_gb,
        thin=pool.thin if pool is not None else True,
        storage_mode=pool.storage_mode if pool is not None else StorageMode.LOCAL,
        image_uuid=vm.image_uuid, status=VolumeStatus.IN_USE, delete_with_vm=True)


async def vm_volumes(session: AsyncSession, vm_uuid: str) -> list[VolumeRow]:
    """The volumes attached to a VM, the root one first."""
    rows = (await session.scalars(select(VolumeRow).where(
        VolumeRow.vm_uuid == vm_uuid).order_by(VolumeRow.created_at))).all()
    return sorted(rows, key=lambda r: r.kind != VolumeKind.ROOT)


def disk_spec(volume: VolumeRow, image: ImageRow | None = None,
              pool: PoolRow | None = None) -> DiskSpec:
    """The disk a volume is to its VM's domain: a root disk is made when missing (from
    ``image`` when given), a data disk must exist already.

    A root disk in shared storage is an overlay on the image's copy on the mount only
    when its pool has backing images (F-BACKING); otherwise it is a full copy that
    stays inside the shared storage. In local storage it is an overlay on the node's
    cached copy, which the cache keeps while it is used."""
    root = volume.kind == VolumeKind.ROOT
    shared = volume.storage_mode == StorageMode.SHARED
    backing = bool(pool.backing) if shared and pool is not None else not shared
    return DiskSpec(
        disk_id=volume.disk_id or ROOT_DISK, size_gb=volume.size_gb,
        image_id=image.uuid if root and image is not None else None,
        image_sha256=image.sha256 if root and image is not None else None,
        image_format=image.format if root and image is not None else None,
        volume_id=volume.uuid, thin=volume.thin, create=root,
        storage="shared" if shared else "local", backing=backing)


async def disk_specs(session: AsyncSession, vm: VmRow, node: NodeRow, image: ImageRow | None,
                     pool: PoolRow | None) -> list[DiskSpec]:
    """Every disk of the VM's domain, the root one first. The root volume follows its
    VM: the node it is placed on and its pool's storage mode (a VM inherits it,
    F-STO-MODEL); a VM recorded without one (never, past migration 0008) gets one."""
    volumes = await vm_volumes(session, vm.uuid)
    root = next((v for v in volumes if v.kind == VolumeKind.ROOT), None)
    if root is None:
        root = root_volume(vm, pool)
        session.add(root)
        volumes.insert(0, root)
    root.node_uuid = node.uuid
    if pool is not None and root.pool_uuid != pool.uuid:
        root.pool_uuid, root.storage_mode, root.thin = pool.uuid, pool.storage_mode, pool.thin
    return [disk_spec(v, image, pool) for v in volumes]


async def volumes_going_with(session: AsyncSession, vm_uuid: str) -> list[str]:
    """The ids of the VM's volumes its delete removes: the root one and those marked
    ``delete_with_vm``."""
    return list((await session.scalars(select(VolumeRow.uuid).where(
        VolumeRow.vm_uuid == vm_uuid,
        or_(VolumeRow.kind == VolumeKind.ROOT, VolumeRow.delete_with_vm.is_(True)))
        .order_by(VolumeRow.uuid))).all())


async def release_volumes(session: AsyncSession, vm_uuid: str) -> tuple[list[str], list[str]]:
    """The VM is gone from its node: forget the volumes that went with it and detach the
    others (kept, ``available``). Returns (deleted, kept) volume ids."""
    deleted, kept = [], []
    for volume in await vm_volumes(session, vm_uuid):
        if volume.kind == VolumeKind.ROOT or volume.delete_with_vm:
            deleted.append(volume.uuid)
            if volume.kind == VolumeKind.DATA:  # the root one is in the VM's own count
                await quotas.release(session, volume.project_uuid,
                                     {QuotaResource.DISK_GB: volume.size_gb})
            await session.delete(volume)
        else:
            kept.append(volume.uuid)
            volume.vm_uuid, volume.disk_id = None, None
            volume.status = VolumeStatus.AVAILABLE
    if deleted or kept:
        await session.flush()
        log.info("VM's volumes released", extra={"vm": vm_uuid, "deleted": deleted,
                                                 "kept": kept})
    return deleted, kept
