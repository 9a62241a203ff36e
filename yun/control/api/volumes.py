"""Volume routes of the control server's user API (C-STO), and the events list."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Query, Request

from yun.control.access.policy import Scope
from yun.control.api.bundle import ApiBundle
from yun.control.api.deps import Listing
from yun.control.api.routing import audit_resource
from yun.control.services.events import list_events
from yun.control.services.listing import listed
from yun.control.services.volumes import VolumeService, volume_models
from yun.proto.context import RequestContext
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


def volume_router(api: ApiBundle) -> APIRouter:
    r = api.router("volumes")
    user, scope = api.user, api.scope
    svc = VolumeService(api.ctx)

    def audited(request: Request, volume: Volume) -> Volume:
        audit_resource(request, "volume", volume.uuid, volume.project_uuid)
        return volume

    @r.post("/volumes", response_model=Volume, status_code=201, name="volume.create")
    async def create_volume(req: VolumeCreate, request: Request, ctx: RequestContext = user,
                            sc: Scope = scope) -> Volume:
        return audited(request, await svc.create(req, ctx, sc))

    @r.get("/volumes", response_model=Page[Volume], name="volume.list")
    async def list_volumes(params: Listing, sc: Scope = scope) -> Page[Volume]:
        return await listed(api.ctx.db, "volume", sc, params, volume_models)

    @r.get("/volumes/{ref}", response_model=Volume, name="volume.show")
    async def show_volume(ref: str, sc: Scope = scope) -> Volume:
        return await svc.get(ref, sc)

    @r.delete("/volumes/{ref}", status_code=204, response_model=None, name="volume.delete")
    async def delete_volume(ref: str, request: Request, sc: Scope = scope) -> None:
        audit_resource(request, "volume", await svc.delete(ref, sc))

    @r.post("/volumes/{ref}/attach", response_model=Volume, name="volume.attach")
    async def attach_volume(ref: str, req: VolumeAttach, request: Request,
                            sc: Scope = scope) -> Volume:
        return audited(request, await svc.attach(ref, req, sc))

    @r.post("/volumes/{ref}/detach", response_model=Volume, name="volume.detach")
    async def detach_volume(ref: str, request: Request, sc: Scope = scope) -> Volume:
        return audited(request, await svc.detach(ref, sc))

    @r.post("/volumes/{ref}/resize", response_model=Volume, name="volume.resize")
    async def resize_volume(ref: str, req: VolumeResize, request: Request,
                            sc: Scope = scope) -> Volume:
        return audited(request, await svc.resize(ref, req, sc))

    @r.get("/volumes/{ref}/snapshots", response_model=list[VolumeSnapshot],
           name="volume.snapshot.list")
    async def list_snapshots(ref: str, sc: Scope = scope) -> list[VolumeSnapshot]:
        return await svc.snapshots(ref, sc)

    @r.post("/volumes/{ref}/snapshots", response_model=VolumeSnapshot, status_code=201,
            name="volume.snapshot.create")
    async def create_snapshot(ref: str, req: VolumeSnapshotCreate, request: Request,
                              sc: Scope = scope) -> VolumeSnapshot:
        snap = await svc.snapshot(ref, req, sc)
        audit_resource(request, "volume", snap.volume_uuid)
        return snap

    @r.post("/volumes/{ref}/snapshots/{name}/revert", response_model=Volume,
            name="volume.snapshot.revert")
    async def revert_snapshot(ref: str, name: str, request: Request,
                              sc: Scope = scope) -> Volume:
        return audited(request, await svc.revert(ref, name, sc))

    @r.delete("/volumes/{ref}/snapshots/{name}", status_code=204, response_model=None,
              name="volume.snapshot.delete")
    async def delete_snapshot(ref: str, name: str, request: Request, sc: Scope = scope) -> None:
        audit_resource(request, "volume", await svc.delete_snapshot(ref, name, sc))

    @r.get("/events", response_model=Page[Event], name="event.list")
    async def events(params: Listing, sc: Scope = scope,
                     kind: Annotated[str | None, Query(max_length=64)] = None,
                     resource: Annotated[str | None, Query(max_length=64)] = None,
                     since: datetime | None = None) -> Page[Event]:
        return await list_events(api.ctx.db, sc, params, kind, resource, since)

    return r
