"""`yun address-pool …`: public addresses and ports for VMs and elastic IPs (F-ADDR;
writes: platform admins)."""

from __future__ import annotations

from typing import Annotated, Any

import typer
from rich.table import Table

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
from yun.cli.output import emit, fields_table, note, rows_table
from yun.proto.resources import (
    AddressPool,
    AddressPoolCreate,
    AddressPoolKind,
    AddressRangeCreate,
)

app = typer.Typer(help="Address pools: public addresses (exclusive) or ports of public "
                       "addresses (shared) for VMs and elastic IPs (writes: platform "
                       "admins).", no_args_is_help=True)

COLUMNS = ["uuid", "name", "kind", "network", "total", "used", "free", "compute_pools"]
PoolArg = Annotated[str, typer.Argument(help="address pool name or uuid")]
RangeArg = Annotated[str, typer.Argument(help="addresses FIRST-LAST, e.g. "
                                              "203.0.113.10-203.0.113.50")]
PortsOpt = Annotated[str | None, typer.Option(
    "--ports", help="port range P-Q on each address (shared pools only), e.g. 10000-19999")]


def split_range(text: str) -> tuple[str, str]:
    """``A-B`` (or one address ``A``) as its first and last; the server checks them."""
    first, sep, last = text.strip().partition("-")
    if not first or (sep and not last):
        raise typer.BadParameter(f"{text!r}: write FIRST-LAST, e.g. 203.0.113.10-203.0.113.50")
    return first, last if sep else first


def split_ports(text: str | None) -> tuple[int | None, int | None]:
    """``P-Q`` (or one port ``P``) as integers; None: no ports."""
    if text is None:
        return None, None
    first, sep, last = text.strip().partition("-")
    try:
        return int(first), int(last if sep else first)
    except ValueError:
        raise typer.BadParameter(f"{text!r}: write P-Q with port numbers, e.g. "
                                 "10000-19999") from None


def range_spec(text: str, ports: str | None) -> AddressRangeCreate:
    first_ip, last_ip = split_range(text)
    first_port, last_port = split_ports(ports)
    return AddressRangeCreate(first_ip=first_ip, last_ip=last_ip, first_port=first_port,
                              last_port=last_port)


def pool_table(pool: AddressPool) -> Table:
    """An address pool's fields, then its ranges with their usage."""
    data: dict[str, Any] = pool.model_dump(mode="json")
    ranges = data.pop("ranges")
    data["compute_pools"] = ", ".join(data["compute_pools"]) or "none"
    table = fields_table(data)
    table.add_row("ranges", rows_table(ranges, ["first_ip", "last_ip", "first_port",
                                                "last_port", "total", "used"]))
    return table


@app.command("create")
def create(
    name: str,
    kind: Annotated[AddressPoolKind, typer.Option(
        case_sensitive=False, help="exclusive: whole addresses; shared: ports")],
    ranges: Annotated[list[str], typer.Option(
        "--range", help="addresses FIRST-LAST, repeatable")],
    ports: PortsOpt = None,
    network: Annotated[str | None, typer.Option(
        help="the pool's network (CIDR); default: the smallest holding the first "
             "range")] = None,
    description: Annotated[str, typer.Option(help="what the pool is for")] = "",
    tag: TagArgs = None,
    idempotency_key: IdempotencyKey = None,
    output: Output = None,
) -> None:
    """Create an address pool with its ranges (--ports applies to each of them)."""
    spec = AddressPoolCreate(name=name, kind=kind, network=network, description=description,
                             ranges=[range_spec(r, ports) for r in ranges],
                             tags=parse_tags(tag or []))
    pool = client().address_pools.create(spec, idempotency_key=idempotency_key)
    emit(pool, output, table=lambda: pool_table(pool))


@app.command("list")
def list_(q: Query = None, sort: Sort = None, limit: Limit = 100, cursor: Cursor = None,
          every: All = False, output: Output = None) -> None:
    """List address pools with their usage."""
    show_list(client().address_pools, q, sort, limit, cursor, every, output, COLUMNS,
              "Address pools")


@app.command("show")
def show(pool: PoolArg, output: Output = None) -> None:
    """Show one address pool: its ranges and how much of each is used."""
    found = client().address_pools.get(pool)
    emit(found, output, table=lambda: pool_table(found))


@app.command("add-range")
def add_range(pool: PoolArg, range_: RangeArg, ports: PortsOpt = None,
              idempotency_key: IdempotencyKey = None, output: Output = None) -> None:
    """Grow a pool online: the range's addresses are handed out at once."""
    changed = client().address_pools.add_range(pool, range_spec(range_, ports),
                                               idempotency_key=idempotency_key)
    emit(changed, output, table=lambda: pool_table(changed))
    note(f"range {range_} added to address pool {pool}")


@app.command("remove-range")
def remove_range(pool: PoolArg, range_: RangeArg, idempotency_key: IdempotencyKey = None,
                 output: Output = None) -> None:
    """Remove a range (refused while any of its addresses or ports is in use)."""
    first, last = split_range(range_)
    changed = client().address_pools.remove_range(pool, f"{first}-{last}",
                                                  idempotency_key=idempotency_key)
    emit(changed, output, table=lambda: pool_table(changed))
    note(f"range {range_} removed from address pool {pool}")


@app.command("delete")
def delete(pool: PoolArg, idempotency_key: IdempotencyKey = None) -> None:
    """Delete an address pool (refused while linked to a compute pool or in use)."""
    client().address_pools.delete(pool, idempotency_key=idempotency_key)
    note(f"address pool {pool} deleted")
