"""Namespaces of storage: volumes (C-STO) and events (F-THIN alarms)."""

from __future__ import annotations

from datetime import datetime

from yun.client._base import Collection, Listable
from yun.client._core import Call, R, endpoint, idempotency, list_params, model, nothing, path
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


class Volumes(Collection[R, Volume]):
    """``client.volumes``: root disks of the project's VMs and its data volumes."""

    _path = "/volumes"
    _model = Volume
    _page = Page[Volume]

    @endpoint
    def create(self, spec: VolumeCreate, *, idempotency_key: str | None = None
               ) -> Call[Volume]:
        """Create a data volume (attached at once when ``spec.vm`` is set)."""
        return Call("POST", self._path, model(Volume), body=spec,
                    headers=idempotency(idempotency_key))

    @endpoint
    def delete(self, ref: str, *, idempotency_key: str | None = None) -> Call[None]:
        """Delete a detached data volume (409 while attached)."""
        return Call("DELETE", self._item(ref), nothing, headers=idempotency(idempotency_key))

    @endpoint
    def attach(self, ref: str, vm: str, *, delete_with_vm: bool | None = None,
               idempotency_key: str | None = None) -> Call[Volume]:
        """Attach a data volume to a VM (hot-plug when it runs)."""
        body = VolumeAttach(vm=vm, delete_with_vm=delete_with_vm)
        return Call("POST", self._item(ref, "/attach"), model(Volume), body=body,
                    headers=idempotency(idempotency_key))

    @endpoint
    def detach(self, ref: str, *, idempotency_key: str | None = None) -> Call[Volume]:
        """Detach a data volume from its VM; the volume is kept."""
        return Call("POST", self._item(ref, "/detach"), model(Volume),
                    headers=idempotency(idempotency_key))

    @endpoint
    def resize(self, ref: str, size_gb: int, *,
               idempotency_key: str | None = None) -> Call[Volume]:
        """Grow a data volume to ``size_gb`` (online when its VM runs)."""
        return Call("POST", self._item(ref, "/resize"), model(Volume),
                    body=VolumeResize(size_gb=size_gb), headers=idempotency(idempotency_key))

    @endpoint
    def snapshots(self, ref: str) -> Call[list[VolumeSnapshot]]:
        """The volume's snapshots, oldest first."""
        return Call("GET", self._item(ref, "/snapshots"), model(list[VolumeSnapshot]))

    @endpoint
    def create_snapshot(self, ref: str, name: str, *,
                        idempotency_key: str | None = None) -> Call[VolumeSnapshot]:
        """Take a snapshot of a volume no running guest has open."""
        return Call("POST", self._item(ref, "/snapshots"), model(VolumeSnapshot),
                    body=VolumeSnapshotCreate(name=name), headers=idempotency(idempotency_key))

    @endpoint
    def revert_snapshot(self, ref: str, name: str, *,
                        idempotency_key: str | None = None) -> Call[Volume]:
        """Bring a detached volume (or one of a stopped VM) back to snapshot ``name``."""
        return Call("POST", path("/volumes/{}/snapshots/{}/revert", ref, name), model(Volume),
                    headers=idempotency(idempotency_key))

    @endpoint
    def delete_snapshot(self, ref: str, name: str, *,
                        idempotency_key: str | None = None) -> Call[None]:
        """Delete snapshot ``name`` of the volume."""
        return Call("DELETE", path("/volumes/{}/snapshots/{}", ref, name), nothing,
                    headers=idempotency(idempotency_key))


class Events(Listable[R, Event]):
    """``client.events``: alarms raised and cleared (platform administrators)."""

    _path = "/events"
    _page = Page[Event]

    @endpoint
    def find(self, kind: str | None = None, resource: str | None = None,
             since: datetime | None = None, limit: int = 100,
             cursor: str | None = None) -> Call[Page[Event]]:
        """One page of events of ``kind`` on ``resource`` (a uuid) at or after ``since``."""
        params = dict(list_params(None, None, limit, cursor, None, False))
        if kind:
            params["kind"] = kind
        if resource:
            params["resource"] = resource
        if since is not None:
            params["since"] = since.isoformat()
        return Call("GET", self._path, model(Page[Event]), params=params)
