"""`yun pool …`: compute pools, their templates and their nodes (writes: platform admins)."""

from __future__ import annotations

from typing import Annotated, Any

import typer
from rich.table import Table
from rich.text import Text

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
from yun.cli.parsing import NamedWeight, parse_weight, weights_of
from yun.proto.messages import CpuQos
from yun.proto.resources import NetworkMode, Pool, PoolCreate, PoolUpdate, StorageMode

app = typer.Typer(help="Compute pools: nodes sharing a template for their VMs "
                       "(writes: platform admins).", no_args_is_help=True)

COLUMNS = ["uuid", "name", "zone_name", "network_mode", "storage_mode", "qos_level",
           "cpu_ratio", "memory_ratio", "disk_ratio", "node_count", "vm_count"]
PoolArg = Annotated[str, typer.Argument(help="pool name or uuid")]
NodeArg = Annotated[str, typer.Argument(help="node name or uuid")]

# The template options, shared by create and update; None leaves a field as it is
# (update) or to the platform's default (create).
ZoneOpt = Annotated[str | None, typer.Option(help="zone name or uuid")]
DescriptionOpt = Annotated[str | None, typer.Option(help="what the pool is for")]
NetworkModeOpt = Annotated[NetworkMode | None, typer.Option(
    case_sensitive=False, help="how its VMs are networked")]
StorageModeOpt = Annotated[StorageMode | None, typer.Option(
    case_sensitive=False, help="local disks or shared storage")]
ThinOpt = Annotated[bool | None, typer.Option(
    "--thin/--thick", help="thin-provisioned or fully allocated disks", show_default=False)]
HaOpt = Annotated[bool | None, typer.Option(
    "--ha/--no-ha", help="restart VMs elsewhere when a node fails", show_default=False)]
AddressPoolOpt = Annotated[str | None, typer.Option(help="linked address pool")]
QosLevelOpt = Annotated[CpuQos | None, typer.Option(
    case_sensitive=False, help="CPU QoS level of new VMs")]
RatioHelp = "overcommit ratio of {}, > 0 and <= 64 (e.g. {})"
CpuRatioOpt = Annotated[float | None, typer.Option(help=RatioHelp.format("vCPUs", 4.0))]
MemoryRatioOpt = Annotated[float | None, typer.Option(help=RatioHelp.format("memory", 1.0))]
DiskRatioOpt = Annotated[float | None, typer.Option(help=RatioHelp.format("disk", 1.0))]
FilterOpt = Annotated[list[str] | None, typer.Option(
    "--filter", help="scheduler filter by name (status, vcpu, memory, disk, labels, "
                     "capabilities, affinity, anti_affinity), repeatable, in order; "
                     "replaces the list")]
WeightOpt = Annotated[list[NamedWeight] | None, typer.Option(
    "--weight", parser=parse_weight, metavar="NAME=WEIGHT",
    help="weigher (cpu, memory, disk, network) and its weight, 0-100, repeatable, "
         "e.g. cpu=2; replaces the set")]


def _template(**fields: Any) -> dict[str, Any]:
    """The given template fields (None: not given), weights as a mapping."""
    fields["weights"] = weights_of(fields.get("weights"))
    if not fields.get("filters"):
        fields["filters"] = None
    return {key: value for key, value in fields.items() if value is not None}


def pool_table(pool: Pool) -> Table:
    """A pool's fields, then its capacity per resource class and its warnings."""
    data = pool.model_dump(mode="json")
    capacity = data.pop("capacity")
    warnings = data.pop("warnings")
    table = fields_table(data)
    if capacity:
        table.add_row("capacity", rows_table(capacity, ["resource_class", "usable", "used",
                                                        "free"]))
    table.add_row("warnings", Text("\n".join(warnings), style="yellow") if warnings
                  else Text("none"))
    return table


