"""`yun key …`: API key pairs, and `yun audit …`: the audit log."""

from __future__ import annotations

from typing import Annotated

import typer

from yun.cli.common import (
    All,
    Cursor,
    IdempotencyKey,
    Limit,
    Output,
    Query,
    Sort,
    add_list_and_show,
    show_list,
)
from yun.cli.context import client
from yun.cli.output import emit, note
from yun.proto.identity import ApiKeyCreate, ApiKeyUpdate, IssuedApiKey

app = typer.Typer(help="API key pairs: sign requests without a password.",
                  no_args_is_help=True)
audit_app = typer.Typer(help="The audit log (project admins and above).",
                        no_args_is_help=True)

COLUMNS = ["uuid", "name", "access_key", "enabled", "project_uuid", "last_used_at"]
AUDIT_COLUMNS = ["at", "user_name", "action", "resource_type", "resource_uuid", "status",
                 "result", "source_ip"]
KeyArg = Annotated[str, typer.Argument(help="key name or uuid")]


def _issued(key: IssuedApiKey, output: Output) -> None:
    emit(key, output)
    note("Keep the secret now: it is shown only this once. Use it with "
         f"`yun login --access-key {key.access_key} --secret-key …` or "
         "YUN_ACCESS_KEY/YUN_SECRET_KEY.")


@app.command("create")
def create(name: str, description: str = "", idempotency_key: IdempotencyKey = None,
           output: Output = None) -> None:
    """Make a key pair for your token's project; its secret is shown once."""
    spec = ApiKeyCreate(name=name, description=description)
    _issued(client().keys.create(spec, idempotency_key=idempotency_key), output)


add_list_and_show(app, "key pair", "API keys", COLUMNS, lambda c: c.keys,
                  "List your key pairs (never their secrets).")


def _set_enabled(key: str, enabled: bool, idempotency_key: str | None,
                 output: Output) -> None:
    updated = client().keys.update(key, ApiKeyUpdate(enabled=enabled),
                                   idempotency_key=idempotency_key)
    emit(updated, output)


@app.command("enable")
def enable(key: KeyArg, idempotency_key: IdempotencyKey = None, output: Output = None) -> None:
    """Let a key pair sign requests again."""
    _set_enabled(key, True, idempotency_key, output)


@app.command("disable")
def disable(key: KeyArg, idempotency_key: IdempotencyKey = None,
            output: Output = None) -> None:
    """Refuse the requests a key pair signs, without deleting it."""
    _set_enabled(key, False, idempotency_key, output)


@app.command("rotate")
def rotate(key: KeyArg, idempotency_key: IdempotencyKey = None, output: Output = None) -> None:
    """Give a key pair a new secret (shown once); the old one stops working."""
    _issued(client().keys.rotate(key, idempotency_key=idempotency_key), output)


@app.command("delete")
def delete(key: KeyArg, idempotency_key: IdempotencyKey = None, output: Output = None) -> None:
    """Delete a key pair."""
    client().keys.delete(key, idempotency_key=idempotency_key)
    note(f"key {key} deleted")


@audit_app.command("list")
def audit_list(q: Query = None, sort: Sort = None, limit: Limit = 100, cursor: Cursor = None,
               every: All = False, output: Output = None) -> None:
    """List audit records (who did what, when, from where)."""
    show_list(client().audit, q, sort, limit, cursor, every, output, AUDIT_COLUMNS, "Audit")
