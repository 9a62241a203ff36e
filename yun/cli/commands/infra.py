"""`yun node …` and `yun task …`: compute nodes and long operations."""

from __future__ import annotations

from typing import Annotated

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
    show_list,
)
from yun.cli.context import client
from yun.cli.output import emit, fields_table, note, rows_table
from yun.cli.parsing import LABEL_KEY, parse_label
from yun.client import DEFAULT_WAIT
from yun.proto.resources import Task

node_app = typer.Typer(help="Compute nodes (super admins).", no_args_is_help=True)
task_app = typer.Typer(help="Long-running operations.", no_args_is_help=True)

NODE_COLUMNS = ["uuid", "name", "status", "admin_state", "pool_name", "accel", "vcpus",
                "vcpus_reserved", "memory_mb", "memory_reserved_mb", "vm_count", "labels"]
TASK_COLUMNS = ["uuid", "kind", "resource_type", "resource_uuid", "state", "current_step",
                "created_at"]


@node_app.command("list", help="List compute nodes with their capacity and reservations.")
def node_list(q: Query = None, sort: Sort = None, limit: Limit = 100, cursor: Cursor = None,
              every: All = False, output: Output = None) -> None:
    show_list(client().nodes, q, sort, limit, cursor, every, output, NODE_COLUMNS, "Nodes")


def _gib(nbytes: int) -> str:
    return f"{nbytes / (1 << 30):.1f} GiB"


@node_app.command("show")
def node_show(node: Annotated[str, typer.Argument(help="node name or uuid")],
              output: Output = None) -> None:
    """Show one node, with its storage directories: used / total, percent, volumes and
    whether the directory is past its alarm threshold."""
    found = client().nodes.get(node)

    def tables() -> Table:
        data = found.model_dump(mode="json", exclude={"storage"})
        outer = Table.grid()
        outer.add_row(fields_table(data, f"Node {found.name}"))
        dirs = [{"path": d.path, "shared": d.shared,
                 "used": f"{_gib(d.used_bytes)} / {_gib(d.total_bytes)}",
                 "used %": f"{d.used_percent:g}%", "volumes": d.volumes,
                 "volumes take": _gib(d.allocated_bytes),
                 "alarm": "OVER THRESHOLD" if d.over_threshold else "ok"}
                for d in found.storage]
        outer.add_row(rows_table(dirs, None, "Storage directories") if dirs
                      else "no storage directories reported")
        return outer

    emit(found, output, table=tables)


def label_changes(changes: list[str]) -> tuple[dict[str, str], set[str]]:
    """``["ssd=true", "gpu-"]`` as labels to set and keys to remove (``KEY-``)."""
    set_: dict[str, str] = {}
    remove: set[str] = set()
    for change in changes:
        if "=" not in change and change.endswith("-"):
            key = change[:-1]
            if not LABEL_KEY.match(key):
                raise typer.BadParameter(f"{change!r}: {key!r} is not a label key")
            remove.add(key)
            continue
        label = parse_label(change)
        if label.key in set_ and set_[label.key] != label.value:
            raise typer.BadParameter(f"label {label.key!r} is given twice")
        set_[label.key] = label.value
    both = remove & set_.keys()
    if both:
        raise typer.BadParameter(f"label(s) both set and removed: {', '.join(sorted(both))}")
    return set_, remove


@node_app.command("label")
def node_label(
    node: Annotated[str, typer.Argument(help="node name or uuid")],
    changes: Annotated[list[str] | None, typer.Argument(
        help="KEY=VALUE to set, KEY- to remove", show_default=False)] = None,
    replace: Annotated[bool, typer.Option(
        help="make the given labels the node's only ones (none given: remove all)")] = False,
    idempotency_key: IdempotencyKey = None, output: Output = None,
) -> None:
    """Set or remove labels of a node (`ssd=true`, `gpu-`), which a VM's --node-label
    must match for the node to host it; other labels are kept unless --replace."""
    set_, remove = label_changes(changes or [])
    if not set_ and not remove and not replace:
        raise typer.BadParameter("give KEY=VALUE or KEY- (or --replace to remove all)")
    if replace:
        if remove:
            raise typer.BadParameter("--replace takes KEY=VALUE only: the labels not given "
                                     "are removed")
        labels = set_
    else:
        current = client().nodes.get(node).labels
        labels = {k: v for k, v in {**current, **set_}.items() if k not in remove}
    updated = client().nodes.set_labels(node, labels, idempotency_key=idempotency_key)
    note(f"labels of node {updated.name}: "
         f"{', '.join(f'{k}={v}' for k, v in updated.labels.items()) or 'none'}")
    emit(updated, output)


def _task_table(task: Task) -> Table:
    data = task.model_dump(mode="json")
    steps = data.pop("steps")
    table = fields_table(data)
    if steps:
        table.add_row("steps", rows_table(steps, ["name", "state", "started_at",
                                                  "finished_at", "error"]))
    return table


@task_app.command("show")
def task_show(
    task: Annotated[str, typer.Argument(help="task uuid")],
    wait: Annotated[bool, typer.Option(help="wait until the task ends")] = False,
    wait_timeout: Annotated[float, typer.Option(help="seconds to wait")] = DEFAULT_WAIT,
    output: Output = None,
) -> None:
    """Show a task and its steps."""
    found = (client().tasks.wait(task, wait_timeout, check=False) if wait
             else client().tasks.get(task))
    emit(found, output, table=lambda: _task_table(found))


@task_app.command("list")
def task_list(q: Query = None, sort: Sort = None, limit: Limit = 100, cursor: Cursor = None,
              every: All = False, output: Output = None) -> None:
    """List tasks."""
    show_list(client().tasks, q, sort, limit, cursor, every, output, TASK_COLUMNS, "Tasks")