@app.command("create")
def create(
    name: str,
    zone: ZoneOpt = None,
    description: DescriptionOpt = None,
    network_mode: NetworkModeOpt = None,
    storage_mode: StorageModeOpt = None,
    thin: ThinOpt = None,
    ha: HaOpt = None,
    address_pool: AddressPoolOpt = None,
    qos_level: QosLevelOpt = None,
    cpu_ratio: CpuRatioOpt = None,
    memory_ratio: MemoryRatioOpt = None,
    disk_ratio: DiskRatioOpt = None,
    filters: FilterOpt = None,
    weights: WeightOpt = None,
    tag: TagArgs = None,
    idempotency_key: IdempotencyKey = None,
    output: Output = None,
) -> None:
    """Create a compute pool; options left out take the platform's defaults."""
    spec = PoolCreate.model_validate({
        "name": name, "tags": parse_tags(tag or []),
        **_template(zone=zone, description=description, network_mode=network_mode,
                    storage_mode=storage_mode, thin=thin, ha=ha, address_pool=address_pool,
                    qos_level=qos_level, cpu_ratio=cpu_ratio, memory_ratio=memory_ratio,
                    disk_ratio=disk_ratio, filters=filters, weights=weights)})
    pool = client().pools.create(spec, idempotency_key=idempotency_key)
    emit(pool, output, table=lambda: pool_table(pool))


@app.command("list")
def list_(q: Query = None, sort: Sort = None, limit: Limit = 100, cursor: Cursor = None,
          every: All = False, output: Output = None) -> None:
    """List compute pools."""
    show_list(client().pools, q, sort, limit, cursor, every, output, COLUMNS, "Pools")


@app.command("show")
def show(pool: PoolArg, output: Output = None) -> None:
    """Show one pool: its template, capacity and warnings."""
    found = client().pools.get(pool)
    emit(found, output, table=lambda: pool_table(found))


@app.command("update")
def update(
    pool: PoolArg,
    zone: ZoneOpt = None,
    description: DescriptionOpt = None,
    network_mode: NetworkModeOpt = None,
    storage_mode: StorageModeOpt = None,
    thin: ThinOpt = None,
    ha: HaOpt = None,
    address_pool: AddressPoolOpt = None,
    qos_level: QosLevelOpt = None,
    cpu_ratio: CpuRatioOpt = None,
    memory_ratio: MemoryRatioOpt = None,
    disk_ratio: DiskRatioOpt = None,
    filters: FilterOpt = None,
    weights: WeightOpt = None,
    idempotency_key: IdempotencyKey = None,
    output: Output = None,
) -> None:
    """Change some of a pool's template (options left out are kept)."""
    fields = _template(zone=zone, description=description, network_mode=network_mode,
                       storage_mode=storage_mode, thin=thin, ha=ha, address_pool=address_pool,
                       qos_level=qos_level, cpu_ratio=cpu_ratio, memory_ratio=memory_ratio,
                       disk_ratio=disk_ratio, filters=filters, weights=weights)
    if not fields:
        raise typer.BadParameter("give at least one field to change, e.g. --cpu-ratio 8")
    spec = PoolUpdate.model_validate(fields)
    updated = client().pools.update(pool, spec, idempotency_key=idempotency_key)
    emit(updated, output, table=lambda: pool_table(updated))


@app.command("delete")
def delete(pool: PoolArg, idempotency_key: IdempotencyKey = None) -> None:
    """Delete a pool (refused while it holds nodes)."""
    client().pools.delete(pool, idempotency_key=idempotency_key)
    note(f"pool {pool} deleted")


@app.command("add-node")
def add_node(pool: PoolArg, node: NodeArg, idempotency_key: IdempotencyKey = None,
             output: Output = None) -> None:
    """Add an unassigned node to a pool; it gets new VMs at once."""
    emit(client().pools.add_node(pool, node, idempotency_key=idempotency_key), output)
    note(f"node {node} added to pool {pool}")


@app.command("drain-node")
def drain_node(pool: PoolArg, node: NodeArg, idempotency_key: IdempotencyKey = None,
               output: Output = None) -> None:
    """Drain a node: it gets no new VM and keeps the ones it runs."""
    emit(client().pools.drain_node(pool, node, idempotency_key=idempotency_key), output)
    note(f"node {node} of pool {pool} drained")


@app.command("enable-node")
def enable_node(pool: PoolArg, node: NodeArg, idempotency_key: IdempotencyKey = None,
                output: Output = None) -> None:
    """Undrain a node: it gets new VMs again."""
    emit(client().pools.enable_node(pool, node, idempotency_key=idempotency_key), output)
    note(f"node {node} of pool {pool} enabled")


@app.command("remove-node")
def remove_node(pool: PoolArg, node: NodeArg, idempotency_key: IdempotencyKey = None,
                output: Output = None) -> None:
    """Take a node out of a pool (refused while a VM is on it); it becomes unassigned."""
    emit(client().pools.remove_node(pool, node, idempotency_key=idempotency_key), output)
    note(f"node {node} removed from pool {pool}")
