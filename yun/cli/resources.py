"""User commands: `yun vm …`, `yun image …`, `yun node …`, `yun task …`."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn
from rich.table import Table

from yun.cli.api import Api, ApiError

out = Console()
err = Console(stderr=True)

vm_app = typer.Typer(help="Virtual machines.", no_args_is_help=True)
image_app = typer.Typer(help="Disk and ISO images.", no_args_is_help=True)
node_app = typer.Typer(help="Compute nodes.", no_args_is_help=True)
task_app = typer.Typer(help="Long-running operations.", no_args_is_help=True)

JsonOpt = Annotated[bool, typer.Option("--json", help="print JSON instead of a table")]
NoWait = Annotated[bool, typer.Option("--no-wait", help="return once the task is accepted")]


@contextlib.contextmanager
def api() -> Iterator[Api]:
    client = Api()
    try:
        yield client
    except ApiError as exc:
        err.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(1) from exc
    finally:
        client.close()


def table(rows: list[dict[str, Any]], columns: list[str], title: str) -> None:
    t = Table(title=title)
    for column in columns:
        t.add_column(column)
    for row in rows:
        t.add_row(*("" if row.get(c) is None else str(row.get(c)) for c in columns))
    out.print(t)


def show(obj: dict[str, Any], as_json: bool) -> None:
    if as_json:
        out.print_json(json.dumps(obj))
        return
    t = Table(show_header=False)
    t.add_column("field", style="bold")
    t.add_column("value")
    for key, value in obj.items():
        t.add_row(key, json.dumps(value) if isinstance(value, (list, dict)) else str(value))
    out.print(t)


def follow(client: Api, accepted: dict[str, Any], wait: bool, what: str) -> dict[str, Any]:
    task = accepted["task"]
    if not wait:
        out.print(f"{what}: task {task['uuid']} {task['state']}")
        return task
    with out.status(f"{what}…") as status:
        task = client.wait_task(task["uuid"], on_update=lambda t: status.update(
            f"{what}: {t['state']} ({t.get('current_step') or 'queued'})"))
    if task["state"] != "succeeded":
        err.print(f"[red]{what} failed:[/red] {task.get('error')}")
        raise typer.Exit(1)
    out.print(f"{what}: [green]done[/green]")
    return task


# -- vm ----------------------------------------------------------------------------------


@vm_app.command("create")
def vm_create(
    name: str,
    image: Annotated[str, typer.Option(help="image name or uuid")],
    vcpus: int = 1, memory: Annotated[int, typer.Option(help="MiB")] = 256,
    disk: Annotated[int, typer.Option(help="GiB")] = 1,
    no_wait: NoWait = False, as_json: JsonOpt = False,
) -> None:
    """Create a VM from an image and boot it."""
    with api() as client:
        accepted = client.request("POST", "/vms", json={
            "name": name, "image": image, "vcpus": vcpus, "memory_mb": memory,
            "disk_gb": disk})
        follow(client, accepted, not no_wait, f"create {name}")
        show(client.request("GET", f"/vms/{accepted['resource']['uuid']}"), as_json)


@vm_app.command("list")
def vm_list(state: str | None = None, as_json: JsonOpt = False) -> None:
    """List VMs."""
    with api() as client:
        page = client.request("GET", "/vms", params={"limit": 1000, **(
            {"state": state} if state else {})})
    if as_json:
        out.print_json(json.dumps(page["items"]))
        return
    table(page["items"], ["uuid", "name", "state", "vcpus", "memory_mb", "ip", "node_name"],
          f"VMs ({page['total']})")


@vm_app.command("show")
def vm_show(vm: str, as_json: JsonOpt = False) -> None:
    """Show one VM (by name or uuid)."""
    with api() as client:
        show(client.request("GET", f"/vms/{vm}"), as_json)


def _power(vm: str, action: str, no_wait: bool, body: dict[str, Any] | None = None) -> None:
    with api() as client:
        accepted = client.request("POST", f"/vms/{vm}/{action}", json=body)
        follow(client, accepted, not no_wait, f"{action} {vm}")


@vm_app.command("start")
def vm_start(vm: str, no_wait: NoWait = False) -> None:
    """Power a VM on."""
    _power(vm, "start", no_wait)


@vm_app.command("stop")
def vm_stop(vm: str, force: Annotated[bool, typer.Option(help="power off at once")] = False,
            timeout: Annotated[float, typer.Option(help="seconds before forcing")] = 60,
            no_wait: NoWait = False) -> None:
    """Shut a VM down (ACPI), forcing it off after the timeout."""
    _power(vm, "stop", no_wait, {"force": force, "timeout": timeout})


@vm_app.command("reboot")
def vm_reboot(vm: str, no_wait: NoWait = False) -> None:
    """Reboot a VM."""
    _power(vm, "reboot", no_wait)


@vm_app.command("delete")
def vm_delete(vm: str, no_wait: NoWait = False) -> None:
    """Delete a VM with its disks, address and network port."""
    with api() as client:
        accepted = client.request("DELETE", f"/vms/{vm}")
        follow(client, accepted, not no_wait, f"delete {vm}")


@vm_app.command("console-log")
def vm_console_log(vm: str, max_bytes: int = 65536) -> None:
    """Print what the VM wrote on its serial console."""
    with api() as client:
        text = client.request("GET", f"/vms/{vm}/console-log", params={"max_bytes": max_bytes})
    out.out(text, highlight=False)


@vm_app.command("console")
def vm_console(vm: str, as_json: JsonOpt = False) -> None:
    """Where the VM's VNC display is."""
    with api() as client:
        show(client.request("GET", f"/vms/{vm}/console"), as_json)


