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
from dataclasses import dataclass

from yun.node.hypervisor.base import HypervisorDriver, node_capabilities
from yun.node.netload import UplinkMeter
from yun.node.network.base import NetworkBackend
from yun.node.storage.base import DiskBackend, ImageAccess
from yun.proto.client import SigningAuth
from yun.proto.components import ComponentType
from yun.proto.errors import NotFound, YunError
from yun.proto.membership import Membership
from yun.proto.messages import (
    DomainInfo,
    HostInfo,
    NodeReport,
    ProvisionRequest,
    StopRequest,
)
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
                 network: NetworkBackend, nat_subnet: str, report_interval: float, *,
                 reserve: HostReserve | None = None, pool: str | None = None,
                 uplink: UplinkMeter | None = None) -> None:
        """``pool`` is the pool the configuration names (used when the node first
        registers); ``uplink`` measures the network load (None: reported as 0)."""
        self.membership = membership
        self.reserve = reserve or HostReserve()
        self.pool = pool
        self.uplink = uplink
        self._reserve_warned = False
        self.driver = driver
        self.disks = disks
        self.network = network
        self.nat_subnet = nat_subnet
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
    def node_id(self) -> str:
        return self.membership.component_id or ""

    async def start(self) -> None:
        await self.driver.open()
        await self.network.ensure_network()
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
            from yun.proto.errors import BadRequest
            raise BadRequest(f"spec uuid {req.spec.uuid} does not match the URL ({vm_uuid})")
        async with self.queues.hold(vm_uuid):
            for image in req.images:
                await self.disks.ensure_image(image, self.image_access())
            disks = [await self.disks.ensure_disk(vm_uuid, d) for d in req.spec.disks]
            await self.network.ensure_network()
            nics = [await self.network.ensure_port(vm_uuid, n) for n in req.spec.nics]
            await self.driver.ensure_defined(req.spec, disks, nics)
            if req.start:
                await self.driver.start(vm_uuid)
            log.info("VM provisioned", extra={"vm": vm_uuid, "node": self.node_id,
                                              "started": req.start})
            return await self._info(vm_uuid)

    async def remove(self, vm_uuid: str) -> None:
        """Domain, disks and leases of the VM gone; nothing to do if already gone."""
        async with self.queues.hold(vm_uuid):
            await self.driver.undefine(vm_uuid)
            await self.network.release_ports(vm_uuid)
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
            capabilities=node_capabilities(self.driver.caps, host.accel),
            pool=self.pool, nat_subnet=self.nat_subnet,
        )

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
                await self.membership.client(peer).request(
                    "POST", "/internal/v1/nodes/report", body=body, timeout=10)
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
        ports = await self.network.vm_ports()
        disks = await self.disks.vm_disk_ids()
        busy = sorted(set(busy) | set(self.queues.keys()))
        return NodeReport(node_id=self.node_id, name=self.membership.name,
                          url=self.membership.url, host=await self.host_info(),
                          domains=domains, ports=ports, disks=disks, busy=busy,
                          boot_id=self.boot_id, seq=self._seq,
                          report_interval=self.report_interval)

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


