"""storage: volumes and their snapshots, SSH keys, events, ISO and cloud-init fields

- ``volumes`` (C-STO): every disk is a volume, kept by volume so it outlives its VM;
  each existing VM gets a row for its root disk, under the id its node adopts the old
  file with (:func:`yun.proto.messages.legacy_volume_id`).
- ``volume_snapshots``: snapshots of a volume.
- ``ssh_keys``: users' public keys for cloud-init.
- ``events``: alarms raised and cleared (a storage directory past its threshold).
- ``images.protected``, ``images.expected_sha256``, ``images.source_format`` (T-IMG).
- ``vms.image_uuid`` becomes optional (a blank VM installed from an ISO);
  ``vms.cdrom_image_uuid`` and ``vms.boot`` (F-ISO); ``vms.ssh_keys`` and
  ``vms.user_data`` (cloud-init).
- ``nodes.storage``: the storage directories a node last reported (F-STO-LOCAL).
- ``pools.backing``: VMs as overlays on a shared base (F-BACKING).

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-24 10:00:00
"""

from __future__ import annotations

import uuid as uuidlib
from datetime import UTC, datetime

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

TS = sa.DateTime(timezone=True)


def _stamps() -> list[sa.Column]:  # type: ignore[type-arg]
    return [sa.Column("created_at", TS, nullable=False),
            sa.Column("updated_at", TS, nullable=False)]


def _legacy_volume_id(vm_uuid: str, disk_id: str) -> str:
    # Kept here as written: a migration must not change when the code it once called does.
    return str(uuidlib.uuid5(uuidlib.NAMESPACE_URL, f"yun:volume:{vm_uuid}/{disk_id}"))