# -- image -------------------------------------------------------------------------------


@image_app.command("upload")
def image_upload(
    path: Annotated[Path, typer.Argument(exists=True, dir_okay=False, readable=True)],
    name: Annotated[str, typer.Option(help="image name")],
    format: Annotated[str | None, typer.Option(help="declare the format (needed for raw)")]
    = None,
    as_json: JsonOpt = False,
) -> None:
    """Upload a disk image or ISO, with a progress bar."""
    size = path.stat().st_size
    with api() as client, Progress(
        "[progress.description]{task.description}", BarColumn(), DownloadColumn(),
        TransferSpeedColumn(), console=err,
    ) as progress:
        bar = progress.add_task(f"upload {path.name}", total=size)
        image = client.upload(path, name, format, lambda n: progress.advance(bar, n))
    show(image, as_json)


@image_app.command("list")
def image_list(as_json: JsonOpt = False) -> None:
    """List images."""
    with api() as client:
        page = client.request("GET", "/images", params={"limit": 1000})
    if as_json:
        out.print_json(json.dumps(page["items"]))
        return
    table(page["items"], ["uuid", "name", "status", "format", "size", "sha256"],
          f"Images ({page['total']})")


@image_app.command("show")
def image_show(image: str, as_json: JsonOpt = False) -> None:
    """Show one image."""
    with api() as client:
        show(client.request("GET", f"/images/{image}"), as_json)


@image_app.command("delete")
def image_delete(image: str) -> None:
    """Delete an image no VM uses."""
    with api() as client:
        client.request("DELETE", f"/images/{image}")
    out.print(f"image {image} deleted")


# -- node / task -------------------------------------------------------------------------


@node_app.command("list")
def node_list(as_json: JsonOpt = False) -> None:
    """List compute nodes with their capacity and reservations."""
    with api() as client:
        page = client.request("GET", "/nodes", params={"limit": 1000})
    if as_json:
        out.print_json(json.dumps(page["items"]))
        return
    table(page["items"], ["uuid", "name", "status", "accel", "vcpus", "vcpus_reserved",
                          "memory_mb", "memory_reserved_mb", "vm_count"],
          f"Nodes ({page['total']})")


@task_app.command("show")
def task_show(task: str, as_json: JsonOpt = False) -> None:
    """Show a task and its steps."""
    with api() as client:
        show(client.request("GET", f"/tasks/{task}"), as_json)
