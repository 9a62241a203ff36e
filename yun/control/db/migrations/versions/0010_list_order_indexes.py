"""vms, flows, volumes: indexes in the order their lists are read

A list of VMs, tasks or volumes is read newest first (``created_at DESC, uuid DESC``),
over every project (administrators) or over the caller's project. Without an index in
that order each page read and sorted the whole table: 118 ms for a page of 50 of
100,000 VMs on SQLite, against 1.8 ms with the index (issue 10). One index per order,
with and without the project in front.

Revision ID: 0010
Revises: 0009
Create Date: 2026-11-24 14:20:00
"""

from __future__ import annotations

from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None

TABLES = ("vms", "flows", "volumes")


def upgrade() -> None:
    for table in TABLES:
        op.create_index(f"ix_{table}_created", table, ["created_at", "uuid"])
        op.create_index(f"ix_{table}_project_created", table,
                        ["project_uuid", "created_at", "uuid"])


def downgrade() -> None:
    for table in TABLES:
        op.drop_index(f"ix_{table}_project_created", table_name=table)
        op.drop_index(f"ix_{table}_created", table_name=table)
