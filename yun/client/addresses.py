"""Namespaces of public addresses: address pools and elastic IPs (F-ADDR)."""

from __future__ import annotations

from yun.client._base import Collection
from yun.client._core import Call, R, endpoint, idempotency, model, nothing, path
from yun.proto.resources import (
    AddressPool,
    AddressPoolCreate,
    AddressPoolUpdate,
    AddressRangeCreate,
    ElasticIp,
    ElasticIpAllocate,
    ElasticIpBind,
    Page,
)

ADDRESS_POOL = model(AddressPool)
EIP = model(ElasticIp)


class AddressPools(Collection[R, AddressPool]):
    """``client.address_pools``: public addresses (exclusive) and ports (shared) handed to
    VMs and elastic IPs (writes: platform admins; anyone may read them)."""

    _path = "/address-pools"
    _model = AddressPool
    _page = Page[AddressPool]

    @endpoint
    def create(self, spec: AddressPoolCreate, *,
               idempotency_key: str | None = None) -> Call[AddressPool]:
        """Create an address pool with its first ranges."""
        return Call("POST", self._path, ADDRESS_POOL, body=spec,
                    headers=idempotency(idempotency_key))

    @endpoint
    def update(self, ref: str, spec: AddressPoolUpdate, *,
               idempotency_key: str | None = None) -> Call[AddressPool]:
        """Change an address pool's description."""
        return Call("PATCH", self._item(ref), ADDRESS_POOL, body=spec,
                    headers=idempotency(idempotency_key))

    @endpoint
    def delete(self, ref: str, *, idempotency_key: str | None = None) -> Call[None]:
        """Delete an address pool; refused (409) while linked or holding addresses."""
        return Call("DELETE", self._item(ref), nothing, headers=idempotency(idempotency_key))

    @endpoint
    def add_range(self, ref: str, spec: AddressRangeCreate, *,
                  idempotency_key: str | None = None) -> Call[AddressPool]:
        """Grow the pool online with one more range."""
        return Call("POST", self._item(ref, "/ranges"), ADDRESS_POOL, body=spec,
                    headers=idempotency(idempotency_key))

    @endpoint
    def remove_range(self, ref: str, range_ref: str, *,
                     idempotency_key: str | None = None) -> Call[AddressPool]:
        """Remove a range (its uuid or ``FIRST-LAST``); refused (409) while in use."""
        return Call("DELETE", path(self._path + "/{}/ranges/{}", ref, range_ref),
                    ADDRESS_POOL, headers=idempotency(idempotency_key))


class ElasticIps(Collection[R, ElasticIp]):
    """``client.eips``: the project's elastic IPs, bound to its sandbox-mono VMs."""

    _path = "/eips"
    _model = ElasticIp
    _page = Page[ElasticIp]

    @endpoint
    def allocate(self, spec: ElasticIpAllocate, *,
                 idempotency_key: str | None = None) -> Call[ElasticIp]:
        """Allocate an address of an exclusive pool (counted in the project's quota)."""
        return Call("POST", self._path, EIP, body=spec, headers=idempotency(idempotency_key))

    @endpoint
    def bind(self, ref: str, vm: str, *,
             idempotency_key: str | None = None) -> Call[ElasticIp]:
        """Bind it to a VM of the project (moving it from its current VM, if any)."""
        return Call("POST", self._item(ref, "/bind"), EIP, body=ElasticIpBind(vm=vm),
                    headers=idempotency(idempotency_key))

    @endpoint
    def unbind(self, ref: str, *, idempotency_key: str | None = None) -> Call[ElasticIp]:
        """Unbind it from its VM; the project keeps it."""
        return Call("POST", self._item(ref, "/unbind"), EIP,
                    headers=idempotency(idempotency_key))

    @endpoint
    def release(self, ref: str, *, idempotency_key: str | None = None) -> Call[ElasticIp]:
        """Give it back (unbinding it first); returns it as it was."""
        return Call("DELETE", self._item(ref), EIP, headers=idempotency(idempotency_key))
