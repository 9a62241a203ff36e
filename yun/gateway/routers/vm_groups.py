"""VM groups: affinity and anti-affinity of a project's VMs (T-SCHED)."""

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
from yun.proto.resources import Page, VmGroup, VmGroupCreate

router = make_router("vm-groups")


@router.get("/vm-groups", response_model=Page[VmGroup])
async def list_vm_groups(ctx: Ctx, up: Up, listing: Listing) -> Response:
    """The project's VM groups, with their policy and members."""
    return answer(await up.call(ctx, "GET", "/vm-groups", params=listing), Page[VmGroup])


@router.post("/vm-groups", response_model=VmGroup, status_code=201)
async def create_vm_group(body: VmGroupCreate, ctx: Ctx, up: Up,
                          idempotency_key: IdempotencyKey = None) -> Response:
    """Create a VM group: `affinity` places its VMs on one node, `anti-affinity` each
    on a different node. VMs join it when created with `group`."""
    return answer(await up.call(ctx, "POST", "/vm-groups", body=body,
                                idempotency_key=idempotency_key), VmGroup)


@router.get("/vm-groups/{ref}", response_model=VmGroup)
async def show_vm_group(ref: RefPath, ctx: Ctx, up: Up) -> Response:
    """One VM group, by uuid or name."""
    return answer(await up.call(ctx, "GET", "/vm-groups/{ref}", path={"ref": ref}), VmGroup)


@router.delete("/vm-groups/{ref}", status_code=204)
async def delete_vm_group(ref: RefPath, ctx: Ctx, up: Up,
                          idempotency_key: IdempotencyKey = None) -> Response:
    """Delete a VM group; refused (409) while it has members."""
    return answer(await up.call(ctx, "DELETE", "/vm-groups/{ref}", path={"ref": ref},
                                idempotency_key=idempotency_key), None)
