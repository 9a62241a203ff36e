"""The node client's internal API, called by the control servers."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, FastAPI, Query, Request
from fastapi.responses import JSONResponse

from yun.node.agent import NodeAgent, same_id
from yun.node.hypervisor.base import (
    DomainNotFound,
    DomainNotRunning,
    HypervisorError,
    NotSupported,
)
from yun.node.network.base import NetworkError
from yun.node.storage.base import DiskError, NoSpace, VolumeInUse, VolumeNotFound
from yun.proto.components import ComponentType as CT
from yun.proto.errors import Conflict, NotFound, Problem
from yun.proto.messages import (
    CdromChange,
    ConsoleLog,
    DiskAttach,
    DomainConsole,
    DomainInfo,
    HostInfo,
    NicAttach,
    ProvisionRequest,
    QosSpec,
    StopRequest,
    StorageImageReport,
    VolumeEnsure,
    VolumeExport,
    VolumeInfo,
    VolumeResize,
)
from yun.proto.network import NodeForwards
from yun.proto.server import install_problem_handlers, peer_identity, problem_response
from yun.util.metrics import install_metrics


def create_node_app(agent: NodeAgent) -> FastAPI:
    app = FastAPI(title="Yun node client (internal)", version="1")
    install_problem_handlers(app)
    # Every route drives the hypervisor: control servers only.
    caller = Depends(peer_identity(agent.membership.verifier, {CT.CONTROL}))
    base = "/internal/v1"

    @app.exception_handler(DomainNotFound)
    async def _not_found(request: Request, exc: DomainNotFound) -> JSONResponse:
        return problem_response(NotFound(str(exc)).problem(request.url.path))

    @app.exception_handler(DomainNotRunning)
    async def _not_running(request: Request, exc: DomainNotRunning) -> JSONResponse:
        return problem_response(Conflict(str(exc)).problem(request.url.path))

    @app.exception_handler(NotSupported)
    async def _unsupported(request: Request, exc: NotSupported) -> JSONResponse:
        return problem_response(Problem(title="Not supported", status=501, detail=str(exc),
                                        instance=request.url.path))

    # Storage errors the caller can act on: the most specific class's handler wins.
    for kind, error, status in (
            ("hypervisor", HypervisorError, 500), ("disk", DiskError, 422),
            ("network", NetworkError, 500), ("volume not found", VolumeNotFound, 404),
            ("volume in use", VolumeInUse, 409), ("no space", NoSpace, 507)):
        def _register(kind: str = kind, error: type[Exception] = error,
                      status: int = status) -> None:
            @app.exception_handler(error)
            async def _failed(request: Request, exc: Exception) -> JSONResponse:
                return problem_response(Problem(
                    title=f"{kind.capitalize()}" + (" error" if status in (422, 500) else ""),
                    status=status, detail=f"{kind} on node {agent.membership.name}: {exc}",
                    instance=request.url.path))
        _register()

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok", "node": agent.node_id}

    @app.get(f"{base}/host", response_model=HostInfo, dependencies=[caller])
    async def host() -> HostInfo:
        return await agent.host_info()

    @app.get(f"{base}/domains", response_model=list[DomainInfo], dependencies=[caller])
    async def domains() -> list[DomainInfo]:
        return await agent.driver.list_domains()

    @app.get(f"{base}/domains/{{vm_uuid}}", response_model=DomainInfo, dependencies=[caller])
    async def domain(vm_uuid: str) -> DomainInfo:
        info = await agent.driver.get_domain(vm_uuid)
        if info is None:
            raise NotFound(f"no domain {vm_uuid} on node {agent.membership.name}")
        return info

    @app.put(f"{base}/domains/{{vm_uuid}}", response_model=DomainInfo, dependencies=[caller])
    async def provision(vm_uuid: str, req: ProvisionRequest) -> DomainInfo:
        return await agent.provision(vm_uuid, req)

    @app.delete(f"{base}/domains/{{vm_uuid}}", status_code=204, dependencies=[caller])
    async def remove(vm_uuid: str,
                     delete_volume: Annotated[list[str] | None, Query()] = None) -> None:
        """Domain, ports and VM files gone, and the volumes listed in
        ``delete_volume``; the VM's other volumes are kept."""
        await agent.remove(vm_uuid, delete_volume or [])

    @app.put(f"{base}/domains/{{vm_uuid}}/disks/{{disk_id}}", response_model=DomainInfo,
             dependencies=[caller])
    async def attach_disk(vm_uuid: str, disk_id: str, req: DiskAttach) -> DomainInfo:
        """Plug an existing volume into the VM (live if it runs, and its definition)."""
        same_id("disk id", req.disk.disk_id, disk_id)
        return await agent.attach_disk(vm_uuid, req)

    @app.delete(f"{base}/domains/{{vm_uuid}}/disks/{{disk_id}}", response_model=DomainInfo,
                dependencies=[caller])
    async def detach_disk(vm_uuid: str, disk_id: str) -> DomainInfo:
        """Unplug a disk of the VM; its volume stays."""
        return await agent.detach_disk(vm_uuid, disk_id)

    @app.put(f"{base}/domains/{{vm_uuid}}/cdrom", response_model=DomainInfo,
             dependencies=[caller])
    async def change_cdrom(vm_uuid: str, req: CdromChange) -> DomainInfo:
        """Insert an ISO into the VM's CD drive, or eject it (no image)."""
        return await agent.change_cdrom(vm_uuid, req)

    @app.put(f"{base}/volumes/{{volume_id}}", response_model=VolumeInfo,
             dependencies=[caller])
    async def ensure_volume(volume_id: str, req: VolumeEnsure) -> VolumeInfo:
        """Make the volume (idempotent), fetching its image first."""
        return await agent.ensure_volume(volume_id, req)

    @app.get(f"{base}/volumes/{{volume_id}}", response_model=VolumeInfo,
             dependencies=[caller])
    async def volume_info(volume_id: str) -> VolumeInfo:
        return await agent.volume_info(volume_id)

    @app.delete(f"{base}/volumes/{{volume_id}}", status_code=204, dependencies=[caller])
    async def delete_volume(volume_id: str) -> None:
        """The volume gone; 409 while a domain on this node has it attached."""
        await agent.delete_volume(volume_id)

    @app.post(f"{base}/volumes/{{volume_id}}/resize", response_model=VolumeInfo,
              dependencies=[caller])
    async def resize_volume(volume_id: str, req: VolumeResize) -> VolumeInfo:
        """Grow the volume (online through the hypervisor when a running VM has it)."""
        return await agent.resize_volume(volume_id, req.size_gb)

    @app.post(f"{base}/volumes/{{volume_id}}/export", response_model=StorageImageReport,
              dependencies=[caller])
    async def export_volume(volume_id: str, req: VolumeExport) -> StorageImageReport:
        """Copy the volume (live when a running VM has it) into image ``req.image_id``
        and upload it to the storage server; its report of the stored image."""
        return await agent.export_volume(volume_id, req)

    @app.put(f"{base}/volumes/{{volume_id}}/snapshots/{{name}}", response_model=VolumeInfo,
             dependencies=[caller])
    async def create_snapshot(volume_id: str, name: str) -> VolumeInfo:
        return await agent.snapshot_volume(volume_id, name, "create")

    @app.post(f"{base}/volumes/{{volume_id}}/snapshots/{{name}}/revert",
              response_model=VolumeInfo, dependencies=[caller])
    async def revert_snapshot(volume_id: str, name: str) -> VolumeInfo:
        return await agent.snapshot_volume(volume_id, name, "revert")

    @app.delete(f"{base}/volumes/{{volume_id}}/snapshots/{{name}}", response_model=VolumeInfo,
                dependencies=[caller])
    async def delete_snapshot(volume_id: str, name: str) -> VolumeInfo:
        return await agent.snapshot_volume(volume_id, name, "delete")

    @app.post(f"{base}/domains/{{vm_uuid}}/start", response_model=DomainInfo,
              dependencies=[caller])
    async def start(vm_uuid: str) -> DomainInfo:
        return await agent.start_vm(vm_uuid)

    @app.post(f"{base}/domains/{{vm_uuid}}/stop", response_model=DomainInfo,
              dependencies=[caller])
    async def stop(vm_uuid: str, req: StopRequest | None = None) -> DomainInfo:
        return await agent.stop_vm(vm_uuid, req or StopRequest())

    @app.post(f"{base}/domains/{{vm_uuid}}/reboot", response_model=DomainInfo,
              dependencies=[caller])
    async def reboot(vm_uuid: str) -> DomainInfo:
        return await agent.reboot_vm(vm_uuid)

    @app.put(f"{base}/domains/{{vm_uuid}}/qos", response_model=DomainInfo,
             dependencies=[caller])
    async def set_qos(vm_uuid: str, qos: QosSpec) -> DomainInfo:
        """New QoS limits, live and persistent; 404 when the node has no such domain."""
        return await agent.set_qos(vm_uuid, qos)

    @app.put(f"{base}/domains/{{vm_uuid}}/nics/{{nic_id}}", response_model=DomainInfo,
             dependencies=[caller])
    async def attach_nic(vm_uuid: str, nic_id: str, req: NicAttach) -> DomainInfo:
        """Plug a NIC into the VM (live if it runs, and into its definition)."""
        same_id("NIC id", req.nic.nic_id, nic_id)
        return await agent.attach_nic(vm_uuid, req)

    @app.delete(f"{base}/domains/{{vm_uuid}}/nics/{{nic_id}}", response_model=DomainInfo,
                dependencies=[caller])
    async def detach_nic(vm_uuid: str, nic_id: str) -> DomainInfo:
        """Unplug a NIC of the VM; nothing to do if it is not there."""
        return await agent.detach_nic(vm_uuid, nic_id)

    @app.put(f"{base}/vms/{{vm_uuid}}/forwards", status_code=204, response_model=None,
             dependencies=[caller])
    async def set_forwards(vm_uuid: str, body: NodeForwards) -> None:
        """Replace the node NAT ports reaching the VM (sandbox private mode)."""
        await agent.set_forwards(vm_uuid, body.forwards)

    @app.get(f"{base}/domains/{{vm_uuid}}/console-log", response_model=ConsoleLog,
             dependencies=[caller])
    async def console_log(vm_uuid: str,
                          max_bytes: Annotated[int, Query(ge=1, le=1 << 20)] = 65536
                          ) -> ConsoleLog:
        return ConsoleLog(text=await agent.driver.console_log(vm_uuid, max_bytes))

    @app.get(f"{base}/domains/{{vm_uuid}}/console", response_model=DomainConsole,
             dependencies=[caller])
    async def console(vm_uuid: str) -> DomainConsole:
        info = await agent.driver.console(vm_uuid)
        return DomainConsole(vnc_host=info.vnc_host, vnc_port=info.vnc_port,
                             serial_log=str(info.serial_log) if info.serial_log else None)

    install_metrics(app, "node")
    return app
