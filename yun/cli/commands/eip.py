"""`yun eip …`: elastic IPs, public addresses a project keeps and moves between its VMs."""

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
    TagArgs,
    parse_tags,
    show_list,
)
from yun.cli.context import client
from yun.cli.output import emit, note
from yun.proto.resources import ElasticIpAllocate

app = typer.Typer(help="Elastic IPs: public addresses of the project, bound to VMs of "
                       "sandbox-mono pools.", no_args_is_help=True)

COLUMNS = ["uuid", "name", "ip", "address_pool_name", "vm_name"]
EipArg = Annotated[str, typer.Argument(help="elastic IP uuid, name or address")]


@app.command("allocate")
def allocate(
    pool: Annotated[str, typer.Option("--pool", help="exclusive address pool name or uuid")],
    name: Annotated[str | None, typer.Option(help="default: eip-<address>")] = None,
    description: Annotated[str, typer.Option(help="what it is for")] = "",
    tag: TagArgs = None,
    idempotency_key: IdempotencyKey = None,
    output: Output = None,
) -> None:
    """Allocate an address of an exclusive pool (counted in the project's quota)."""
    spec = ElasticIpAllocate(address_pool=pool, name=name, description=description,
                             tags=parse_tags(tag or []))
    eip = client().eips.allocate(spec, idempotency_key=idempotency_key)
    emit(eip, output)
    note(f"elastic IP {eip.name} allocated: {eip.ip}")


@app.command("list")
def list_(q: Query = None, sort: Sort = None, limit: Limit = 100, cursor: Cursor = None,
          every: All = False, output: Output = None) -> None:
    """List the project's elastic IPs."""
    show_list(client().eips, q, sort, limit, cursor, every, output, COLUMNS, "Elastic IPs")


@app.command("show")
def show(eip: EipArg, output: Output = None) -> None:
    """Show one elastic IP and the VM it is bound to."""
    emit(client().eips.get(eip), output)


@app.command("bind")
def bind(eip: EipArg, vm: Annotated[str, typer.Argument(help="VM name or uuid")],
         idempotency_key: IdempotencyKey = None, output: Output = None) -> None:
    """Bind an elastic IP to a VM of a sandbox-mono pool (moving it if bound elsewhere)."""
    before = client().eips.get(eip)
    after = client().eips.bind(eip, vm, idempotency_key=idempotency_key)
    emit(after, output)
    moved = (f" (moved from VM {before.vm_name or before.vm_uuid})"
             if before.vm_uuid and before.vm_uuid != after.vm_uuid else "")
    note(f"elastic IP {after.name} ({after.ip}) bound to VM {after.vm_name}{moved}")


@app.command("unbind")
def unbind(eip: EipArg, idempotency_key: IdempotencyKey = None,
           output: Output = None) -> None:
    """Unbind an elastic IP from its VM; the project keeps it."""
    before = client().eips.get(eip)
    after = client().eips.unbind(eip, idempotency_key=idempotency_key)
    emit(after, output)
    note(f"elastic IP {after.name} ({after.ip}) unbound from VM "
         f"{before.vm_name or before.vm_uuid}")


@app.command("release")
def release(eip: EipArg, idempotency_key: IdempotencyKey = None) -> None:
    """Give an elastic IP back to its pool; a bound one is unbound first."""
    gone = client().eips.release(eip, idempotency_key=idempotency_key)
    if gone.vm_uuid:
        note(f"elastic IP {gone.name} ({gone.ip}) unbound from VM "
             f"{gone.vm_name or gone.vm_uuid} and released")
    else:
        note(f"elastic IP {gone.name} ({gone.ip}) released")
