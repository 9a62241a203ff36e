"""`yun department …`: departments (super admins)."""

from __future__ import annotations

from typing import Annotated

import typer

from yun.cli.common import (
    IdempotencyKey,
    Output,
    TagArgs,
    add_list_and_show,
    add_tag_commands,
    parse_tags,
)
from yun.cli.context import client
from yun.cli.output import emit, note
from yun.proto.identity import DepartmentCreate

app = typer.Typer(help="Departments (super admins).", no_args_is_help=True)

COLUMNS = ["uuid", "name", "project_count", "user_count", "description"]
DepartmentArg = Annotated[str, typer.Argument(help="department name or uuid")]


@app.command("create")
def create(name: str, description: str = "", tag: TagArgs = None,
           idempotency_key: IdempotencyKey = None, output: Output = None) -> None:
    """Create a department."""
    spec = DepartmentCreate(name=name, description=description, tags=parse_tags(tag or []))
    emit(client().departments.create(spec, idempotency_key=idempotency_key), output)


add_list_and_show(app, "department", "Departments", COLUMNS, lambda c: c.departments,
                  "List departments.")


@app.command("delete")
def delete(department: DepartmentArg, idempotency_key: IdempotencyKey = None,
           output: Output = None) -> None:
    """Delete a department (refused while it holds projects or users)."""
    client().departments.delete(department, idempotency_key=idempotency_key)
    note(f"department {department} deleted")


add_tag_commands(app, "department", lambda c: c.departments.tags)
