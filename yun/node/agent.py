"""The node client's work: provision VMs from their specs, power them, report the host.

Each VM's operations run one at a time through its own queue. Every operation is
idempotent (ensure-style), so a command repeated by the control server after a
timeout or a crash does no harm.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Mapping
from dataclasses import dataclass

from yun.node.hypervisor.base import HypervisorDriver, node_capabilities
from yun.node.netload import UplinkMeter
from yun.node.network.base import NetworkBackend
from yun.node.storage.base import DiskBackend, ImageAccess
from yun.proto.client import SigningAuth
from yun.proto.components import ComponentType
from yun.proto.errors import BadRequest, NotFound, YunError
from yun.proto.membership import Membership
from yun.proto.messages import (
    DomainInfo,
    HostInfo,
    NicAttach,
    NicSpec,
    NodeCapability,
    NodeReport,
    NodeReportAnswer,
    ProvisionRequest,
    QosSpec,
    StopRequest,
)
from yun.proto.network import LearnedAddress, NicNetwork, NodeForward
from yun.util.queues import KeyedQueues

log = logging.getLogger("yun.node")


@dataclass(frozen=True)
class HostReserve:
    """What the host keeps for itself; reported beside the totals, never given to VMs."""

    memory_mb: int = 0
    vcpus: int = 0
    disk_gb: int = 0


class NodeAgent:
    """One node client: a hypervisor driver with its disk and network backends."""

    def __init__(self, membership: Membership, driver: HypervisorDriver, disks: DiskBackend,
                 networks: Mapping[NicNetwork, NetworkBackend], report_interval: float, *,
                 reserve: HostReserve | None = None, pool: str | None = None,
                 uplink: UplinkMeter | None = None,
                 forward_address: str | None = None) -> None:
        """``pool`` is the pool the configuration names (used when the node first
        registers); ``uplink`` measures the network load (None: reported as 0);
        ``forward_address`` is where the node's NAT ports answer (None: the host of the
        agent's URL)."""
        self.membership = membership
        self.forward_address = forward_address
        self.reserve = reserve or HostReserve()
        self.pool = pool
        self.uplink = uplink
        self._reserve_warned = False
        self.driver = driver
        self.disks = disks
        if NicNetwork.SANDBOX not in networks:
            raise ValueError("a node always has a sandbox network backend")
        self.networks = dict(networks)
        self.report_interval = report_interval
        self.queues = KeyedQueues()
        self._tasks: list[asyncio.Task[None]] = []
        self._report_now = asyncio.Event()
        # Reports are numbered per boot; each control server is told the last report it
        # answered, so it knows this one was taken after it had acted on that one.
        self.boot_id = uuid.uuid4().hex
        self._seq = 0
        self._acked: dict[str, int] = {}

    @property
    def network(self) -> NetworkBackend:
        """The sandbox network backend (every node has one)."""
        return self.networks[NicNetwork.SANDBOX]

    def network_of(self, nic: NicSpec) -> NetworkBackend:
        """The backend of the NIC's network, or BadRequest naming what this node lacks."""
        backend = self.networks.get(nic.network)
        if backend is None:
            raise BadRequest(f"NIC {nic.nic_id}: this node has no {nic.network} network "
                             f"(a direct network needs [node] direct_uplink)")
        return backend

    @property
    def node_id(self) -> str:
        return self.membership.component_id or ""

    async def start(self) -> None:
        await self.driver.open()
        for backend in self.networks.values():
            await backend.ensure_network()
        domains = await self.driver.list_domains()
        log.info("node agent found its domains", extra={
            "node": self.node_id, "domains": len(domains),
            "running": sum(1 for d in domains if d.state == "running")})
        self._tasks = [asyncio.create_task(self._report_loop()),
                       asyncio.create_task(self._event_loop())]
        self.membership.on_peers_changed(lambda added, removed: self._report_now.set())

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        # Guests outlive the agent (U-SPLIT): close the connection, never stop domains.
        await self.driver.close()

    # -- VM operations ---------------------------------------------------------------------

    def image_access(self) -> ImageAccess:
        """How this node's image downloads are signed and checked (TLS to the storage
        server, with the node's certificate)."""
        signer = self.membership.signer
        return ImageAccess(SigningAuth(signer) if signer is not None else None,
                           self.membership.client_tls)

    async def provision(self, vm_uuid: str, req: ProvisionRequest) -> DomainInfo:
        """Images cached, disks made, NICs leased, domain defined (and started)."""
        if req.spec.uuid != vm_uuid:
            raise BadRequest(f"spec uuid {req.spec.uuid} does not match the URL ({vm_uuid})")
        async with self.queues.hold(vm_uuid):
            for image in req.images:
                await self.disks.ensure_image(image, self.image_access())
            disks = [await self.disks.ensure_disk(vm_uuid, d) for d in req.spec.disks]
            if req.sandbox is not None:
                # Every backend: the direct one takes its blocked networks from it too.
                for backend in self.networks.values():
                    await backend.ensure_network(req.sandbox)
            nics = [await self.network_of(n).ensure_port(vm_uuid, n) for n in req.spec.nics]
            await self.driver.ensure_defined(req.spec, disks, nics)
            if req.start:
                await self.driver.start(vm_uuid)
            log.info("VM provisioned", extra={"vm": vm_uuid, "node": self.node_id,
                                              "started": req.start})
            return await self._info(vm_uuid)

    async def attach_nic(self, vm_uuid: str, req: NicAttach) -> DomainInfo:
        """One more NIC in the VM (U-HOTPLUG): its port (tap, lease, rules), then the
        hypervisor plugs it, live if the domain runs and into its definition. When the
        hypervisor fails, the port is released again: nothing is half made."""
        async with self.queues.hold(vm_uuid):
            await self._require(vm_uuid)
            backend = self.network_of(req.nic)
            if req.sandbox is not None and backend is self.network:
                await backend.ensure_network(req.sandbox)
            nic = await backend.ensure_port(vm_uuid, req.nic)
            try:
                await self.driver.attach_nic(vm_uuid, nic)
            except Exception as exc:
                await backend.release_port(vm_uuid, req.nic.nic_id)
                log.warning("NIC not plugged; its port released", extra={
                    "vm": vm_uuid, "node": self.node_id, "nic": req.nic.nic_id,
                    "error": str(exc)})
                raise
            info = await self._info(vm_uuid)
        log.info("NIC plugged into VM", extra={"vm": vm_uuid, "node": self.node_id,
                                               "nic": req.nic.nic_id, "mac": req.nic.mac,
                                               "ip": req.nic.ip, "state": str(info.state)})
        self._report_now.set()
        return info

    async def detach_nic(self, vm_uuid: str, nic_id: str) -> DomainInfo:
        """Unplug a NIC of the VM: the hypervisor first (the guest lets it go), then its
        port in every network backend. No error if it is not there."""
        async with self.queues.hold(vm_uuid):
            await self._require(vm_uuid)
            await self.driver.detach_nic(vm_uuid, nic_id)
            for backend in self.networks.values():
                await backend.release_port(vm_uuid, nic_id)
            info = await self._info(vm_uuid)
        log.info("NIC unplugged from VM", extra={"vm": vm_uuid, "node": self.node_id,
                                                 "nic": nic_id})
        self._report_now.set()
        return info

    async def remove(self, vm_uuid: str) -> None:
        """Domain, disks and leases of the VM gone; nothing to do if already gone."""
        async with self.queues.hold(vm_uuid):
            await self.driver.undefine(vm_uuid)
            for backend in self.networks.values():
                await backend.release_ports(vm_uuid)
            await self.disks.delete_disks(vm_uuid)
            log.info("VM removed", extra={"vm": vm_uuid, "node": self.node_id})
        self._report_now.set()

    async def start_vm(self, vm_uuid: str) -> DomainInfo:
        async with self.queues.hold(vm_uuid):
            await self._require(vm_uuid)
            await self.driver.start(vm_uuid)
            return await self._info(vm_uuid)

    async def stop_vm(self, vm_uuid: str, req: StopRequest) -> DomainInfo:
        async with self.queues.hold(vm_uuid):
            await self._require(vm_uuid)
            if req.force:
                await self.driver.destroy(vm_uuid)
            else:
                await self.driver.shutdown(vm_uuid, req.timeout)
            return await self._info(vm_uuid)

    async def reboot_vm(self, vm_uuid: str) -> DomainInfo:
        async with self.queues.hold(vm_uuid):
            await self._require(vm_uuid)
            await self.driver.reboot(vm_uuid)
            return await self._info(vm_uuid)

    async def set_qos(self, vm_uuid: str, qos: QosSpec) -> DomainInfo:
        """New QoS limits on the VM, live if it runs and for its next boots; the answer
        holds the limits the hypervisor reports in force."""
        async with self.queues.hold(vm_uuid):
            await self._require(vm_uuid)
            await self.driver.set_qos(vm_uuid, qos)
            info = await self._info(vm_uuid)
        log.info("VM QoS set", extra={"vm": vm_uuid, "node": self.node_id,
                                      "qos": qos.model_dump(mode="json", exclude_none=True)})
        self._report_now.set()
        return info

    async def set_forwards(self, vm_uuid: str, forwards: list[NodeForward]) -> None:
        """Replace the node NAT ports reaching the VM (sandbox private mode)."""
        async with self.queues.hold(vm_uuid):
            await self.network.set_forwards(vm_uuid, forwards)
        log.info("VM node ports set", extra={
            "vm": vm_uuid, "node": self.node_id,
            "forwards": [f"{f.protocol}/{f.node_port}->{f.vm_ip}:{f.vm_port}"
                         for f in forwards]})

    async def _require(self, vm_uuid: str) -> DomainInfo:
        info = await self.driver.get_domain(vm_uuid)
        if info is None:
            raise NotFound(f"no domain {vm_uuid} on this node")
        return info

    async def _info(self, vm_uuid: str) -> DomainInfo:
        return await self._require(vm_uuid)

    # -- reporting -------------------------------------------------------------------------

    async def host_info(self) -> HostInfo:
        """The host's totals and reserves (separately: the control server subtracts the
        reserve), its load, capabilities and configured pool."""
        host = await self.driver.host_info()
        total_gb, used_gb = await self.disks.capacity_gb()
        reserve = self.reserve
        if not self._reserve_warned and (reserve.memory_mb >= host.memory_mb
                                         or reserve.vcpus >= host.vcpus
                                         or reserve.disk_gb >= total_gb):
            self._reserve_warned = True
            log.warning("the host reserve leaves nothing for VMs in at least one resource",
                        extra={"node": self.node_id, "memory_mb": host.memory_mb,
                               "memory_reserve_mb": reserve.memory_mb, "vcpus": host.vcpus,
                               "vcpus_reserve": reserve.vcpus, "disk_gb": total_gb,
                               "disk_reserve_gb": reserve.disk_gb})
        return HostInfo(
            hostname=host.hostname, hypervisor=self.driver.name, accel=host.accel,
            vcpus=host.vcpus, memory_mb=host.memory_mb, disk_gb=total_gb,
            memory_reserved_mb=reserve.memory_mb, vcpus_reserved=reserve.vcpus,
            disk_reserved_gb=reserve.disk_gb,
            cpu_load=host.cpu_load, memory_used_mb=host.memory_used_mb, disk_used_gb=used_gb,
            net_load=self.uplink.sample() if self.uplink is not None else 0.0,
            capabilities=sorted({*node_capabilities(self.driver.caps, host.accel),
                                 *self._network_capabilities()}),
            pool=self.pool,
            forward_address=self.forward_address,
        )

    def _network_capabilities(self) -> list[NodeCapability]:
        return [NodeCapability.NET_DIRECT] if NicNetwork.DIRECT in self.networks else []

    async def report(self) -> None:
        """Push identity, capacity, load and every domain to each control server."""
        controls = self.membership.peers_of(ComponentType.CONTROL)
        if not controls:
            return
        report = await self.snapshot()
        for peer in controls:
            body = report.model_copy(update={"acked_seq": self._acked.get(peer.component_id,
                                                                          0)})
            try:
                answer = await self.membership.client(peer).request(
                    "POST", "/internal/v1/nodes/report", body=body, timeout=10)
                if answer is not None:
                    settings = NodeReportAnswer.model_validate(answer).sandbox
                    if settings is not None:
                        for backend in self.networks.values():
                            await backend.ensure_network(settings)
            except YunError as exc:
                log.warning("report to control server failed: %s", exc,
                            extra={"node": self.node_id, "control": peer.component_id})
                continue
            self._acked[peer.component_id] = report.seq

    async def snapshot(self) -> NodeReport:
        """What this node holds now: its domains, network reservations and volumes.

        VMs with an operation under way are listed as busy first, so a VM whose
        provisioning starts while the lists are read is never seen as holding nothing.
        """
        self._seq += 1
        busy = self.queues.keys()
        domains = await self.driver.list_domains()
        ports: dict[str, list[str]] = {}
        learned: list[LearnedAddress] = []
        for backend in self.networks.values():
            for vm, macs in (await backend.vm_ports()).items():
                ports.setdefault(vm, []).extend(macs)
            learned.extend(await backend.learned())
        disks = await self.disks.vm_disk_ids()
        busy = sorted(set(busy) | set(self.queues.keys()))
        return NodeReport(node_id=self.node_id, name=self.membership.name,
                          url=self.membership.url, host=await self.host_info(),
                          domains=domains, ports=ports, disks=disks, busy=busy,
                          boot_id=self.boot_id, seq=self._seq,
                          report_interval=self.report_interval, learned=learned)

    async def _report_loop(self) -> None:
        while True:
            try:
                await self.report()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("node report failed", extra={"node": self.node_id})
            self._report_now.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._report_now.wait(), self.report_interval)

    async def _event_loop(self) -> None:
        async for event in self.driver.events():
            log.info("domain event", extra={"vm": event.uuid, "state": str(event.state),
                                            "reason": event.reason, "node": self.node_id})
            self._report_now.set()


