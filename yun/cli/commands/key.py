"""`yun key …`: SSH public keys for the guests you create (cloud-init);
`yun api-key …`: API key pairs; and `yun audit …`: the audit log.

`yun key` was the API key group before SSH keys came: its API key commands that do not
clash with the SSH key ones (`create`, `enable`, `disable`, `rotate`) still work there,
hidden, and say where they moved; `list`, `show` and `delete` are the SSH key ones now.
"""

from __future__ import annotations

import sys
from pathlib import Path
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
from yun.proto.ssh_keys import SshKeyError, looks_like_public_key, parse_public_key

app = typer.Typer(help="SSH public keys, put into the guests you create (cloud-init). "
                       "API key pairs are under `yun api-key`.",
                  no_args_is_help=True)
api_key_app = typer.Typer(help="API key pairs: sign requests without a password.",
                          no_args_is_help=True)
audit_app = typer.Typer(help="The audit log (project admins and above).",
                        no_args_is_help=True)

COLUMNS = ["uuid", "name", "access_key", "enabled", "project_uuid", "last_used_at"]
SSH_COLUMNS = ["uuid", "name", "fingerprint", "user_uuid", "created_at"]
AUDIT_COLUMNS = ["at", "user_name", "action", "resource_type", "resource_uuid", "status",
                 "result", "source_ip"]
KeyArg = Annotated[str, typer.Argument(help="key name or uuid")]


# --- SSH keys ---------------------------------------------------------------------------


def read_public_key(source: str) -> str:
    """The public key ``source`` gives: the key itself, or a ``.pub`` file's line
    (``-``: standard input). Refused before any request when it cannot be a key."""
    if source == "-":
        text = sys.stdin.read()
    elif looks_like_public_key(source):
        text = source
    else:
        path = Path(source).expanduser()
        if not path.is_file():
            raise typer.BadParameter(f"{source}: no such file (give a .pub file or the "
                                     "public key itself)")
        text = path.read_text(errors="replace")
    try:
        return parse_public_key(text).line
    except SshKeyError as exc:
        raise typer.BadParameter(f"{source}: {exc}") from None


def ssh_key_entry(value: str) -> str:
    """One ``--ssh-key`` of a VM: a ``.pub`` file (read: its key is sent), a public key,
    or the name of one of your stored keys (sent as it is, resolved by the API)."""
    path = Path(value).expanduser()
    if looks_like_public_key(value) or path.is_file():
        return read_public_key(value)
    if "/" in value or value.endswith(".pub"):
        raise typer.BadParameter(f"{value}: no such file")
    return value


@app.command("add")
def add(name: Annotated[str, typer.Argument(help="a name for the key")],
        public_key: Annotated[str, typer.Argument(
            help="a .pub file, the public key itself, or - for standard input")],
        idempotency_key: IdempotencyKey = None, output: Output = None) -> None:
    """Add one of your SSH public keys; name it in `yun vm create --ssh-key NAME`."""
    emit(client().ssh_keys.create(name, read_public_key(public_key),
                                  idempotency_key=idempotency_key), output)


add_list_and_show(app, "SSH key", "SSH keys", SSH_COLUMNS, lambda c: c.ssh_keys,
                  "List your SSH keys and their fingerprints.")


@app.command("delete")
def delete_ssh_key(key: KeyArg, idempotency_key: IdempotencyKey = None) -> None:
    """Delete an SSH key (guests already given it keep it)."""
    client().ssh_keys.delete(key, idempotency_key=idempotency_key)
    note(f"SSH key {key} deleted (API key pairs: `yun api-key delete`)")


# --- API key pairs ----------------------------------------------------------------------


def _issued(key: IssuedApiKey, output: Output) -> None:
    emit(key, output)
    note("Keep the secret now: it is shown only this once. Use it with "
         f"`yun login --access-key {key.access_key} --secret-key …` or "
         "YUN_ACCESS_KEY/YUN_SECRET_KEY.")


@api_key_app.command("create")
def create(name: str, description: str = "", idempotency_key: IdempotencyKey = None,
           output: Output = None) -> None:
    """Make a key pair for your token's project; its secret is shown once."""
    spec = ApiKeyCreate(name=name, description=description)
    _issued(client().keys.create(spec, idempotency_key=idempotency_key), output)


add_list_and_show(api_key_app, "key pair", "API keys", COLUMNS, lambda c: c.keys,
                  "List your key pairs (never their secrets).")


def _set_enabled(key: str, enabled: bool, idempotency_key: str | None,
                 output: Output) -> None:
    updated = client().keys.update(key, ApiKeyUpdate(enabled=enabled),
                                   idempotency_key=idempotency_key)
    emit(updated, output)


@api_key_app.command("enable")
def enable(key: KeyArg, idempotency_key: IdempotencyKey = None, output: Output = None) -> None:
    """Let a key pair sign requests again."""
    _set_enabled(key, True, idempotency_key, output)


@api_key_app.command("disable")
def disable(key: KeyArg, idempotency_key: IdempotencyKey = None,
            output: Output = None) -> None:
    """Refuse the requests a key pair signs, without deleting it."""
    _set_enabled(key, False, idempotency_key, output)


@api_key_app.command("rotate")
def rotate(key: KeyArg, idempotency_key: IdempotencyKey = None, output: Output = None) -> None:
    """Give a key pair a new secret (shown once); the old one stops working."""
    _issued(client().keys.rotate(key, idempotency_key=idempotency_key), output)


@api_key_app.command("delete")
def delete(key: KeyArg, idempotency_key: IdempotencyKey = None, output: Output = None) -> None:
    """Delete a key pair."""
    client().keys.delete(key, idempotency_key=idempotency_key)
    note(f"key {key} deleted")


def _moved(command: str) -> None:
    note(f"`yun key {command}` is `yun api-key {command}` now (`yun key` is for SSH keys)")


# The API key commands `yun key` had that do not clash with SSH keys keep working there.
@app.command("create", hidden=True)
def old_create(name: str, description: str = "", idempotency_key: IdempotencyKey = None,
               output: Output = None) -> None:
    """Make an API key pair (moved to `yun api-key create`)."""
    _moved("create")
    create(name, description, idempotency_key, output)


@app.command("enable", hidden=True)
def old_enable(key: KeyArg, idempotency_key: IdempotencyKey = None,
               output: Output = None) -> None:
    """Enable an API key pair (moved to `yun api-key enable`)."""
    _moved("enable")
    enable(key, idempotency_key, output)


@app.command("disable", hidden=True)
def old_disable(key: KeyArg, idempotency_key: IdempotencyKey = None,
                output: Output = None) -> None:
    """Disable an API key pair (moved to `yun api-key disable`)."""
    _moved("disable")
    disable(key, idempotency_key, output)


@app.command("rotate", hidden=True)
def old_rotate(key: KeyArg, idempotency_key: IdempotencyKey = None,
               output: Output = None) -> None:
    """Rotate an API key pair's secret (moved to `yun api-key rotate`)."""
    _moved("rotate")
    rotate(key, idempotency_key, output)


@audit_app.command("list")
def audit_list(q: Query = None, sort: Sort = None, limit: Limit = 100, cursor: Cursor = None,
               every: All = False, output: Output = None) -> None:
    """List audit records (who did what, when, from where)."""
    show_list(client().audit, q, sort, limit, cursor, every, output, AUDIT_COLUMNS, "Audit")
