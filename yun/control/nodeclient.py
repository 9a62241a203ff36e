"""The control server's client of node agents: one typed method per node operation.

The flows and services call :class:`NodeClient` methods with models and get models
back, instead of building paths and reading JSON: a route or message that changes on
the node shows up here (and in mypy), in one place. Answers are validated; a node that
answers something malformed raises :class:`~yun.proto.errors.PeerError`, and a node's
own errors come back as the :class:`~yun.proto.errors.YunError` it raised.
"""

from __future__ import annotations

from typing import Literal, Protocol, get_args

from yun.control.db.models import NodeRow
from yun.proto.client import PeerClient
from yun.proto.errors import Unavailable
from yun.proto.membership import Membership
from yun.proto.messages import (
    CdromChange,
    ConsoleLog,
    DiskAttach,
    DomainConsole,
    DomainInfo,
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
from yun.proto.network import NodeForward, NodeForwards

PowerAction = Literal["start", "stop", "reboot"]
POWER_ACTIONS: tuple[str, ...] = get_args(PowerAction)
BASE = "/internal/v1/domains"
NODE_BASE = "/internal/v1"
VOLUMES = "/internal/v1/volumes"


class HasMembership(Protocol):
    membership: Membership


class NodeClient:
    """The internal API of one node agent (yun/node/api.py), typed."""

    def __init__(self, peer: PeerClient) -> None:
        self.peer = peer

    async def provision(self, req: ProvisionRequest, request_id: str | None = None,
                        timeout: float | None = None) -> DomainInfo:
        """Create (idempotently) the VM's disks, NICs and domain, and start it if asked."""
        return await self.peer.call("PUT", f"{BASE}/{req.spec.uuid}", DomainInfo, body=req,
                                    request_id=request_id, timeout=timeout)

    async def remove(self, vm_uuid: str, request_id: str | None = None,
                     timeout: float | None = None,
                     delete_volumes: list[str] | None = None) -> None:
        """Remove the VM's domain, ports and files, and the volumes named in
        ``delete_volumes`` (its other volumes stay); nothing to do if already gone."""
        params = {"delete_volume": list(delete_volumes)} if delete_volumes else None
        await self.peer.request("DELETE", f"{BASE}/{vm_uuid}", params=params,
                                request_id=request_id, timeout=timeout)

    async def get_domain(self, vm_uuid: str, timeout: float | None = None) -> DomainInfo:
        """The domain as the hypervisor sees it; NotFound if the node has none."""
        return await self.peer.call("GET", f"{BASE}/{vm_uuid}", DomainInfo, timeout=timeout)

    async def power(self, vm_uuid: str, action: PowerAction, body: StopRequest | None = None,
                    request_id: str | None = None, timeout: float | None = None
                    ) -> DomainInfo:
        """Start, stop (``body``: how) or reboot the domain; its state afterwards."""
        if action not in POWER_ACTIONS:
            raise ValueError(f"unknown power action {action!r}: choose one of "
                             f"{', '.join(POWER_ACTIONS)}")
        if body is not None and action != "stop":
            raise ValueError(f"a stop request goes with 'stop', not {action!r}")
        return await self.peer.call("POST", f"{BASE}/{vm_uuid}/{action}", DomainInfo,
                                    body=body, request_id=request_id, timeout=timeout)

    async def set_qos(self, vm_uuid: str, qos: QosSpec, request_id: str | None = None,
                      timeout: float | None = None) -> DomainInfo:
        """Apply QoS limits to the domain (running or not); the limits now in force."""
        return await self.peer.call("PUT", f"{BASE}/{vm_uuid}/qos", DomainInfo, body=qos,
                                    request_id=request_id, timeout=timeout)

    async def attach_nic(self, vm_uuid: str, req: NicAttach, request_id: str | None = None,
                         timeout: float | None = None) -> DomainInfo:
        """Plug one NIC into the VM (live if it runs, and into its definition)."""
        return await self.peer.call("PUT", f"{BASE}/{vm_uuid}/nics/{req.nic.nic_id}",
                                    DomainInfo, body=req, request_id=request_id,
                                    timeout=timeout)

    async def detach_nic(self, vm_uuid: str, nic_id: str, request_id: str | None = None,
                         timeout: float | None = None) -> DomainInfo:
        """Unplug one NIC of the VM (nothing to do if it is not there)."""
        return await self.peer.call("DELETE", f"{BASE}/{vm_uuid}/nics/{nic_id}", DomainInfo,
                                    request_id=request_id, timeout=timeout)

    async def attach_disk(self, vm_uuid: str, req: DiskAttach, request_id: str | None = None,
                          timeout: float | None = None) -> DomainInfo:
        """Plug a volume (already on the node) into the VM: live if it runs, and into
        its definition (U-HOTPLUG)."""
        return await self.peer.call("PUT", f"{BASE}/{vm_uuid}/disks/{req.disk.disk_id}",
                                    DomainInfo, body=req, request_id=request_id,
                                    timeout=timeout)

    async def detach_disk(self, vm_uuid: str, disk_id: str, request_id: str | None = None,
                          timeout: float | None = None) -> DomainInfo:
        """Unplug one disk of the VM; its volume stays on the node."""
        return await self.peer.call("DELETE", f"{BASE}/{vm_uuid}/disks/{disk_id}",
                                    DomainInfo, request_id=request_id, timeout=timeout)

    async def ensure_volume(self, req: VolumeEnsure, request_id: str | None = None,
                            timeout: float | None = None) -> VolumeInfo:
        """Make the volume ``req.disk.volume_id`` if missing (idempotent); 507 when the
        node has no room for it."""
        return await self.peer.call("PUT", f"{VOLUMES}/{req.disk.volume_id}", VolumeInfo,
                                    body=req, request_id=request_id, timeout=timeout)

    async def get_volume(self, volume_id: str, timeout: float | None = None) -> VolumeInfo:
        """The volume as the node holds it; NotFound if it has none."""
        return await self.peer.call("GET", f"{VOLUMES}/{volume_id}", VolumeInfo,
                                    timeout=timeout)

    async def delete_volume(self, volume_id: str, request_id: str | None = None,
                            timeout: float | None = None) -> None:
        """Delete the volume's file (409 while a domain of the node has it attached)."""
        await self.peer.request("DELETE", f"{VOLUMES}/{volume_id}", request_id=request_id,
                                timeout=timeout)

    async def resize_volume(self, volume_id: str, size_gb: int, request_id: str | None = None,
                            timeout: float | None = None) -> VolumeInfo:
        """Grow the volume (through the hypervisor when a running domain has it)."""
        return await self.peer.call("POST", f"{VOLUMES}/{volume_id}/resize", VolumeInfo,
                                    body=VolumeResize(size_gb=size_gb),
                                    request_id=request_id, timeout=timeout)

    async def snapshot_volume(self, volume_id: str, name: str,
                              action: Literal["create", "revert", "delete"],
                              request_id: str | None = None,
                              timeout: float | None = None) -> VolumeInfo:
        """Create, revert to or delete the internal snapshot ``name`` of a closed volume."""
        path = f"{VOLUMES}/{volume_id}/snapshots/{name}"
        method = {"create": "PUT", "revert": "POST", "delete": "DELETE"}[action]
        if action == "revert":
            path += "/revert"
        return await self.peer.call(method, path, VolumeInfo, request_id=request_id,
                                    timeout=timeout)

    async def export_volume(self, volume_id: str, req: VolumeExport,
                            request_id: str | None = None,
                            timeout: float | None = None) -> StorageImageReport:
        """Have the node copy the volume (live when its VM runs) into image
        ``req.image_id`` and upload it to ``req.storage_url``; the stored image."""
        return await self.peer.call("POST", f"{VOLUMES}/{volume_id}/export",
                                    StorageImageReport, body=req, request_id=request_id,
                                    timeout=timeout)

    async def change_cdrom(self, vm_uuid: str, req: CdromChange,
                           request_id: str | None = None,
                           timeout: float | None = None) -> DomainInfo:
        """Insert an ISO into the VM's CD drive (cached on the node first) or eject it
        (``req.image`` None): live when it runs, and in its definition."""
        return await self.peer.call("PUT", f"{BASE}/{vm_uuid}/cdrom", DomainInfo, body=req,
                                    request_id=request_id, timeout=timeout)

    async def set_forwards(self, vm_uuid: str, forwards: list[NodeForward],
                           request_id: str | None = None) -> None:
        """Replace the node NAT ports reaching the VM (sandbox private mode)."""
        await self.peer.request("PUT", f"{NODE_BASE}/vms/{vm_uuid}/forwards",
                                body=NodeForwards(forwards=forwards), request_id=request_id)

    async def console(self, vm_uuid: str) -> DomainConsole:
        """Where the domain's display and serial log are."""
        return await self.peer.call("GET", f"{BASE}/{vm_uuid}/console", DomainConsole)

    async def console_log(self, vm_uuid: str, max_bytes: int = 65536) -> str:
        """The last ``max_bytes`` the guest printed on its serial console."""
        answer = await self.peer.call("GET", f"{BASE}/{vm_uuid}/console-log", ConsoleLog,
                                      params={"max_bytes": max_bytes})
        return answer.text


def node_client(ctx: HasMembership, node: NodeRow) -> NodeClient:
    """The authenticated client of ``node``'s agent; 503 if the node is down."""
    if node.status != "up":
        raise Unavailable(f"node {node.name} is down")
    return NodeClient(ctx.membership.client_for_url(node.url))


def node_client_at(ctx: HasMembership, url: str) -> NodeClient:
    """The client of the node agent at ``url``, whatever the node's status (the orphan
    cleanup talks to a returning node that is still marked down)."""
    return NodeClient(ctx.membership.client_for_url(url))
