"""pools: zones, compute pools, node inventories and allocations, VM groups, QoS

- ``zones`` and ``pools`` (F-PUB, F-POOL): a pool is a set of nodes and the template of
  the VMs placed on them; a zone ``default`` with a pool ``default`` is made here, and
  the existing nodes and VMs are put in it.
- ``node_inventories`` and ``allocations`` replace the per-node capacity columns
  (``vcpus``, ``memory_mb``, ``disk_gb`` and their ``*_reserved`` twins): capacity per
  resource class, as Nova's placement keeps it, so volumes, addresses and ports can be
  counted the same way later. Existing reservations become allocations of their VMs.
- ``nodes``: ``pool_uuid`` (None: unassigned), ``admin_state`` (active / drained),
  ``labels``, ``capabilities``, ``disk_used_gb``, ``net_load``.
- ``vm_groups`` (affinity, anti-affinity) and ``vms``: ``pool_uuid``, ``group_uuid``,
  ``node_labels``, ``qos``.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-23 19:30:00
"""

from __future__ import annotations

import uuid as uuidlib
from datetime import UTC, datetime

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

TS = sa.DateTime(timezone=True)
DEFAULT_FILTERS = ["status", "vcpu", "memory", "disk", "labels", "capabilities",
                   "affinity", "anti_affinity"]
DEFAULT_WEIGHTS = {"cpu": 1.0, "memory": 1.0, "disk": 0.5, "network": 0.5}


def _stamps() -> list[sa.Column]:  # type: ignore[type-arg]
    return [sa.Column("created_at", TS, nullable=False),
            sa.Column("updated_at", TS, nullable=False)]


