"""Virtual machines: create, list, show, delete, power actions, QoS, consoles."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Path, Query, Response
from fastapi.responses import PlainTextResponse

from yun.gateway.routers.common import (
    Ctx,
    IdempotencyKey,
    Listing,
    RefPath,
    Up,
    Wait,
    accepted,
    answer,
    make_router,
)
from yun.proto.errors import PeerError
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

router = make_router("vms")
ALREADY: dict[int | str, dict[str, Any]] = {200: {"model": Accepted,
                 "description": "nothing had to be done (`task` is null, `message` says why)"}}


@router.get("/vms", response_model=Page[Vm])
async def list_vms(ctx: Ctx, up: Up, listing: Listing) -> Response:
    """The project's virtual machines."""
    return answer(await up.call(ctx, "GET", "/vms", params=listing), Page[Vm])


@router.post("/vms", response_model=Accepted, status_code=202)
async def create_vm(body: VmCreate, ctx: Ctx, up: Up, wait: Wait = 0,
                    idempotency_key: IdempotencyKey = None) -> Response:
    """Create a virtual machine from an image: placed on a node of its pool (or of a pool
    of its zone) that passes the pool's filters, given an address, booted. Everything but
    the size, image and bandwidth comes from the pool's template. A placement that no
    node can take is refused with the reason per filter. Answers the task at once, or
    when it ends if `wait` is given."""
    reply = await up.call(ctx, "POST", "/vms", body=body, idempotency_key=idempotency_key)
    return await accepted(up, ctx, reply, wait)


@router.get("/vms/{ref}", response_model=Vm)
async def show_vm(ref: RefPath, ctx: Ctx, up: Up) -> Response:
    """One virtual machine, by uuid or name."""
    return answer(await up.call(ctx, "GET", "/vms/{ref}", path={"ref": ref}), Vm)


@router.delete("/vms/{ref}", response_model=Accepted, status_code=202)
async def delete_vm(ref: RefPath, ctx: Ctx, up: Up, wait: Wait = 0,
                    keep_volumes: Annotated[bool, Query(
                        description="keep every data volume (detached)")] = False,
                    idempotency_key: IdempotencyKey = None) -> Response:
    """Delete a virtual machine, its root volume and the data volumes marked
    `delete_with_vm` (unless `keep_volumes`: then they are detached and kept); its
    resources are released."""
    reply = await up.call(ctx, "DELETE", "/vms/{ref}", path={"ref": ref},
                          params={"keep_volumes": True} if keep_volumes else None,
                          idempotency_key=idempotency_key)
    return await accepted(up, ctx, reply, wait)


@router.post("/vms/{ref}/start", response_model=Accepted, status_code=202, responses=ALREADY)
async def start_vm(ref: RefPath, ctx: Ctx, up: Up, wait: Wait = 0,
                   idempotency_key: IdempotencyKey = None) -> Response:
    """Start a stopped virtual machine (200 with no task if it already runs)."""
    reply = await up.call(ctx, "POST", "/vms/{ref}/start", path={"ref": ref},
                          idempotency_key=idempotency_key)
    return await accepted(up, ctx, reply, wait)


@router.post("/vms/{ref}/stop", response_model=Accepted, status_code=202, responses=ALREADY)
async def stop_vm(ref: RefPath, ctx: Ctx, up: Up, body: VmStop | None = None,
                  wait: Wait = 0, idempotency_key: IdempotencyKey = None) -> Response:
    """Stop a virtual machine: an ACPI shutdown, forced after `timeout` seconds, or at
    once with `force` (200 with no task if it is already stopped)."""
    reply = await up.call(ctx, "POST", "/vms/{ref}/stop", path={"ref": ref},
                          body=body or VmStop(), idempotency_key=idempotency_key)
    return await accepted(up, ctx, reply, wait)


@router.post("/vms/{ref}/reboot", response_model=Accepted, status_code=202,
             responses=ALREADY)
async def reboot_vm(ref: RefPath, ctx: Ctx, up: Up, wait: Wait = 0,
                    idempotency_key: IdempotencyKey = None) -> Response:
    """Reboot a running virtual machine."""
    reply = await up.call(ctx, "POST", "/vms/{ref}/reboot", path={"ref": ref},
                          idempotency_key=idempotency_key)
    return await accepted(up, ctx, reply, wait)


