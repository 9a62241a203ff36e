"""`yun role …`: roles and who holds them where."""

from __future__ import annotations

import re
from typing import Annotated

import typer

from yun.cli.common import IdempotencyKey, Limit, Output
from yun.cli.context import client
from yun.cli.output import emit, note
from yun.proto.identity import Role, RoleAssignmentCreate

app = typer.Typer(help="Roles and role assignments.", no_args_is_help=True)

ASSIGNMENT_COLUMNS = ["uuid", "user_name", "role", "project_name", "department_name",
                      "created_at"]
UUID = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-"
                  r"[0-9a-fA-F]{12}$")


@app.command("list")
def list_(output: Output = None) -> None:
    """List the roles and what each may do."""
    emit(client().roles.list(), output, columns=["name", "scope", "description"],
         title="Roles")


@app.command("grant")
def grant(user: Annotated[str, typer.Argument(help="user name or uuid")],
          role: Annotated[Role, typer.Argument(help="the role")],
          project: Annotated[str | None, typer.Option(help="for a project role")] = None,
          department: Annotated[str | None, typer.Option(
              help="for department_admin")] = None,
          idempotency_key: IdempotencyKey = None, output: Output = None) -> None:
    """Give a user a role: a project role on --project, department_admin on
    --department, super_admin on neither."""
    if project and department:
        raise typer.BadParameter("give --project or --department, not both")
    spec = RoleAssignmentCreate(user=user, role=role, project=project, department=department)
    emit(client().roles.grant(spec, idempotency_key=idempotency_key), output)


@app.command("revoke")
def revoke(assignment: Annotated[str, typer.Argument(help="assignment uuid")],
           idempotency_key: IdempotencyKey = None, output: Output = None) -> None:
    """Take a role assignment back."""
    client().roles.revoke(assignment, idempotency_key=idempotency_key)
    note(f"role assignment {assignment} revoked")


@app.command("assignments")
def assignments(user: Annotated[str | None, typer.Option(help="user name or uuid")] = None,
                project: Annotated[str | None, typer.Option(
                    help="project name or uuid")] = None,
                limit: Limit = 1000, output: Output = None) -> None:
    """List role assignments, of one user or on one project."""
    terms = []
    if user:  # the list filters on uuids: a name is looked up first
        terms.append(f"user_uuid={user if UUID.match(user) else client().users.get(user).uuid}")
    if project:
        uuid = project if UUID.match(project) else client().projects.get(project).uuid
        terms.append(f"project_uuid={uuid}")
    page = client().roles.assignments(q=" and ".join(terms) or None, limit=limit)
    emit(page, output, columns=ASSIGNMENT_COLUMNS, title="Role assignments")
