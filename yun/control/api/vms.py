"""VM routes of the control server's user API."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Path, Query, Request

from yun.control.access.policy import Scope
from yun.control.api.bundle import ApiBundle
from yun.control.api.deps import Listing
from yun.control.api.routing import audit_resource
from yun.control.services.listing import listed
from yun.control.services.vms import vm_models
from yun.proto.context import RequestContext
from yun.proto.resources import (
    Accepted,
    CdromInsert,
    Console,
    Page,
    PortForward,
    PortForwardCreate,
    Vm,
    VmAddress,
    VmCreate,
    VmNic,
    VmNicCreate,
    VmQosUpdate,
    VmStop,
)


def _accepted(request: Request, accepted: Accepted) -> Accepted:
    audit_resource(request, "vm", accepted.resource.get("uuid"),
                   accepted.resource.get("project_uuid"))
    return accepted


def vm_router(api: ApiBundle) -> APIRouter:
    r = api.router("vms")
    user, scope = api.user, api.scope

    @r.post("/vms", response_model=Accepted, status_code=202, name="vm.create")
    async def create_vm(req: VmCreate, request: Request, ctx: RequestContext = user,
                        sc: Scope = scope) -> Accepted:
        return _accepted(request, await api.vms.create(req, ctx, sc))

    @r.get("/vms", response_model=Page[Vm], name="vm.list")
    async def list_vms(params: Listing, sc: Scope = scope) -> Page[Vm]:
        return await listed(api.ctx.db, "vm", sc, params, vm_models)

    @r.get("/vms/{ref}", response_model=Vm, name="vm.show")
    async def show_vm(ref: str, sc: Scope = scope) -> Vm:
        return await api.vms.get(ref, sc)

    @r.delete("/vms/{ref}", response_model=Accepted, status_code=202, name="vm.delete")
    async def delete_vm(ref: str, request: Request, sc: Scope = scope,
                        keep_volumes: bool = False) -> Accepted:
        return _accepted(request, await api.vms.delete(ref, sc, keep_volumes))

    def power(action: str) -> None:
        @r.post(f"/vms/{{ref}}/{action}", response_model=Accepted, status_code=202,
                name=f"vm.{action}")
        async def act(ref: str, request: Request, sc: Scope = scope,
                      body: VmStop | None = None) -> Any:
            accepted = _accepted(request, await api.vms.action(
                ref, action, sc, body if action == "stop" else None))
            if accepted.task is None:
                from fastapi.responses import JSONResponse
                return JSONResponse(accepted.model_dump(mode="json"), status_code=200)
            return accepted

    for action in ("start", "stop", "reboot"):
        power(action)

    @r.post("/vms/{ref}/qos", response_model=Accepted, status_code=202, name="vm.set_qos")
    async def set_qos(ref: str, req: VmQosUpdate, request: Request,
                      sc: Scope = scope) -> Accepted:
        return _accepted(request, await api.vms.set_qos(ref, req, sc))

    def _maybe_nothing(accepted: Accepted) -> Any:
        """200 with no task when nothing had to be done, else the 202 answer."""
        if accepted.task is None:
            from fastapi.responses import JSONResponse
            return JSONResponse(accepted.model_dump(mode="json"), status_code=200)
        return accepted

    @r.put("/vms/{ref}/cdrom", response_model=Accepted, status_code=202,
           name="vm.cdrom.insert")
    async def insert_cdrom(ref: str, req: CdromInsert, request: Request,
                           sc: Scope = scope) -> Any:
        return _maybe_nothing(_accepted(request, await api.vms.insert_cdrom(ref, req, sc)))

    @r.delete("/vms/{ref}/cdrom", response_model=Accepted, status_code=202,
              name="vm.cdrom.eject")
    async def eject_cdrom(ref: str, request: Request, sc: Scope = scope) -> Any:
        return _maybe_nothing(_accepted(request, await api.vms.eject_cdrom(ref, sc)))

    @r.get("/vms/{ref}/console-log", name="vm.console_log")
    async def console_log(ref: str, sc: Scope = scope,
                          max_bytes: Annotated[int, Query(ge=1, le=1 << 20)] = 65536
                          ) -> dict[str, str]:
        return {"text": await api.vms.console_log(ref, max_bytes, sc)}

    @r.get("/vms/{ref}/console", response_model=Console, name="vm.console")
    async def console(ref: str, sc: Scope = scope) -> Console:
        return await api.vms.console(ref, sc)

    @r.get("/vms/{ref}/port-forwards", response_model=list[PortForward],
           name="vm.port_forward.list")
    async def list_forwards(ref: str, sc: Scope = scope) -> list[PortForward]:
        return await api.vms.forwards.list(ref, sc)

    @r.post("/vms/{ref}/port-forwards", response_model=PortForward, status_code=201,
            name="vm.port_forward.add")
    async def add_forward(ref: str, req: PortForwardCreate, sc: Scope = scope) -> PortForward:
        return await api.vms.forwards.add(ref, req, sc)

    @r.delete("/vms/{ref}/port-forwards/{protocol}/{port}", status_code=204,
              response_model=None, name="vm.port_forward.remove")
    async def remove_forward(ref: str, protocol: str,
                             port: Annotated[int, Path(ge=1, le=65535)],
                             sc: Scope = scope) -> None:
        await api.vms.forwards.remove(ref, protocol, port, sc)

    @r.post("/vms/{ref}/addresses", response_model=VmAddress, status_code=201,
            name="vm.address.add")
    async def add_address(ref: str, sc: Scope = scope) -> VmAddress:
        return await api.vms.addresses.add(ref, sc)

    @r.delete("/vms/{ref}/addresses/{ip}", status_code=204, response_model=None,
              name="vm.address.remove")
    async def remove_address(ref: str, ip: str, sc: Scope = scope) -> None:
        await api.vms.addresses.remove(ref, ip, sc)

    @r.get("/vms/{ref}/nics", response_model=list[VmNic], name="vm.nic.list")
    async def list_nics(ref: str, sc: Scope = scope) -> list[VmNic]:
        return await api.vms.nics.list(ref, sc)

    @r.post("/vms/{ref}/nics", response_model=VmNic, status_code=201, name="vm.nic.add")
    async def add_nic(ref: str, request: Request, sc: Scope = scope,
                      req: VmNicCreate | None = None) -> VmNic:
        nic = await api.vms.nics.add(ref, req or VmNicCreate(), sc)
        audit_resource(request, "vm", nic.vm_uuid)
        return nic

    @r.delete("/vms/{ref}/nics/{nic}", status_code=204, response_model=None,
              name="vm.nic.remove")
    async def remove_nic(ref: str, nic: str, request: Request, sc: Scope = scope) -> None:
        audit_resource(request, "vm", await api.vms.nics.remove(ref, nic, sc))

    return r
