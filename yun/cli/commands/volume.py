"""`yun volume …` and `yun event …`: volumes (C-STO) and alarms (F-THIN)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

import typer

from yun.cli.common import (
    IdempotencyKey,
    Output,
    TagArgs,
    add_list_and_show,
    parse_tags,
)
from yun.cli.context import client
from yun.cli.output import emit, note
from yun.proto.resources import VolumeCreate

app = typer.Typer(help="Volumes: VMs' root disks and data volumes (attach, resize, "
                       "snapshots).", no_args_is_help=True)
snapshot_app = typer.Typer(help="Snapshots of a volume.", no_args_is_help=True)
app.add_typer(snapshot_app, name="snapshot")
event_app = typer.Typer(help="Alarms raised and cleared (super admins).",
                        no_args_is_help=True)

COLUMNS = ["uuid", "name", "kind", "size_gb", "thin", "storage_mode", "status", "vm_name",
           "node_name", "pool_name"]
SNAPSHOT_COLUMNS = ["name", "size_gb", "created_at"]
EVENT_COLUMNS = ["id", "at", "kind", "state", "severity", "resource_uuid", "message"]
VolumeArg = Annotated[str, typer.Argument(help="volume name or uuid")]
VmOpt = Annotated[str, typer.Option("--vm", help="VM name or uuid")]


@app.command("create")
def create(name: str,
           size_gb: Annotated[int, typer.Option("--size", min=1, max=65536,
                                                help="size in GiB")],
           pool: Annotated[str | None, typer.Option(
               help="pool whose storage it uses (default: the VM's, else 'default')")] = None,
           thin: Annotated[bool | None, typer.Option(
               "--thin/--thick", help="thin or preallocated (default: the pool's)")] = None,
           vm: Annotated[str | None, typer.Option(help="attach it to this VM at once")] = None,
           delete_with_vm: Annotated[bool, typer.Option(
               help="deleted with the VM it is attached to")] = False,
           description: str = "", tag: TagArgs = None,
           idempotency_key: IdempotencyKey = None, output: Output = None) -> None:
    """Create a data volume; it takes space on a node when first attached."""
    spec = VolumeCreate(name=name, size_gb=size_gb, pool=pool, thin=thin, vm=vm,
                        delete_with_vm=delete_with_vm, description=description,
                        tags=parse_tags(tag or []))
    emit(client().volumes.create(spec, idempotency_key=idempotency_key), output)


add_list_and_show(app, "volume", "Volumes", COLUMNS, lambda c: c.volumes,
                  "List the project's volumes.")


@app.command("attach")
def attach(volume: VolumeArg, vm: VmOpt,
           delete_with_vm: Annotated[bool | None, typer.Option(
               "--delete-with-vm/--keep-with-vm",
               help="deleted with that VM or not (default: as it was)")] = None,
           idempotency_key: IdempotencyKey = None, output: Output = None) -> None:
    """Attach a data volume to a VM (hot-plug when it runs)."""
    emit(client().volumes.attach(volume, vm, delete_with_vm=delete_with_vm,
                                 idempotency_key=idempotency_key), output)


@app.command("detach")
def detach(volume: VolumeArg, idempotency_key: IdempotencyKey = None,
           output: Output = None) -> None:
    """Detach a data volume from its VM; the volume and its data are kept."""
    emit(client().volumes.detach(volume, idempotency_key=idempotency_key), output)


@app.command("resize")
def resize(volume: VolumeArg,
           size_gb: Annotated[int, typer.Option("--size", min=1, max=65536,
                                                help="the new, larger size in GiB")],
           idempotency_key: IdempotencyKey = None, output: Output = None) -> None:
    """Grow a data volume (online when its VM runs)."""
    emit(client().volumes.resize(volume, size_gb, idempotency_key=idempotency_key), output)


@app.command("delete")
def delete(volume: VolumeArg, idempotency_key: IdempotencyKey = None) -> None:
    """Delete a detached data volume."""
    client().volumes.delete(volume, idempotency_key=idempotency_key)
    note(f"volume {volume} deleted")


@snapshot_app.command("create")
def snapshot_create(volume: VolumeArg, name: str, idempotency_key: IdempotencyKey = None,
                    output: Output = None) -> None:
    """Take a snapshot (the volume detached, or its VM stopped)."""
    emit(client().volumes.create_snapshot(volume, name, idempotency_key=idempotency_key),
         output)


@snapshot_app.command("list")
def snapshot_list(volume: VolumeArg, output: Output = None) -> None:
    """The volume's snapshots, oldest first."""
    emit(client().volumes.snapshots(volume), output, columns=SNAPSHOT_COLUMNS,
         title=f"Snapshots of {volume}")


@snapshot_app.command("revert")
def snapshot_revert(volume: VolumeArg, name: str, idempotency_key: IdempotencyKey = None,
                    output: Output = None) -> None:
    """Bring the volume back to a snapshot (detached, or its VM stopped)."""
    emit(client().volumes.revert_snapshot(volume, name, idempotency_key=idempotency_key),
         output)


@snapshot_app.command("delete")
def snapshot_delete(volume: VolumeArg, name: str,
                    idempotency_key: IdempotencyKey = None) -> None:
    """Delete a snapshot of the volume."""
    client().volumes.delete_snapshot(volume, name, idempotency_key=idempotency_key)
    note(f"snapshot {name} of volume {volume} deleted")


@event_app.command("list")
def event_list(kind: Annotated[str | None, typer.Option(
                   help="e.g. storage.threshold")] = None,
               resource: Annotated[str | None, typer.Option(
                   help="uuid of the resource (a node…)")] = None,
               since: Annotated[datetime | None, typer.Option(
                   help="events at or after this time")] = None,
               limit: Annotated[int, typer.Option(min=1, max=1000)] = 100,
               cursor: str | None = None, output: Output = None) -> None:
    """Alarms raised and cleared, newest first."""
    emit(client().events.find(kind=kind, resource=resource, since=since, limit=limit,
                              cursor=cursor), output, columns=EVENT_COLUMNS, title="Events")
