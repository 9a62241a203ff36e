"""`yun user …`: users (department admins; anyone may change their own password)."""

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
from yun.proto.identity import UserCreate, UserUpdate

app = typer.Typer(help="Users.", no_args_is_help=True)

COLUMNS = ["uuid", "name", "department_name", "enabled", "email"]
UserArg = Annotated[str, typer.Argument(help="user name or uuid")]
Password = Annotated[str | None, typer.Option(
    help="prompted for (hidden, twice) when not given")]


def _password(given: str | None) -> str:
    if given is not None:
        return given
    return str(typer.prompt("Password", hide_input=True, confirmation_prompt=True,
                            err=True))


@app.command("create")
def create(name: str, password: Password = None,
           email: Annotated[str | None, typer.Option()] = None,
           department: Annotated[str | None, typer.Option(
               help="department name or uuid; default: yours")] = None,
           description: str = "", tag: TagArgs = None,
           idempotency_key: IdempotencyKey = None, output: Output = None) -> None:
    """Create a user."""
    spec = UserCreate(name=name, password=_password(password), email=email,
                      department=department, description=description,
                      tags=parse_tags(tag or []))
    emit(client().users.create(spec, idempotency_key=idempotency_key), output)


add_list_and_show(app, "user", "Users", COLUMNS, lambda c: c.users,
                  "List the users you may see.")


@app.command("update")
def update(user: UserArg,
           email: Annotated[str | None, typer.Option()] = None,
           description: Annotated[str | None, typer.Option()] = None,
           enabled: Annotated[bool | None, typer.Option("--enable/--disable")] = None,
           idempotency_key: IdempotencyKey = None, output: Output = None) -> None:
    """Change a user's email, description, or whether they may log in."""
    fields = {"email": email, "description": description, "enabled": enabled}
    spec = UserUpdate.model_validate({k: v for k, v in fields.items() if v is not None})
    if not spec.model_fields_set:
        raise typer.BadParameter("nothing to change: give --email, --description, "
                                 "--enable or --disable")
    emit(client().users.update(user, spec, idempotency_key=idempotency_key), output)


@app.command("passwd")
def passwd(user: UserArg, password: Password = None,
           idempotency_key: IdempotencyKey = None, output: Output = None) -> None:
    """Set a user's password (yours, or one you administer)."""
    updated = client().users.update(user, UserUpdate(password=_password(password)),
                                    idempotency_key=idempotency_key)
    note(f"password of {updated.name} changed")


@app.command("delete")
def delete(user: UserArg,
           cascade: Annotated[bool, typer.Option(help="also delete their API keys")] = False,
           idempotency_key: IdempotencyKey = None, output: Output = None) -> None:
    """Delete a user (refused while they have API keys, unless --cascade)."""
    client().users.delete(user, cascade=cascade, idempotency_key=idempotency_key)
    note(f"user {user} deleted")


add_tag_commands(app, "user", lambda c: c.users.tags)
