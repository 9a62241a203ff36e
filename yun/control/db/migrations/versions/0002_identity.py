"""identity and tenancy: departments, projects, users, roles, tokens, API keys, quotas,
key=value tags, the audit log; VMs, images and flows owned by a project

Existing VMs and images move to a project named ``default`` in a department named
``default``; their list tags become tags with an empty value.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-23 15:40:00
"""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

TS = sa.DateTime(timezone=True)


def _stamps() -> list[sa.Column]:
    return [sa.Column("created_at", TS, nullable=False),
            sa.Column("updated_at", TS, nullable=False)]


def upgrade() -> None:
    op.create_table(
        "departments",
        sa.Column("uuid", sa.String(36), primary_key=True),
        sa.Column("name", sa.String(63), nullable=False, unique=True),
        sa.Column("description", sa.Text(), nullable=False),
        *_stamps(),
    )
    op.create_table(
        "projects",
        sa.Column("uuid", sa.String(36), primary_key=True),
        sa.Column("name", sa.String(63), nullable=False, unique=True),
        sa.Column("description", sa.Text(), nullable=False),
        sa.Column("department_uuid", sa.String(36),
                  sa.ForeignKey("departments.uuid", ondelete="RESTRICT"), nullable=False,
                  index=True),
        *_stamps(),
    )
    op.create_table(
        "users",
        sa.Column("uuid", sa.String(36), primary_key=True),
        sa.Column("name", sa.String(63), nullable=False, unique=True),
        sa.Column("description", sa.Text(), nullable=False),
        sa.Column("email", sa.String(254), nullable=True),
        sa.Column("password_hash", sa.String(255), nullable=False),
        sa.Column("enabled", sa.Boolean(), nullable=False),
        sa.Column("department_uuid", sa.String(36),
                  sa.ForeignKey("departments.uuid", ondelete="RESTRICT"), nullable=False,
                  index=True),
        *_stamps(),
    )
    op.create_table(
        "role_assignments",
        sa.Column("uuid", sa.String(36), primary_key=True),
        sa.Column("user_uuid", sa.String(36), sa.ForeignKey("users.uuid", ondelete="CASCADE"),
                  nullable=False, index=True),
        sa.Column("role", sa.String(32), nullable=False),
        sa.Column("scope", sa.String(80), nullable=False),
        sa.Column("project_uuid", sa.String(36),
                  sa.ForeignKey("projects.uuid", ondelete="CASCADE"), nullable=True, index=True),
        sa.Column("department_uuid", sa.String(36),
                  sa.ForeignKey("departments.uuid", ondelete="CASCADE"), nullable=True,
                  index=True),
        sa.Column("created_at", TS, nullable=False),
        sa.UniqueConstraint("user_uuid", "scope", name="uq_role_user_scope"),
    )
    op.create_table(
        "tokens",
        sa.Column("uuid", sa.String(36), primary_key=True),
        sa.Column("user_uuid", sa.String(36), sa.ForeignKey("users.uuid", ondelete="CASCADE"),
                  nullable=False, index=True),
        sa.Column("project_uuid", sa.String(36),
                  sa.ForeignKey("projects.uuid", ondelete="CASCADE"), nullable=True, index=True),
        sa.Column("secret_sha256", sa.String(64), nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("expires_at", TS, nullable=False, index=True),
        sa.Column("revoked_at", TS, nullable=True),
    )
    op.create_table(
        "api_keys",
        sa.Column("uuid", sa.String(36), primary_key=True),
        sa.Column("name", sa.String(63), nullable=False),
        sa.Column("description", sa.Text(), nullable=False),
        sa.Column("access_key", sa.String(64), nullable=False, unique=True),
        sa.Column("secret", sa.String(128), nullable=False),
        sa.Column("user_uuid", sa.String(36), sa.ForeignKey("users.uuid", ondelete="CASCADE"),
                  nullable=False, index=True),
        sa.Column("project_uuid", sa.String(36),
                  sa.ForeignKey("projects.uuid", ondelete="CASCADE"), nullable=False,
                  index=True),
        sa.Column("enabled", sa.Boolean(), nullable=False),
        sa.Column("last_used_at", TS, nullable=True),
        *_stamps(),
        sa.UniqueConstraint("user_uuid", "name", name="uq_api_keys_user_name"),
    )
    op.create_table(
        "quotas",
        sa.Column("project_uuid", sa.String(36),
                  sa.ForeignKey("projects.uuid", ondelete="CASCADE"), primary_key=True),
        sa.Column("resource", sa.String(32), primary_key=True),
        sa.Column("limit", sa.BigInteger(), nullable=False),
        sa.Column("used", sa.BigInteger(), nullable=False),
    )
    op.create_table(
        "resource_tags",
        sa.Column("resource_uuid", sa.String(64), primary_key=True),
        sa.Column("key", sa.String(64), primary_key=True),
        sa.Column("value", sa.String(255), nullable=False),
        sa.Column("resource_type", sa.String(32), nullable=False, index=True),
    )
    op.create_index("ix_resource_tags_key_value", "resource_tags", ["key", "value"])
    op.create_table(
        "audit_log",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("at", TS, nullable=False, index=True),
        sa.Column("request_id", sa.String(64), nullable=False),
        sa.Column("user_uuid", sa.String(36), nullable=True, index=True),
        sa.Column("user_name", sa.String(63), nullable=True),
        sa.Column("project_uuid", sa.String(36), nullable=True, index=True),
        sa.Column("action", sa.String(64), nullable=False),
        sa.Column("resource_type", sa.String(32), nullable=True),
        sa.Column("resource_uuid", sa.String(64), nullable=True),
        sa.Column("source_ip", sa.String(64), nullable=True),
        sa.Column("status", sa.Integer(), nullable=False),
        sa.Column("result", sa.String(16), nullable=False),
        sa.Column("detail", sa.Text(), nullable=True),
    )

    # Existing resources move into a default project.
    conn = op.get_bind()
    now = datetime.now(UTC).replace(tzinfo=None) if conn.dialect.name == "sqlite" else \
        datetime.now(UTC)
    department, project = str(uuid.uuid4()), str(uuid.uuid4())
    conn.execute(sa.text(
        "INSERT INTO departments (uuid, name, description, created_at, updated_at) "
        "VALUES (:u, 'default', 'made when identity was introduced', :t, :t)"),
        {"u": department, "t": now})
    conn.execute(sa.text(
        "INSERT INTO projects (uuid, name, description, department_uuid, created_at, "
        "updated_at) VALUES (:u, 'default', 'made when identity was introduced', :d, :t, :t)"),
        {"u": project, "d": department, "t": now})
    for table, kind in (("vms", "vm"), ("images", "image"), ("nodes", "node")):
        for row in conn.execute(sa.text(f"SELECT uuid, tags FROM {table}")):
            tags = row.tags if isinstance(row.tags, list) else json.loads(row.tags or "[]")
            for tag in dict.fromkeys(tags):
                key = str(tag)[:64]
                conn.execute(sa.text(
                    "INSERT INTO resource_tags (resource_uuid, key, value, resource_type) "
                    "VALUES (:r, :k, '', :t)"), {"r": row.uuid, "k": key, "t": kind})

    with op.batch_alter_table("nodes") as batch:
        batch.drop_column("tags")
        batch.drop_column("project")
    for table in ("vms", "images"):
        with op.batch_alter_table(table) as batch:
            batch.add_column(sa.Column("project_uuid", sa.String(36), nullable=True))
            if table == "images":
                batch.add_column(sa.Column("visibility", sa.String(16), nullable=False,
                                           server_default="project"))
                batch.add_column(sa.Column("upload_key", sa.String(64), nullable=True))
        conn.execute(sa.text(f"UPDATE {table} SET project_uuid = :p"), {"p": project})
        with op.batch_alter_table(table) as batch:
            batch.alter_column("project_uuid", existing_type=sa.String(36), nullable=False)
            batch.create_foreign_key(f"fk_{table}_project", "projects", ["project_uuid"],
                                     ["uuid"], ondelete="RESTRICT")
            batch.create_index(f"ix_{table}_project_uuid", ["project_uuid"])
            if table == "images":
                batch.create_unique_constraint("uq_images_upload_key", ["upload_key"])
            batch.drop_column("tags")
            batch.drop_column("project")
    with op.batch_alter_table("flows") as batch:
        batch.add_column(sa.Column("project_uuid", sa.String(36), nullable=True))
        batch.create_index("ix_flows_project_uuid", ["project_uuid"])
    conn.execute(sa.text(
        "UPDATE flows SET project_uuid = (SELECT project_uuid FROM vms "
        "WHERE vms.uuid = flows.resource_uuid)"))
    with op.batch_alter_table("idempotency_keys") as batch:
        batch.add_column(sa.Column("user_uuid", sa.String(36), nullable=True))
    # A VM's capacity follows from its own row; quotas start at what projects already hold.
    for resource, expr in (("vms", "COUNT(*)"), ("vcpus", "COALESCE(SUM(vcpus), 0)"),
                           ("memory_mb", "COALESCE(SUM(memory_mb), 0)"),
                           ("disk_gb", "COALESCE(SUM(disk_gb), 0)")):
        used = conn.execute(sa.text(f"SELECT {expr} FROM vms")).scalar() or 0
        conn.execute(sa.text(
            'INSERT INTO quotas (project_uuid, resource, "limit", used) VALUES (:p, :r, -1, :u)'),
            {"p": project, "r": resource, "u": used})
    images = conn.execute(sa.text("SELECT COUNT(*) FROM images")).scalar() or 0
    for resource, used in (("images", images), ("public_ips", 0)):
        conn.execute(sa.text(
            'INSERT INTO quotas (project_uuid, resource, "limit", used) VALUES (:p, :r, -1, :u)'),
            {"p": project, "r": resource, "u": used})


def downgrade() -> None:
    conn = op.get_bind()
    with op.batch_alter_table("idempotency_keys") as batch:
        batch.drop_column("user_uuid")
    with op.batch_alter_table("flows") as batch:
        batch.drop_index("ix_flows_project_uuid")
        batch.drop_column("project_uuid")
    for table, kind in (("vms", "vm"), ("images", "image"), ("nodes", "node")):
        with op.batch_alter_table(table) as batch:
            batch.add_column(sa.Column("tags", sa.JSON(), nullable=False, server_default="[]"))
            batch.add_column(sa.Column("project", sa.String(63), nullable=False,
                                       server_default="default"))
        for row in conn.execute(sa.text(
                "SELECT resource_uuid, key, value FROM resource_tags WHERE resource_type = :t "
                "ORDER BY resource_uuid, key"), {"t": kind}).all():
            tag = row.key if not row.value else f"{row.key}={row.value}"
            current = conn.execute(sa.text(f"SELECT tags FROM {table} WHERE uuid = :u"),
                                   {"u": row.resource_uuid}).scalar()
            if current is None:
                continue
            tags = current if isinstance(current, list) else json.loads(current or "[]")
            conn.execute(sa.text(f"UPDATE {table} SET tags = :g WHERE uuid = :u"),
                         {"g": json.dumps([*tags, tag]), "u": row.resource_uuid})
    for table in ("vms", "images"):
        with op.batch_alter_table(table) as batch:
            batch.drop_index(f"ix_{table}_project_uuid")
            batch.drop_constraint(f"fk_{table}_project", type_="foreignkey")
            if table == "images":
                batch.drop_constraint("uq_images_upload_key", type_="unique")
                batch.drop_column("upload_key")
                batch.drop_column("visibility")
            batch.drop_column("project_uuid")
    for table in ("audit_log", "resource_tags", "quotas", "api_keys", "tokens",
                  "role_assignments", "users", "projects", "departments"):
        op.drop_table(table)
