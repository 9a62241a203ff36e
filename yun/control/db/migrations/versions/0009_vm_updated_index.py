"""vms: an index on updated_at

``ix_vms_updated_at`` (issue 10): the node registry reads the VMs changed since its last
look every second (``NodeRegistry.watch_changes``), so that a node's report touches the
database only for VMs that may have changed; without the index that read scans every VM.

Revision ID: 0009
Revises: 0008
Create Date: 2026-11-24 11:00:00
"""

from __future__ import annotations

from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_vms_updated_at", "vms", ["updated_at"])


def downgrade() -> None:
    op.drop_index("ix_vms_updated_at", table_name="vms")
