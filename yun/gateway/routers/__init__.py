"""The public routes, one module per resource."""

from __future__ import annotations

from fastapi import APIRouter

from yun.gateway.routers import (
    addresses,
    audit,
    auth,
    departments,
    images,
    keys,
    nodes,
    pools,
    projects,
    quotas,
    roles,
    routers,
    ssh_keys,
    tags,
    tasks,
    users,
    vm_groups,
    vms,
    volumes,
    zones,
)

# In the order of how often they are asked (task polls, then VMs): FastAPI tries routes
# one after the other (≈ 2 µs each). Paths of different routers never overlap
# (tests/unit/test_route_order.py), so the order changes nothing else.
ROUTERS: tuple[APIRouter, ...] = (
    tasks.router, vms.router,
    auth.router, departments.router, projects.router, quotas.router, users.router,
    roles.router, keys.router, audit.router, nodes.router, images.router, tags.router,
    zones.router, pools.router, vm_groups.router, addresses.router,
    routers.router, volumes.router, volumes.events_router,
    ssh_keys.router,
)
