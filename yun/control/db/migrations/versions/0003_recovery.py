"""recovery: one unfinished flow per resource as a database invariant; idempotency keys
held by a control server incarnation and expiring; VMs remember the key that made them

- ``uq_flows_unfinished_resource``: a partial unique index on ``flows(resource_uuid)``
  where the state is pending, running or rolling_back (SQLite and PostgreSQL both
  support partial indexes), so two concurrent requests cannot start two flows on one
  resource. Existing duplicates (possible before, on PostgreSQL) are ended ``failed``
  first, keeping the newest, so the index can be built.
- ``idempotency_keys.owner`` and ``owner_boot``: the control server (component id) and
  the process (boot id) holding a key in progress, so a retry after a crash can take the
  key over; ``expires_at``: when the key is forgotten.
- ``vms.idempotency_key``: the scoped key of the create that made the VM (unique), so a
  create carried out again after a crash answers the same VM.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01 10:00:00
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

TS = sa.DateTime(timezone=True)
UNFINISHED_SQL = "state IN ('pending', 'running', 'rolling_back')"
DEFAULT_RETENTION = timedelta(hours=24)


def upgrade() -> None:
    bind = op.get_bind()
    flows = sa.table("flows", sa.column("uuid", sa.String), sa.column("resource_uuid"),
                     sa.column("state", sa.String), sa.column("created_at", TS),
                     sa.column("error", sa.Text), sa.column("finished_at", TS))
    # End all but the newest unfinished flow of each resource: the index would refuse them.
    rows = bind.execute(sa.select(flows.c.uuid, flows.c.resource_uuid).where(
        flows.c.state.in_(("pending", "running", "rolling_back"))).order_by(
        flows.c.resource_uuid, flows.c.created_at.desc())).all()
    seen: set[str] = set()
    for flow_uuid, resource_uuid in rows:
        if resource_uuid in seen:
            bind.execute(flows.update().where(flows.c.uuid == flow_uuid).values(
                state="failed", finished_at=datetime.now(UTC),
                error="ended by migration 0003: another flow of the resource was unfinished"))
        seen.add(resource_uuid)
    op.create_index("uq_flows_unfinished_resource", "flows", ["resource_uuid"], unique=True,
                    sqlite_where=sa.text(UNFINISHED_SQL),
                    postgresql_where=sa.text(UNFINISHED_SQL))

    with op.batch_alter_table("idempotency_keys") as batch:
        batch.add_column(sa.Column("owner", sa.String(64), nullable=True))
        batch.add_column(sa.Column("owner_boot", sa.String(36), nullable=True))
        batch.add_column(sa.Column("expires_at", TS, nullable=True))
    keys = sa.table("idempotency_keys", sa.column("created_at", TS),
                    sa.column("expires_at", TS))
    # Keys recorded before: kept for the default retention from now, then cleaned up.
    bind.execute(keys.update().values(expires_at=datetime.now(UTC) + DEFAULT_RETENTION))
    with op.batch_alter_table("idempotency_keys") as batch:
        batch.alter_column("expires_at", existing_type=TS, nullable=False)
        batch.create_index("ix_idempotency_keys_expires_at", ["expires_at"])

    with op.batch_alter_table("vms") as batch:
        batch.add_column(sa.Column("idempotency_key", sa.String(64), nullable=True))
        batch.create_unique_constraint("uq_vms_idempotency_key", ["idempotency_key"])


def downgrade() -> None:
    with op.batch_alter_table("vms") as batch:
        batch.drop_constraint("uq_vms_idempotency_key", type_="unique")
        batch.drop_column("idempotency_key")
    with op.batch_alter_table("idempotency_keys") as batch:
        batch.drop_index("ix_idempotency_keys_expires_at")
        batch.drop_column("expires_at")
        batch.drop_column("owner_boot")
        batch.drop_column("owner")
    op.drop_index("uq_flows_unfinished_resource", table_name="flows")
