"""nodes: the address where a node's NAT ports answer

``nodes.forward_address`` (F-SB-PRIVATE): the address a node reports for its NAT
ports. The agent's URL is not always it: an all-in-one agent listens on loopback, which
the kernel does not forward to a VM. None (older nodes, simulated ones): the host of the
agent's URL.

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-24 01:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("nodes") as batch:
        batch.add_column(sa.Column("forward_address", sa.String(64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("nodes") as batch:
        batch.drop_column("forward_address")
