"""Namespaces of placement: zones, compute pools and their nodes, VM groups."""

from __future__ import annotations

from yun.client._base import Collection
from yun.client._core import Call, R, endpoint, idempotency, model, nothing, path
from yun.proto.resources import (
    Node,
    Page,
    Pool,
    PoolCreate,
    PoolNodeAdd,
    PoolUpdate,
    VmGroup,
    VmGroupCreate,
    Zone,
    ZoneCreate,
    ZoneUpdate,
)

NODE = model(Node)


class Zones(Collection[R, Zone]):
    """``client.zones``: zones, each holding compute pools (writes: platform admins)."""

    _path = "/zones"
    _model = Zone
    _page = Page[Zone]

    @endpoint
    def create(self, spec: ZoneCreate, *, idempotency_key: str | None = None) -> Call[Zone]:
        """Create a zone."""
        return Call("POST", self._path, model(Zone), body=spec,
                    headers=idempotency(idempotency_key))

    @endpoint
    def update(self, ref: str, spec: ZoneUpdate, *,
               idempotency_key: str | None = None) -> Call[Zone]:
        """Change a zone's description."""
        return Call("PATCH", self._item(ref), model(Zone), body=spec,
                    headers=idempotency(idempotency_key))

    @endpoint
    def delete(self, ref: str, *, idempotency_key: str | None = None) -> Call[None]:
        """Delete a zone; refused (409) while it holds pools."""
        return Call("DELETE", self._item(ref), nothing, headers=idempotency(idempotency_key))


class Pools(Collection[R, Pool]):
    """``client.pools``: compute pools, their templates and nodes (writes: platform
    admins; anyone may read them)."""

    _path = "/pools"
    _model = Pool
    _page = Page[Pool]

    @endpoint
    def create(self, spec: PoolCreate, *, idempotency_key: str | None = None) -> Call[Pool]:
        """Create a pool; template fields left out take the platform's defaults."""
        return Call("POST", self._path, model(Pool), body=spec,
                    headers=idempotency(idempotency_key))

    @endpoint
    def update(self, ref: str, spec: PoolUpdate, *,
               idempotency_key: str | None = None) -> Call[Pool]:
        """Change some template fields of a pool (None fields are kept)."""
        return Call("PATCH", self._item(ref), model(Pool), body=spec,
                    headers=idempotency(idempotency_key))

    @endpoint
    def delete(self, ref: str, *, idempotency_key: str | None = None) -> Call[None]:
        """Delete a pool; refused (409) while it holds nodes."""
        return Call("DELETE", self._item(ref), nothing, headers=idempotency(idempotency_key))

    def _node(self, ref: str, node: str, suffix: str = "") -> str:
        return path(self._path + "/{}/nodes/{}" + suffix, ref, node)

    @endpoint
    def add_node(self, ref: str, node: str, *,
                 idempotency_key: str | None = None) -> Call[Node]:
        """Add an unassigned node to the pool; returns the node as it is now."""
        return Call("POST", self._item(ref, "/nodes"), NODE, body=PoolNodeAdd(node=node),
                    headers=idempotency(idempotency_key))

    @endpoint
    def drain_node(self, ref: str, node: str, *,
                   idempotency_key: str | None = None) -> Call[Node]:
        """Drain a node: it gets no new VM and keeps the VMs it runs."""
        return Call("POST", self._node(ref, node, "/drain"), NODE,
                    headers=idempotency(idempotency_key))

    @endpoint
    def enable_node(self, ref: str, node: str, *,
                    idempotency_key: str | None = None) -> Call[Node]:
        """Undrain a node: it gets new VMs again."""
        return Call("POST", self._node(ref, node, "/enable"), NODE,
                    headers=idempotency(idempotency_key))

    @endpoint
    def remove_node(self, ref: str, node: str, *,
                    idempotency_key: str | None = None) -> Call[Node]:
        """Take a node out of the pool (it becomes unassigned); refused (409) while a VM
        is on it."""
        return Call("DELETE", self._node(ref, node), NODE,
                    headers=idempotency(idempotency_key))


class VmGroups(Collection[R, VmGroup]):
    """``client.vm_groups``: the project's affinity and anti-affinity groups."""

    _path = "/vm-groups"
    _model = VmGroup
    _page = Page[VmGroup]

    @endpoint
    def create(self, spec: VmGroupCreate, *,
               idempotency_key: str | None = None) -> Call[VmGroup]:
        """Create a VM group; VMs join it when created with ``group``."""
        return Call("POST", self._path, model(VmGroup), body=spec,
                    headers=idempotency(idempotency_key))

    @endpoint
    def delete(self, ref: str, *, idempotency_key: str | None = None) -> Call[None]:
        """Delete a VM group; refused (409) while it has members."""
        return Call("DELETE", self._item(ref), nothing, headers=idempotency(idempotency_key))
