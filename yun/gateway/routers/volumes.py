"""Volumes (C-STO): data volumes created, attached to and detached from VMs (hot-plug),
resized, snapshotted and deleted; and the events list (F-THIN alarms)."""

from __future__ import annotations

from typing import Annotated

from fastapi import Path, Query, Response

from yun.gateway.routers.common import (
    Ctx,
    IdempotencyKey,
    Listing,
    RefPath,
    Up,
    answer,
    make_router,
)
from yun.proto.resources import (
    Event,
    Page,
    Volume,
    VolumeAttach,
    VolumeCreate,
    VolumeResize,
    VolumeSnapshot,
    VolumeSnapshotCreate,
)

router = make_router("volumes")
events_router = make_router("events")
# A node may take a while: a thick volume is preallocated, a guest releases a disk slowly.
VOLUME_TIMEOUT = 330.0
SnapshotPath = Annotated[str, Path(min_length=1, max_length=63,
                                   pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
                                   description="the snapshot's name")]


@router.get("/volumes", response_model=Page[Volume])
async def list_volumes(ctx: Ctx, up: Up, listing: Listing) -> Response:
    """The project's volumes: root disks of its VMs and data volumes."""
    return answer(await up.call(ctx, "GET", "/volumes", params=listing), Page[Volume])


@router.post("/volumes", response_model=Volume, status_code=201)
async def create_volume(body: VolumeCreate, ctx: Ctx, up: Up,
                        idempotency_key: IdempotencyKey = None) -> Response:
    """Create a data volume in a pool's storage (thin or thick: the pool's setting unless
    given). It takes space on a node when first attached (local mode: on that VM's node,
    for good); with `vm` it is attached at once. A volume larger than the node's free
    storage is refused (409) naming the node."""
    return answer(await up.call(ctx, "POST", "/volumes", body=body,
                                idempotency_key=idempotency_key, timeout=VOLUME_TIMEOUT),
                  Volume)


@router.get("/volumes/{ref}", response_model=Volume)
async def show_volume(ref: RefPath, ctx: Ctx, up: Up) -> Response:
    """One volume, by uuid or name."""
    return answer(await up.call(ctx, "GET", "/volumes/{ref}", path={"ref": ref}), Volume)


@router.delete("/volumes/{ref}", status_code=204)
async def delete_volume(ref: RefPath, ctx: Ctx, up: Up,
                        idempotency_key: IdempotencyKey = None) -> Response:
    """Delete a detached data volume and its snapshots (409 while it is attached)."""
    return answer(await up.call(ctx, "DELETE", "/volumes/{ref}", path={"ref": ref},
                                idempotency_key=idempotency_key, timeout=VOLUME_TIMEOUT),
                  None)


@router.post("/volumes/{ref}/attach", response_model=Volume)
async def attach_volume(ref: RefPath, body: VolumeAttach, ctx: Ctx, up: Up,
                        idempotency_key: IdempotencyKey = None) -> Response:
    """Attach a data volume to a running VM (hot-plug: the guest sees a new disk) or a
    stopped one. A volume is attached to one VM at most (409 naming it); in local mode
    it must be on the VM's node."""
    return answer(await up.call(ctx, "POST", "/volumes/{ref}/attach", path={"ref": ref},
                                body=body, idempotency_key=idempotency_key,
                                timeout=VOLUME_TIMEOUT), Volume)


@router.post("/volumes/{ref}/detach", response_model=Volume)
async def detach_volume(ref: RefPath, ctx: Ctx, up: Up,
                        idempotency_key: IdempotencyKey = None) -> Response:
    """Detach a data volume from its VM (live when it runs); the volume and its data stay."""
    return answer(await up.call(ctx, "POST", "/volumes/{ref}/detach", path={"ref": ref},
                                idempotency_key=idempotency_key, timeout=VOLUME_TIMEOUT),
                  Volume)


@router.post("/volumes/{ref}/resize", response_model=Volume)
async def resize_volume(ref: RefPath, body: VolumeResize, ctx: Ctx, up: Up,
                        idempotency_key: IdempotencyKey = None) -> Response:
    """Grow a data volume (never shrink: 422); online when its VM runs."""
    return answer(await up.call(ctx, "POST", "/volumes/{ref}/resize", path={"ref": ref},
                                body=body, idempotency_key=idempotency_key,
                                timeout=VOLUME_TIMEOUT), Volume)


@router.get("/volumes/{ref}/snapshots", response_model=list[VolumeSnapshot])
async def list_volume_snapshots(ref: RefPath, ctx: Ctx, up: Up) -> Response:
    """The snapshots of a volume, oldest first."""
    return answer(await up.call(ctx, "GET", "/volumes/{ref}/snapshots", path={"ref": ref}),
                  list[VolumeSnapshot])


@router.post("/volumes/{ref}/snapshots", response_model=VolumeSnapshot, status_code=201)
async def create_volume_snapshot(ref: RefPath, body: VolumeSnapshotCreate, ctx: Ctx, up: Up,
                                 idempotency_key: IdempotencyKey = None) -> Response:
    """Take a snapshot of a volume that no running guest has open (detached, or its VM
    stopped: 409 otherwise)."""
    return answer(await up.call(ctx, "POST", "/volumes/{ref}/snapshots", path={"ref": ref},
                                body=body, idempotency_key=idempotency_key,
                                timeout=VOLUME_TIMEOUT), VolumeSnapshot)


@router.post("/volumes/{ref}/snapshots/{name}/revert", response_model=Volume)
async def revert_volume_snapshot(ref: RefPath, name: SnapshotPath, ctx: Ctx, up: Up,
                                 idempotency_key: IdempotencyKey = None) -> Response:
    """Bring a volume back to one of its snapshots: only while detached or its VM is
    stopped (409 otherwise)."""
    return answer(await up.call(ctx, "POST", "/volumes/{ref}/snapshots/{name}/revert",
                                path={"ref": ref, "name": name},
                                idempotency_key=idempotency_key, timeout=VOLUME_TIMEOUT),
                  Volume)


@router.delete("/volumes/{ref}/snapshots/{name}", status_code=204)
async def delete_volume_snapshot(ref: RefPath, name: SnapshotPath, ctx: Ctx, up: Up,
                                 idempotency_key: IdempotencyKey = None) -> Response:
    """Delete a snapshot of a volume (detached, or its VM stopped)."""
    return answer(await up.call(ctx, "DELETE", "/volumes/{ref}/snapshots/{name}",
                                path={"ref": ref, "name": name},
                                idempotency_key=idempotency_key, timeout=VOLUME_TIMEOUT),
                  None)


@events_router.get("/events", response_model=Page[Event])
async def list_events(
        ctx: Ctx, up: Up, listing: Listing,
        kind: Annotated[str | None, Query(max_length=64,
                                          description="e.g. `storage.threshold`")] = None,
        resource: Annotated[str | None, Query(max_length=64,
                                              description="the resource's uuid")] = None,
        since: Annotated[str | None, Query(
            max_length=40, description="events at or after this ISO 8601 time")] = None,
) -> Response:
    """Alarms raised and cleared (a node's storage directory past its threshold, …),
    newest first; administrators of the platform only."""
    params = dict(listing)
    for key, value in (("kind", kind), ("resource", resource)):
        if value is not None:
            params[key] = value
    if since is not None:
        params["since"] = since  # checked by the control server (422 when not a time)
    return answer(await up.call(ctx, "GET", "/events", params=params), Page[Event])