@router.post("/vms/{ref}/qos", response_model=Accepted, status_code=202, responses=ALREADY)
async def set_vm_qos(ref: RefPath, body: VmQosUpdate, ctx: Ctx, up: Up, wait: Wait = 0,
                     idempotency_key: IdempotencyKey = None) -> Response:
    """Change a virtual machine's QoS: CPU level, disk IOPS and bytes/s, NIC bandwidth.
    Fields left out keep their value; `clear` lifts limits. A running VM gets the new
    limits at once (200 with no task if nothing changes)."""
    reply = await up.call(ctx, "POST", "/vms/{ref}/qos", path={"ref": ref}, body=body,
                          idempotency_key=idempotency_key)
    return await accepted(up, ctx, reply, wait)


@router.put("/vms/{ref}/cdrom", response_model=Accepted, status_code=202, responses=ALREADY)
async def insert_vm_cdrom(ref: RefPath, body: CdromInsert, ctx: Ctx, up: Up, wait: Wait = 0,
                          idempotency_key: IdempotencyKey = None) -> Response:
    """Put an ISO image into the VM's CD drive, replacing any there: a running guest sees
    the new medium at once (200 with no task if it is already in). A disk image is
    refused (422)."""
    reply = await up.call(ctx, "PUT", "/vms/{ref}/cdrom", path={"ref": ref}, body=body,
                          idempotency_key=idempotency_key)
    return await accepted(up, ctx, reply, wait)


@router.delete("/vms/{ref}/cdrom", response_model=Accepted, status_code=202,
               responses=ALREADY)
async def eject_vm_cdrom(ref: RefPath, ctx: Ctx, up: Up, wait: Wait = 0,
                         idempotency_key: IdempotencyKey = None) -> Response:
    """Eject the ISO from the VM's CD drive (200 with no task if it is empty). A VM that
    booted from the CD (a blank VM being installed) boots from its disk from then on."""
    reply = await up.call(ctx, "DELETE", "/vms/{ref}/cdrom", path={"ref": ref},
                          idempotency_key=idempotency_key)
    return await accepted(up, ctx, reply, wait)


@router.get("/vms/{ref}/console-log", response_class=PlainTextResponse, responses={
    200: {"content": {"text/plain": {"schema": {"type": "string"}}},
          "description": "the end of the serial console's output"}})
async def console_log(
    ref: RefPath, ctx: Ctx, up: Up,
    max_bytes: Annotated[int, Query(ge=1, le=1 << 20,
                                    description="at most this many bytes, from the end")
                         ] = 65536,
) -> PlainTextResponse:
    """The last bytes the virtual machine wrote to its serial console, as text."""
    reply = await up.call(ctx, "GET", "/vms/{ref}/console-log", path={"ref": ref},
                          params={"max_bytes": max_bytes})
    return PlainTextResponse(_text(reply.data))


@router.get("/vms/{ref}/console", response_model=Console)
async def console(ref: RefPath, ctx: Ctx, up: Up) -> Response:
    """Where the virtual machine's VNC display and serial log are."""
    return answer(await up.call(ctx, "GET", "/vms/{ref}/console", path={"ref": ref}),
                  Console)


def _text(data: Any) -> str:
    # The control server may answer the log as text or as {"text": ...}.
    if isinstance(data, str):
        return data
    if isinstance(data, dict) and isinstance(data.get("text"), str):
        return data["text"]
    if data is None:
        return ""
    raise PeerError("the control server answered a malformed console log")


@router.get("/vms/{ref}/port-forwards", response_model=list[PortForward])
async def list_port_forwards(ref: RefPath, ctx: Ctx, up: Up) -> Response:
    """How the VM's ports are reached from outside: node NAT ports (sandbox-private) and
    public ip:port mappings (sandbox-share)."""
    return answer(await up.call(ctx, "GET", "/vms/{ref}/port-forwards", path={"ref": ref}),
                  list[PortForward])


@router.post("/vms/{ref}/port-forwards", response_model=PortForward, status_code=201)
async def add_port_forward(ref: RefPath, body: PortForwardCreate, ctx: Ctx, up: Up,
                           idempotency_key: IdempotencyKey = None) -> Response:
    """Reach a port of the VM from outside. A sandbox-private VM gets a NAT port of its
    node (answered with the node's address and port), a sandbox-share VM a public
    ip:port of its pool's shared address pool. Refused (409) for sandbox-mono and direct
    VMs (they need none) and for a port already forwarded."""
    return answer(await up.call(ctx, "POST", "/vms/{ref}/port-forwards", path={"ref": ref},
                                body=body, idempotency_key=idempotency_key), PortForward)


