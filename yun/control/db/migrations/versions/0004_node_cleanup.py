"""VMs whose node must hold nothing for them: vms.node_cleanup

A VM whose create failed while its node was unreachable, whose domain vanished, or that
was deleted while its node was down keeps its address and reservation until the node's
report shows it holds nothing for it; this flag marks such VMs.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-24 10:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("vms") as batch:
        batch.add_column(sa.Column("node_cleanup", sa.Boolean(), nullable=False,
                                   server_default=sa.false()))


def downgrade() -> None:
    with op.batch_alter_table("vms") as batch:
        batch.drop_column("node_cleanup")