def upgrade() -> None:
    op.create_table(
        "zones",
        sa.Column("uuid", sa.String(36), primary_key=True),
        sa.Column("name", sa.String(63), nullable=False, unique=True),
        sa.Column("description", sa.Text(), nullable=False),
        *_stamps(),
    )
    op.create_table(
        "pools",
        sa.Column("uuid", sa.String(36), primary_key=True),
        sa.Column("name", sa.String(63), nullable=False, unique=True),
        sa.Column("description", sa.Text(), nullable=False),
        sa.Column("zone_uuid", sa.String(36), sa.ForeignKey("zones.uuid", ondelete="RESTRICT"),
                  nullable=False),
        sa.Column("network_mode", sa.String(32), nullable=False),
        sa.Column("storage_mode", sa.String(16), nullable=False),
        sa.Column("thin", sa.Boolean(), nullable=False),
        sa.Column("ha", sa.Boolean(), nullable=False),
        sa.Column("address_pool", sa.String(63), nullable=True),
        sa.Column("qos_level", sa.String(16), nullable=False),
        sa.Column("cpu_ratio", sa.Float(), nullable=False),
        sa.Column("memory_ratio", sa.Float(), nullable=False),
        sa.Column("disk_ratio", sa.Float(), nullable=False),
        sa.Column("filters", sa.JSON(), nullable=False),
        sa.Column("weights", sa.JSON(), nullable=False),
        *_stamps(),
    )
    op.create_index("ix_pools_zone_uuid", "pools", ["zone_uuid"])
    op.create_table(
        "vm_groups",
        sa.Column("uuid", sa.String(36), primary_key=True),
        sa.Column("name", sa.String(63), nullable=False),
        sa.Column("description", sa.Text(), nullable=False),
        sa.Column("project_uuid", sa.String(36),
                  sa.ForeignKey("projects.uuid", ondelete="RESTRICT"), nullable=False),
        sa.Column("policy", sa.String(16), nullable=False),
        *_stamps(),
    )
    op.create_index("ix_vm_groups_name", "vm_groups", ["name"])
    op.create_index("ix_vm_groups_project_uuid", "vm_groups", ["project_uuid"])
    op.create_table(
        "node_inventories",
        sa.Column("node_uuid", sa.String(64), sa.ForeignKey("nodes.uuid", ondelete="CASCADE"),
                  primary_key=True),
        sa.Column("resource_class", sa.String(32), primary_key=True),
        sa.Column("total", sa.BigInteger(), nullable=False),
        sa.Column("reserved", sa.BigInteger(), nullable=False),
        sa.Column("used", sa.BigInteger(), nullable=False),
    )
    op.create_table(
        "allocations",
        sa.Column("consumer_uuid", sa.String(36), primary_key=True),
        sa.Column("resource_class", sa.String(32), primary_key=True),
        sa.Column("node_uuid", sa.String(64), nullable=False),
        sa.Column("amount", sa.BigInteger(), nullable=False),
    )
    op.create_index("ix_allocations_node_uuid", "allocations", ["node_uuid"])

    now = datetime.now(UTC)
    bind = op.get_bind()
    zone_uuid, pool_uuid = str(uuidlib.uuid4()), str(uuidlib.uuid4())
    bind.execute(sa.text("INSERT INTO zones (uuid, name, description, created_at, updated_at) "
                         "VALUES (:u, 'default', 'made at installation', :t, :t)"),
                 {"u": zone_uuid, "t": now})
    pools = sa.table("pools", *(sa.column(c) for c in (
        "uuid", "name", "description", "zone_uuid", "network_mode", "storage_mode", "thin",
        "ha", "address_pool", "qos_level", "cpu_ratio", "memory_ratio", "disk_ratio")),
        sa.column("filters", sa.JSON()), sa.column("weights", sa.JSON()),
        sa.column("created_at", TS), sa.column("updated_at", TS))
    bind.execute(pools.insert().values(
        uuid=pool_uuid, name="default", description="made at installation",
        zone_uuid=zone_uuid, network_mode="sandbox-private", storage_mode="local", thin=True,
        ha=False, address_pool=None, qos_level="medium", cpu_ratio=4.0, memory_ratio=1.0,
        disk_ratio=1.0, filters=DEFAULT_FILTERS, weights=DEFAULT_WEIGHTS, created_at=now,
        updated_at=now))

    # Capacity moves into inventories; each placed VM's share becomes its allocations.
    for rc, total, used in (("vcpu", "vcpus", "vcpus_reserved"),
                            ("memory_mb", "memory_mb", "memory_reserved_mb"),
                            ("disk_gb", "disk_gb", "disk_reserved_gb")):
        bind.execute(sa.text(
            f"INSERT INTO node_inventories (node_uuid, resource_class, total, reserved, used) "
            f"SELECT uuid, '{rc}', {total}, 0, {used} FROM nodes"))
    for rc, size in (("vcpu", "vcpus"), ("memory_mb", "memory_mb"), ("disk_gb", "disk_gb")):
        bind.execute(sa.text(
            f"INSERT INTO allocations (consumer_uuid, resource_class, node_uuid, amount) "
            f"SELECT uuid, '{rc}', node_uuid, {size} FROM vms WHERE node_uuid IS NOT NULL"))

    with op.batch_alter_table("nodes") as batch:
        batch.add_column(sa.Column("admin_state", sa.String(16), nullable=False,
                                   server_default="active"))
        batch.add_column(sa.Column("pool_uuid", sa.String(36), nullable=True))
        batch.add_column(sa.Column("labels", sa.JSON(), nullable=False,
                                   server_default=sa.text("'{}'")))
        batch.add_column(sa.Column("capabilities", sa.JSON(), nullable=False,
                                   server_default=sa.text("'[]'")))
        batch.add_column(sa.Column("disk_used_gb", sa.Integer(), nullable=False,
                                   server_default="0"))
        batch.add_column(sa.Column("net_load", sa.Float(), nullable=False,
                                   server_default="0"))
        batch.create_foreign_key("fk_nodes_pool_uuid", "pools", ["pool_uuid"], ["uuid"],
                                 ondelete="RESTRICT")
        batch.create_index("ix_nodes_pool_uuid", ["pool_uuid"])
        for column in ("vcpus", "memory_mb", "disk_gb", "vcpus_reserved",
                       "memory_reserved_mb", "disk_reserved_gb"):
            batch.drop_column(column)
    bind.execute(sa.text("UPDATE nodes SET pool_uuid = :p"), {"p": pool_uuid})

    with op.batch_alter_table("vms") as batch:
        batch.add_column(sa.Column("pool_uuid", sa.String(36), nullable=True))
        batch.add_column(sa.Column("group_uuid", sa.String(36), nullable=True))
        batch.add_column(sa.Column("node_labels", sa.JSON(), nullable=False,
                                   server_default=sa.text("'{}'")))
        batch.add_column(sa.Column("qos", sa.JSON(), nullable=False,
                                   server_default=sa.text("'{}'")))
        batch.create_foreign_key("fk_vms_pool_uuid", "pools", ["pool_uuid"], ["uuid"],
                                 ondelete="RESTRICT")
        batch.create_foreign_key("fk_vms_group_uuid", "vm_groups", ["group_uuid"], ["uuid"],
                                 ondelete="RESTRICT")
        batch.create_index("ix_vms_pool_uuid", ["pool_uuid"])
        batch.create_index("ix_vms_group_uuid", ["group_uuid"])
    bind.execute(sa.text("UPDATE vms SET pool_uuid = :p"), {"p": pool_uuid})


