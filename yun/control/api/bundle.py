"""What every router module of the control server's API is built from."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from fastapi import APIRouter, Depends

from yun.control.access.policy import Scope, scope_for
from yun.control.api.deps import Deps, UserDeps, make_deps
from yun.control.api.routing import ControlRoute
from yun.control.context import ControlContext
from yun.control.services.addresses import AddressService
from yun.control.services.images import ImageService
from yun.control.services.nodes import NodeRegistry
from yun.control.services.pools import PoolService
from yun.control.services.projects import ProjectService
from yun.control.services.ssh_keys import SshKeyService
from yun.control.services.users import UserService
from yun.control.services.vm_groups import VmGroupService
from yun.control.services.vms import VmService
from yun.proto.context import RequestContext

BASE = "/internal/v1"


@dataclass
class ApiBundle:
    ctx: ControlContext
    nodes: NodeRegistry
    deps: Deps = field(init=False)
    users: UserDeps = field(init=False)
    vms: VmService = field(init=False)
    images: ImageService = field(init=False)
    projects: ProjectService = field(init=False)
    accounts: UserService = field(init=False)
    pools: PoolService = field(init=False)
    vm_groups: VmGroupService = field(init=False)
    addresses: AddressService = field(init=False)
    ssh_keys: SshKeyService = field(init=False)

    def __post_init__(self) -> None:
        self.deps = make_deps(self.ctx)
        self.users = UserDeps(self.ctx, self.deps)
        self.vms, self.images = VmService(self.ctx), ImageService(self.ctx)
        self.projects, self.accounts = ProjectService(self.ctx), UserService(self.ctx)
        self.pools, self.vm_groups = PoolService(self.ctx), VmGroupService(self.ctx)
        self.addresses = AddressService(self.ctx)
        self.ssh_keys = SshKeyService(self.ctx)

    def router(self, tag: str) -> APIRouter:
        """A router of user routes: each mutation is idempotent and audited."""
        return APIRouter(prefix=BASE, route_class=ControlRoute, tags=[tag])

    @property
    def user(self) -> Any:
        """The dependency giving the request's user context."""
        return Depends(self.users.user)

    @property
    def scope(self) -> Any:
        """The dependency giving the request's scope (the projects it may see)."""
        ctx = self.ctx
        user_dep = self.users.user

        async def scope(user: RequestContext = Depends(user_dep)) -> Scope:
            return await scope_for(ctx.db, user)
        return Depends(scope)
