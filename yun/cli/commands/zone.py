"""`yun zone …`: zones, each holding compute pools (writes: platform admins)."""

from __future__ import annotations

from typing import Annotated

import typer

from yun.cli.common import IdempotencyKey, Output, TagArgs, add_list_and_show, parse_tags
from yun.cli.context import client
from yun.cli.output import emit, note
from yun.proto.resources import ZoneCreate, ZoneUpdate

app = typer.Typer(help="Zones: groups of compute pools (writes: platform admins).",
                  no_args_is_help=True)

COLUMNS = ["uuid", "name", "pool_count", "description"]
ZoneArg = Annotated[str, typer.Argument(help="zone name or uuid")]


@app.command("create")
def create(name: str, description: str = "", tag: TagArgs = None,
           idempotency_key: IdempotencyKey = None, output: Output = None) -> None:
    """Create a zone."""
    spec = ZoneCreate(name=name, description=description, tags=parse_tags(tag or []))
    emit(client().zones.create(spec, idempotency_key=idempotency_key), output)


add_list_and_show(app, "zone", "Zones", COLUMNS, lambda c: c.zones, "List zones.")


@app.command("update")
def update(zone: ZoneArg,
           description: Annotated[str | None, typer.Option(help="the new description")] = None,
           idempotency_key: IdempotencyKey = None, output: Output = None) -> None:
    """Change a zone's description."""
    if description is None:
        raise typer.BadParameter("give what to change, e.g. --description 'rack 4'")
    emit(client().zones.update(zone, ZoneUpdate(description=description),
                               idempotency_key=idempotency_key), output)


@app.command("delete")
def delete(zone: ZoneArg, idempotency_key: IdempotencyKey = None) -> None:
    """Delete a zone (refused while it holds pools)."""
    client().zones.delete(zone, idempotency_key=idempotency_key)
    note(f"zone {zone} deleted")