def downgrade() -> None:
    with op.batch_alter_table("vms") as batch:
        batch.drop_index("ix_vms_group_uuid")
        batch.drop_index("ix_vms_pool_uuid")
        batch.drop_constraint("fk_vms_group_uuid", type_="foreignkey")
        batch.drop_constraint("fk_vms_pool_uuid", type_="foreignkey")
        for column in ("qos", "node_labels", "group_uuid", "pool_uuid"):
            batch.drop_column(column)
    with op.batch_alter_table("nodes") as batch:
        for column in ("vcpus", "memory_mb", "disk_gb", "vcpus_reserved",
                       "memory_reserved_mb", "disk_reserved_gb"):
            batch.add_column(sa.Column(column, sa.Integer(), nullable=False,
                                       server_default="0"))
        batch.drop_index("ix_nodes_pool_uuid")
        batch.drop_constraint("fk_nodes_pool_uuid", type_="foreignkey")
        for column in ("net_load", "disk_used_gb", "capabilities", "labels", "pool_uuid",
                       "admin_state"):
            batch.drop_column(column)
    bind = op.get_bind()
    for rc, total, used in (("vcpu", "vcpus", "vcpus_reserved"),
                            ("memory_mb", "memory_mb", "memory_reserved_mb"),
                            ("disk_gb", "disk_gb", "disk_reserved_gb")):
        bind.execute(sa.text(
            f"UPDATE nodes SET {total} = (SELECT total FROM node_inventories i WHERE "
            f"i.node_uuid = nodes.uuid AND i.resource_class = '{rc}'), {used} = (SELECT used "
            f"FROM node_inventories i WHERE i.node_uuid = nodes.uuid AND "
            f"i.resource_class = '{rc}') WHERE EXISTS (SELECT 1 FROM node_inventories i "
            f"WHERE i.node_uuid = nodes.uuid AND i.resource_class = '{rc}')"))
    op.drop_index("ix_allocations_node_uuid", "allocations")
    op.drop_table("allocations")
    op.drop_table("node_inventories")
    op.drop_index("ix_vm_groups_project_uuid", "vm_groups")
    op.drop_index("ix_vm_groups_name", "vm_groups")
    op.drop_table("vm_groups")
    op.drop_index("ix_pools_zone_uuid", "pools")
    op.drop_table("pools")
    op.drop_table("zones")
