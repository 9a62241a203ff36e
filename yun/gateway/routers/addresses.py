"""Address pools and elastic IPs (F-ADDR): public addresses and ports for the VMs of
sandbox-mono and sandbox-share pools, and addresses a project keeps and moves between
its VMs."""

from __future__ import annotations

from fastapi import Response

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
    AddressPool,
    AddressPoolCreate,
    AddressPoolUpdate,
    AddressRangeCreate,
    ElasticIp,
    ElasticIpAllocate,
    ElasticIpBind,
    Page,
)

router = make_router("addresses")


@router.get("/address-pools", response_model=Page[AddressPool])
async def list_address_pools(ctx: Ctx, up: Up, listing: Listing) -> Response:
    """The address pools: kind, network, ranges and usage (total, used, free)."""
    return answer(await up.call(ctx, "GET", "/address-pools", params=listing),
                  Page[AddressPool])


@router.post("/address-pools", response_model=AddressPool, status_code=201)
async def create_address_pool(body: AddressPoolCreate, ctx: Ctx, up: Up,
                              idempotency_key: IdempotencyKey = None) -> Response:
    """Create an address pool: `exclusive` hands out whole addresses, `shared` ports of
    its addresses (each range then gives its port range). Ranges must lie inside the
    pool's network (default: the smallest network holding the first range), hold neither
    its network nor its broadcast address, and overlap no range of any pool (400/409
    naming what is wrong; platform administrator)."""
    return answer(await up.call(ctx, "POST", "/address-pools", body=body,
                                idempotency_key=idempotency_key), AddressPool)


@router.get("/address-pools/{ref}", response_model=AddressPool)
async def show_address_pool(ref: RefPath, ctx: Ctx, up: Up) -> Response:
    """One address pool, by uuid or name, with its ranges and usage."""
    return answer(await up.call(ctx, "GET", "/address-pools/{ref}", path={"ref": ref}),
                  AddressPool)


@router.patch("/address-pools/{ref}", response_model=AddressPool)
async def update_address_pool(ref: RefPath, body: AddressPoolUpdate, ctx: Ctx, up: Up,
                              idempotency_key: IdempotencyKey = None) -> Response:
    """Change an address pool's description (platform administrator)."""
    return answer(await up.call(ctx, "PATCH", "/address-pools/{ref}", path={"ref": ref},
                                body=body, idempotency_key=idempotency_key), AddressPool)


@router.delete("/address-pools/{ref}", status_code=204)
async def delete_address_pool(ref: RefPath, ctx: Ctx, up: Up,
                              idempotency_key: IdempotencyKey = None) -> Response:
    """Delete an address pool; refused (409) while a compute pool links to it or any of
    its addresses is handed out (platform administrator)."""
    return answer(await up.call(ctx, "DELETE", "/address-pools/{ref}", path={"ref": ref},
                                idempotency_key=idempotency_key), None)


@router.post("/address-pools/{ref}/ranges", response_model=AddressPool)
async def add_address_range(ref: RefPath, body: AddressRangeCreate, ctx: Ctx, up: Up,
                            idempotency_key: IdempotencyKey = None) -> Response:
    """Grow a pool online with one more range; its addresses are handed out at once
    (platform administrator)."""
    return answer(await up.call(ctx, "POST", "/address-pools/{ref}/ranges",
                                path={"ref": ref}, body=body,
                                idempotency_key=idempotency_key), AddressPool)


@router.delete("/address-pools/{ref}/ranges/{range_ref}", response_model=AddressPool)
async def remove_address_range(ref: RefPath, range_ref: RefPath, ctx: Ctx, up: Up,
                               idempotency_key: IdempotencyKey = None) -> Response:
    """Remove a range (its uuid, or `FIRST-LAST`); refused (409, naming who holds them)
    while any of its addresses or ports is handed out (platform administrator)."""
    return answer(await up.call(ctx, "DELETE", "/address-pools/{ref}/ranges/{range_ref}",
                                path={"ref": ref, "range_ref": range_ref},
                                idempotency_key=idempotency_key), AddressPool)


@router.get("/eips", response_model=Page[ElasticIp])
async def list_eips(ctx: Ctx, up: Up, listing: Listing) -> Response:
    """The project's elastic IPs and the VMs they are bound to."""
    return answer(await up.call(ctx, "GET", "/eips", params=listing), Page[ElasticIp])


@router.post("/eips", response_model=ElasticIp, status_code=201)
async def allocate_eip(body: ElasticIpAllocate, ctx: Ctx, up: Up,
                       idempotency_key: IdempotencyKey = None) -> Response:
    """Allocate an elastic IP: the lowest free address of an exclusive pool, counted in
    the project's `public_ips` quota; 409 when the pool has none left."""
    return answer(await up.call(ctx, "POST", "/eips", body=body,
                                idempotency_key=idempotency_key), ElasticIp)


@router.get("/eips/{ref}", response_model=ElasticIp)
async def show_eip(ref: RefPath, ctx: Ctx, up: Up) -> Response:
    """One elastic IP, by uuid, name or address."""
    return answer(await up.call(ctx, "GET", "/eips/{ref}", path={"ref": ref}), ElasticIp)


@router.post("/eips/{ref}/bind", response_model=ElasticIp)
async def bind_eip(ref: RefPath, body: ElasticIpBind, ctx: Ctx, up: Up,
                   idempotency_key: IdempotencyKey = None) -> Response:
    """Bind an elastic IP to a VM of a sandbox-mono pool of the same project (moving it
    from the VM it was bound to): the routers forward it to the VM, the guest is not
    touched."""
    return answer(await up.call(ctx, "POST", "/eips/{ref}/bind", path={"ref": ref},
                                body=body, idempotency_key=idempotency_key), ElasticIp)


@router.post("/eips/{ref}/unbind", response_model=ElasticIp)
async def unbind_eip(ref: RefPath, ctx: Ctx, up: Up,
                     idempotency_key: IdempotencyKey = None) -> Response:
    """Unbind an elastic IP from its VM; the project keeps it."""
    return answer(await up.call(ctx, "POST", "/eips/{ref}/unbind", path={"ref": ref},
                                idempotency_key=idempotency_key), ElasticIp)


@router.delete("/eips/{ref}", response_model=ElasticIp)
async def release_eip(ref: RefPath, ctx: Ctx, up: Up,
                      idempotency_key: IdempotencyKey = None) -> Response:
    """Release an elastic IP back to its pool and the project's quota; a bound one is
    unbound first. Answers the EIP as it was (`vm_uuid`: the VM it was unbound from)."""
    return answer(await up.call(ctx, "DELETE", "/eips/{ref}", path={"ref": ref},
                                idempotency_key=idempotency_key), ElasticIp)
