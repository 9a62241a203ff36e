"""networks: address pools, public addresses and ports, node forwards, routers

- ``address_pools`` and ``address_ranges`` (F-ADDR): exclusive pools of public
  addresses and shared pools of public ports; ``pools.address_pool`` (a name kept as a
  reference until now) becomes ``pools.address_pool_uuid``, a real link.
- ``public_ips``: addresses and ports taken from address pools by VMs (mono, share) and
  elastic IPs; unique (ip, port, protocol).
- ``node_forwards``: NAT ports of nodes reaching private sandbox VMs (F-SB-PRIVATE).
- ``network_changes``: the generation of the routers' rule set; ``routers``: the
  intelligent routers as they last pulled it (C-RT).
- ``vm_nics`` (NICs added to running VMs) and ``vms.extra_ips`` (U-HOTPLUG).
- ``nodes.nat_subnet`` (every node had the same NAT network) becomes
  ``nodes.sandbox_subnet``, unique and assigned by the control server.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-23 10:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

TS = sa.DateTime(timezone=True)


def _stamps() -> list[sa.Column]:  # type: ignore[type-arg]
    return [sa.Column("created_at", TS, nullable=False),
            sa.Column("updated_at", TS, nullable=False)]


def upgrade() -> None:
    op.create_table(
        "address_pools",
        sa.Column("uuid", sa.String(36), primary_key=True),
        sa.Column("name", sa.String(63), nullable=False, unique=True),
        sa.Column("description", sa.Text(), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("network", sa.String(64), nullable=False),
        *_stamps(),
    )
    op.create_table(
        "address_ranges",
        sa.Column("uuid", sa.String(36), primary_key=True),
        sa.Column("address_pool_uuid", sa.String(36),
                  sa.ForeignKey("address_pools.uuid", ondelete="CASCADE"), nullable=False),
        sa.Column("first_ip", sa.String(64), nullable=False),
        sa.Column("last_ip", sa.String(64), nullable=False),
        sa.Column("first_port", sa.Integer(), nullable=True),
        sa.Column("last_port", sa.Integer(), nullable=True),
        sa.Column("created_at", TS, nullable=False),
    )
    op.create_index("ix_address_ranges_address_pool_uuid", "address_ranges",
                    ["address_pool_uuid"])
    op.create_table(
        "public_ips",
        sa.Column("uuid", sa.String(36), primary_key=True),
        sa.Column("name", sa.String(63), nullable=False),
        sa.Column("description", sa.Text(), nullable=False),
        sa.Column("address_pool_uuid", sa.String(36),
                  sa.ForeignKey("address_pools.uuid", ondelete="RESTRICT"), nullable=False),
        sa.Column("project_uuid", sa.String(36),
                  sa.ForeignKey("projects.uuid", ondelete="RESTRICT"), nullable=False),
        sa.Column("kind", sa.String(8), nullable=False),
        sa.Column("ip", sa.String(64), nullable=False),
        sa.Column("port", sa.Integer(), nullable=False),
        sa.Column("protocol", sa.String(8), nullable=False),
        sa.Column("vm_uuid", sa.String(36), nullable=True),
        sa.Column("vm_port", sa.Integer(), nullable=True),
        *_stamps(),
        sa.UniqueConstraint("ip", "port", "protocol", name="uq_public_ips_ip_port_protocol"),
    )
    for column in ("name", "address_pool_uuid", "project_uuid", "vm_uuid"):
        op.create_index(f"ix_public_ips_{column}", "public_ips", [column])
    op.create_table(
        "node_forwards",
        sa.Column("uuid", sa.String(36), primary_key=True),
        sa.Column("vm_uuid", sa.String(36), nullable=False),
        sa.Column("node_uuid", sa.String(64), nullable=False),
        sa.Column("protocol", sa.String(8), nullable=False),
        sa.Column("node_port", sa.Integer(), nullable=False),
        sa.Column("vm_port", sa.Integer(), nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.UniqueConstraint("node_uuid", "protocol", "node_port",
                            name="uq_node_forwards_node_port"),
        sa.UniqueConstraint("vm_uuid", "protocol", "vm_port", name="uq_node_forwards_vm_port"),
    )
    op.create_index("ix_node_forwards_vm_uuid", "node_forwards", ["vm_uuid"])
    op.create_index("ix_node_forwards_node_uuid", "node_forwards", ["node_uuid"])
    op.create_table(
        "network_changes",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
                  primary_key=True, autoincrement=True),
        sa.Column("subject", sa.String(64), nullable=False),
        sa.Column("created_at", TS, nullable=False),
    )
    op.create_table(
        "routers",
        sa.Column("uuid", sa.String(64), primary_key=True),
        sa.Column("name", sa.String(63), nullable=False),
        sa.Column("url", sa.String(2048), nullable=False),
        sa.Column("lan_address", sa.String(64), nullable=False),
        sa.Column("applied_generation", sa.BigInteger(), nullable=False),
        sa.Column("last_seen_at", TS, nullable=True),
        *_stamps(),
    )
    op.create_table(
        "vm_nics",
        sa.Column("uuid", sa.String(36), primary_key=True),
        sa.Column("vm_uuid", sa.String(36), sa.ForeignKey("vms.uuid", ondelete="CASCADE"),
                  nullable=False),
        sa.Column("idx", sa.Integer(), nullable=False),
        sa.Column("mac", sa.String(17), nullable=False, unique=True),
        sa.Column("ip", sa.String(64), nullable=True),
        sa.Column("created_at", TS, nullable=False),
        sa.UniqueConstraint("vm_uuid", "idx", name="uq_vm_nics_vm_idx"),
    )
    op.create_index("ix_vm_nics_vm_uuid", "vm_nics", ["vm_uuid"])

    with op.batch_alter_table("pools") as batch:
        batch.drop_column("address_pool")  # only ever a name with nothing behind it
        batch.add_column(sa.Column("address_pool_uuid", sa.String(36), nullable=True))
        batch.create_foreign_key("fk_pools_address_pool_uuid", "address_pools",
                                 ["address_pool_uuid"], ["uuid"], ondelete="RESTRICT")
        batch.create_index("ix_pools_address_pool_uuid", ["address_pool_uuid"])
    with op.batch_alter_table("nodes") as batch:
        # Every node had the same NAT network: the control server gives each its own
        # sandbox subnet when it next reports.
        batch.drop_column("nat_subnet")
        batch.add_column(sa.Column("sandbox_subnet", sa.String(64), nullable=True))
        batch.create_unique_constraint("uq_nodes_sandbox_subnet", ["sandbox_subnet"])
    with op.batch_alter_table("vms") as batch:
        batch.add_column(sa.Column("extra_ips", sa.JSON(), nullable=False,
                                   server_default=sa.text("'[]'")))


def downgrade() -> None:
    with op.batch_alter_table("vms") as batch:
        batch.drop_column("extra_ips")
    with op.batch_alter_table("nodes") as batch:
        batch.drop_constraint("uq_nodes_sandbox_subnet", type_="unique")
        batch.drop_column("sandbox_subnet")
        batch.add_column(sa.Column("nat_subnet", sa.String(64), nullable=False,
                                   server_default="10.77.0.0/24"))
    with op.batch_alter_table("pools") as batch:
        batch.drop_index("ix_pools_address_pool_uuid")
        batch.drop_constraint("fk_pools_address_pool_uuid", type_="foreignkey")
        batch.drop_column("address_pool_uuid")
        batch.add_column(sa.Column("address_pool", sa.String(63), nullable=True))
    op.drop_index("ix_vm_nics_vm_uuid", "vm_nics")
    op.drop_table("vm_nics")
    op.drop_table("routers")
    op.drop_table("network_changes")
    op.drop_index("ix_node_forwards_node_uuid", "node_forwards")
    op.drop_index("ix_node_forwards_vm_uuid", "node_forwards")
    op.drop_table("node_forwards")
    for column in ("vm_uuid", "project_uuid", "address_pool_uuid", "name"):
        op.drop_index(f"ix_public_ips_{column}", "public_ips")
    op.drop_table("public_ips")
    op.drop_index("ix_address_ranges_address_pool_uuid", "address_ranges")
    op.drop_table("address_ranges")
    op.drop_table("address_pools")