@router.delete("/vms/{ref}/port-forwards/{protocol}/{port}", status_code=204)
async def remove_port_forward(
        ref: RefPath, protocol: Annotated[str, Path(pattern="^(tcp|udp)$", max_length=3)],
        port: Annotated[int, Path(ge=1, le=65535)], ctx: Ctx, up: Up,
        idempotency_key: IdempotencyKey = None) -> Response:
    """Stop forwarding the VM's port (``tcp`` or ``udp``)."""
    return answer(await up.call(ctx, "DELETE", "/vms/{ref}/port-forwards/{protocol}/{port}",
                                path={"ref": ref, "protocol": protocol, "port": str(port)},
                                idempotency_key=idempotency_key), None)


@router.post("/vms/{ref}/addresses", response_model=VmAddress, status_code=201)
async def add_vm_address(ref: RefPath, ctx: Ctx, up: Up,
                         idempotency_key: IdempotencyKey = None) -> Response:
    """Give a running sandbox VM one more address of its node's subnet, routed to its NIC
    at once (the guest configures it itself). Refused (409) for a direct-mode VM."""
    return answer(await up.call(ctx, "POST", "/vms/{ref}/addresses", path={"ref": ref},
                                idempotency_key=idempotency_key), VmAddress)


@router.delete("/vms/{ref}/addresses/{ip}", status_code=204)
async def remove_vm_address(
        ref: RefPath, ip: Annotated[str, Path(pattern=r"^[0-9.]{7,15}$", max_length=15)],
        ctx: Ctx, up: Up, idempotency_key: IdempotencyKey = None) -> Response:
    """Take an extra address off the VM (its primary address stays)."""
    return answer(await up.call(ctx, "DELETE", "/vms/{ref}/addresses/{ip}",
                                path={"ref": ref, "ip": ip},
                                idempotency_key=idempotency_key), None)


# Plugging waits for the node, and unplugging for the guest to let the NIC go (slow
# under TCG): longer than an ordinary forwarded request.
NIC_TIMEOUT = 180.0


@router.get("/vms/{ref}/nics", response_model=list[VmNic])
async def list_vm_nics(ref: RefPath, ctx: Ctx, up: Up) -> Response:
    """The VM's NICs: the primary one (index 0) and those plugged in later, with their
    MACs and (sandbox) addresses."""
    return answer(await up.call(ctx, "GET", "/vms/{ref}/nics", path={"ref": ref}),
                  list[VmNic])


@router.post("/vms/{ref}/nics", response_model=VmNic, status_code=201)
async def add_vm_nic(ref: RefPath, ctx: Ctx, up: Up, body: VmNicCreate | None = None,
                     idempotency_key: IdempotencyKey = None) -> Response:
    """Plug one more NIC into a running VM (the guest sees it at once) or a stopped one
    (it has it at its next start). The platform picks its MAC and, in sandbox mode, an
    address of the node's subnet (always private, whatever the pool's exposure). At
    most 8 NICs per VM (409 beyond)."""
    return answer(await up.call(ctx, "POST", "/vms/{ref}/nics", path={"ref": ref},
                                body=body or VmNicCreate(), idempotency_key=idempotency_key,
                                timeout=NIC_TIMEOUT), VmNic)


@router.delete("/vms/{ref}/nics/{nic}", status_code=204)
async def remove_vm_nic(
        ref: RefPath,
        nic: Annotated[str, Path(min_length=1, max_length=36, pattern=r"^[0-9A-Za-z-]+$",
                                 description="the NIC's index, uuid or MAC (written with "
                                             "'-' for ':' in a path: 52-54-00-12-34-56)")],
        ctx: Ctx, up: Up, idempotency_key: IdempotencyKey = None) -> Response:
    """Unplug a NIC of the VM and give its MAC and address back. The primary NIC
    (index 0) cannot be removed (409)."""
    return answer(await up.call(ctx, "DELETE", "/vms/{ref}/nics/{nic}",
                                path={"ref": ref, "nic": nic},
                                idempotency_key=idempotency_key, timeout=NIC_TIMEOUT), None)
