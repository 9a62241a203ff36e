"""`yun node …` and `yun task …`: compute nodes and long operations."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from yun.cli.common import All, Cursor, Limit, Output, Query, Sort, add_list_and_show, show_list
from yun.cli.context import client
from yun.cli.output import emit, fields_table, rows_table
from yun.client import DEFAULT_WAIT
from yun.proto.resources import Task

node_app = typer.Typer(help="Compute nodes (super admins).", no_args_is_help=True)
task_app = typer.Typer(help="Long-running operations.", no_args_is_help=True)

NODE_COLUMNS = ["uuid", "name", "status", "accel", "vcpus", "vcpus_reserved", "memory_mb",
                "memory_reserved_mb", "vm_count"]
TASK_COLUMNS = ["uuid", "kind", "resource_type", "resource_uuid", "state", "current_step",
                "created_at"]


add_list_and_show(node_app, "node", "Nodes", NODE_COLUMNS, lambda c: c.nodes,
                  "List compute nodes with their capacity and reservations.")


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