def upgrade() -> None:
    op.create_table(
        "volumes",
        sa.Column("uuid", sa.String(36), primary_key=True),
        sa.Column("name", sa.String(63), nullable=False),
        sa.Column("description", sa.Text(), nullable=False),
        sa.Column("project_uuid", sa.String(36),
                  sa.ForeignKey("projects.uuid", ondelete="RESTRICT"), nullable=False),
        sa.Column("pool_uuid", sa.String(36),
                  sa.ForeignKey("pools.uuid", ondelete="RESTRICT"), nullable=True),
        sa.Column("node_uuid", sa.String(64), nullable=True),
        sa.Column("vm_uuid", sa.String(36), nullable=True),
        sa.Column("disk_id", sa.String(64), nullable=True),
        sa.Column("kind", sa.String(8), nullable=False),
        sa.Column("size_gb", sa.Integer(), nullable=False),
        sa.Column("thin", sa.Boolean(), nullable=False),
        sa.Column("storage_mode", sa.String(16), nullable=False),
        sa.Column("image_uuid", sa.String(36),
                  sa.ForeignKey("images.uuid", ondelete="RESTRICT"), nullable=True),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("delete_with_vm", sa.Boolean(), nullable=False),
        sa.Column("task_uuid", sa.String(36), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        *_stamps(),
        sa.UniqueConstraint("vm_uuid", "disk_id", name="uq_volumes_vm_disk"),
    )
    for column in ("name", "project_uuid", "pool_uuid", "node_uuid", "vm_uuid", "image_uuid"):
        op.create_index(f"ix_volumes_{column}", "volumes", [column])
    op.create_table(
        "volume_snapshots",
        sa.Column("uuid", sa.String(36), primary_key=True),
        sa.Column("volume_uuid", sa.String(36),
                  sa.ForeignKey("volumes.uuid", ondelete="CASCADE"), nullable=False),
        sa.Column("name", sa.String(63), nullable=False),
        sa.Column("size_gb", sa.Integer(), nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.UniqueConstraint("volume_uuid", "name", name="uq_volume_snapshots_volume_name"),
    )
    op.create_index("ix_volume_snapshots_volume_uuid", "volume_snapshots", ["volume_uuid"])
    op.create_table(
        "ssh_keys",
        sa.Column("uuid", sa.String(36), primary_key=True),
        sa.Column("name", sa.String(63), nullable=False),
        sa.Column("user_uuid", sa.String(36),
                  sa.ForeignKey("users.uuid", ondelete="CASCADE"), nullable=False),
        sa.Column("project_uuid", sa.String(36),
                  sa.ForeignKey("projects.uuid", ondelete="CASCADE"), nullable=False),
        sa.Column("public_key", sa.Text(), nullable=False),
        sa.Column("fingerprint", sa.String(128), nullable=False),
        *_stamps(),
        sa.UniqueConstraint("user_uuid", "name", name="uq_ssh_keys_user_name"),
    )
    op.create_index("ix_ssh_keys_user_uuid", "ssh_keys", ["user_uuid"])
    op.create_index("ix_ssh_keys_project_uuid", "ssh_keys", ["project_uuid"])
    op.create_table(
        "events",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("at", TS, nullable=False),
        sa.Column("kind", sa.String(64), nullable=False),
        sa.Column("severity", sa.String(16), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("resource_type", sa.String(32), nullable=False),
        sa.Column("resource_uuid", sa.String(64), nullable=True),
        sa.Column("message", sa.Text(), nullable=False),
        sa.Column("data", sa.JSON(), nullable=False),
    )
    for column in ("at", "kind", "resource_uuid"):
        op.create_index(f"ix_events_{column}", "events", [column])

    with op.batch_alter_table("images") as batch:
        batch.add_column(sa.Column("protected", sa.Boolean(), nullable=False,
                                   server_default=sa.false()))
        batch.add_column(sa.Column("expected_sha256", sa.String(64), nullable=True))
        batch.add_column(sa.Column("source_format", sa.String(16), nullable=True))
    with op.batch_alter_table("vms") as batch:
        batch.alter_column("image_uuid", existing_type=sa.String(36), nullable=True)
        batch.add_column(sa.Column("cdrom_image_uuid", sa.String(36), nullable=True))
        batch.add_column(sa.Column("boot", sa.String(8), nullable=False,
                                   server_default="disk"))
        batch.add_column(sa.Column("ssh_keys", sa.JSON(), nullable=False,
                                   server_default="[]"))
        batch.add_column(sa.Column("user_data", sa.Text(), nullable=True))
        batch.create_foreign_key("fk_vms_cdrom_image_uuid_images", "images",
                                 ["cdrom_image_uuid"], ["uuid"], ondelete="RESTRICT")
        batch.create_index("ix_vms_cdrom_image_uuid", ["cdrom_image_uuid"])
    with op.batch_alter_table("nodes") as batch:
        batch.add_column(sa.Column("storage", sa.JSON(), nullable=False, server_default="[]"))
    with op.batch_alter_table("pools") as batch:
        batch.add_column(sa.Column("backing", sa.Boolean(), nullable=False,
                                   server_default=sa.false()))

    # Every VM's root disk becomes a volume, under the id its node adopts the file with.
    conn = op.get_bind()
    vms = conn.execute(sa.text(
        "SELECT v.uuid, v.name, v.project_uuid, v.pool_uuid, v.node_uuid, v.disk_gb, "
        "v.image_uuid, v.state, p.storage_mode, p.thin FROM vms v "
        "LEFT JOIN pools p ON p.uuid = v.pool_uuid")).all()
    now = datetime.now(UTC)
    volumes = sa.table(
        "volumes", *(sa.column(c) for c in (
            "uuid", "name", "description", "project_uuid", "pool_uuid", "node_uuid",
            "vm_uuid", "disk_id", "kind", "size_gb", "thin", "storage_mode", "image_uuid",
            "status", "delete_with_vm", "created_at", "updated_at")))
    rows = [{
        "uuid": _legacy_volume_id(vm.uuid, "root"), "name": f"{vm.name}-root"[:63],
        "description": "", "project_uuid": vm.project_uuid, "pool_uuid": vm.pool_uuid,
        "node_uuid": vm.node_uuid, "vm_uuid": vm.uuid, "disk_id": "root", "kind": "root",
        "size_gb": vm.disk_gb, "thin": True if vm.thin is None else bool(vm.thin),
        "storage_mode": vm.storage_mode or "local", "image_uuid": vm.image_uuid,
        "status": "error" if vm.state == "error" else "in-use", "delete_with_vm": True,
        "created_at": now, "updated_at": now} for vm in vms]
    if rows:
        op.bulk_insert(volumes, rows)


def downgrade() -> None:
    blank = op.get_bind().execute(sa.text(
        "SELECT count(*) FROM vms WHERE image_uuid IS NULL")).scalar_one()
    if blank:
        # Before 0008 every VM had an image: there is nothing to put in the column.
        raise RuntimeError(f"cannot downgrade below 0008: {blank} VM(s) have no image "
                           "(installed from an ISO); delete them first")
    with op.batch_alter_table("pools") as batch:
        batch.drop_column("backing")
    with op.batch_alter_table("nodes") as batch:
        batch.drop_column("storage")
    with op.batch_alter_table("vms") as batch:
        batch.drop_index("ix_vms_cdrom_image_uuid")
        batch.drop_constraint("fk_vms_cdrom_image_uuid_images", type_="foreignkey")
        for column in ("user_data", "ssh_keys", "boot", "cdrom_image_uuid"):
            batch.drop_column(column)
        batch.alter_column("image_uuid", existing_type=sa.String(36), nullable=False)
    with op.batch_alter_table("images") as batch:
        for column in ("source_format", "expected_sha256", "protected"):
            batch.drop_column(column)
    op.drop_table("events")
    op.drop_table("ssh_keys")
    op.drop_table("volume_snapshots")
    op.drop_table("volumes")
