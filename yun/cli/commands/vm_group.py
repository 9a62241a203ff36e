"""`yun vm-group …`: affinity and anti-affinity groups of the project's VMs."""

from __future__ import annotations

from typing import Annotated

import typer

from yun.cli.common import IdempotencyKey, Output, TagArgs, add_list_and_show, parse_tags
from yun.cli.context import client
from yun.cli.output import emit, note
from yun.proto.resources import GroupPolicy, VmGroupCreate

app = typer.Typer(help="VM groups: keep VMs on one node (affinity) or on distinct nodes "
                       "(anti-affinity).", no_args_is_help=True)

COLUMNS = ["uuid", "name", "policy", "members", "description"]
GroupArg = Annotated[str, typer.Argument(help="VM group name or uuid")]


@app.command("create")
def create(name: str,
           policy: Annotated[GroupPolicy, typer.Option(
               case_sensitive=False,
               help="affinity: one node for all; anti-affinity: a node each")],
           description: str = "", tag: TagArgs = None,
           idempotency_key: IdempotencyKey = None, output: Output = None) -> None:
    """Create a VM group; VMs join it with `yun vm create --group NAME`."""
    spec = VmGroupCreate(name=name, policy=policy, description=description,
                         tags=parse_tags(tag or []))
    emit(client().vm_groups.create(spec, idempotency_key=idempotency_key), output)


add_list_and_show(app, "VM group", "VM groups", COLUMNS, lambda c: c.vm_groups,
                  "List the project's VM groups.")


@app.command("delete")
def delete(group: GroupArg, idempotency_key: IdempotencyKey = None) -> None:
    """Delete a VM group (refused while it has members)."""
    client().vm_groups.delete(group, idempotency_key=idempotency_key)
    note(f"VM group {group} deleted")
