"""The node client process (C-NODE): one agent per host, or many simulated ones."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

from yun.config import NodeSettings
from yun.node.agent import HostReserve, NodeAgent
from yun.node.api import create_node_app
from yun.node.hypervisor import load_driver
from yun.node.hypervisor.base import HypervisorDriver
from yun.node.netload import UplinkMeter
from yun.node.network.base import NetworkBackend
from yun.node.storage.base import DiskBackend
from yun.proto.components import ComponentType
from yun.proto.membership import Membership
from yun.proto.network import NicNetwork
from yun.util.net import reachable_address
from yun.util.serve import AppServer, service_url

if TYPE_CHECKING:
    from yun.node.hypervisor.sim.hostfile import SimHostFile

log = logging.getLogger("yun.node")


def sim_state_file(settings: NodeSettings, name: str) -> Path:
    """Where the sim node ``name`` keeps its simulated host (``sim-host.json``)."""
    from yun.node.hypervisor.sim.hostfile import FILE_NAME

    # One file for the simulated host's domains, disks and leases, so a restarted
    # sim node finds them as a libvirt node would (<state dir>/sim-host.json); the
    # many nodes of `yun serve sim-nodes` share settings, so each gets its own dir.
    return (settings.state_dir / FILE_NAME if name == settings.name
            else settings.state_dir / "sim-hosts" / name / FILE_NAME)


def build_backends(settings: NodeSettings, name: str, *, sim_file: SimHostFile | None = None
                   ) -> tuple[HypervisorDriver, DiskBackend, dict[NicNetwork, NetworkBackend]]:
    """The driver and backends a node of these settings uses (a sim host's backends
    write ``sim_file`` when given: one file object, batched, for all of them)."""
    node_dir = settings.state_dir / "node"
    if settings.hypervisor == "sim":
        from yun.node.network.sim import SimSandboxBackend
        from yun.node.storage.sim import SimDiskBackend

        state_file: Path | SimHostFile = (sim_file if sim_file is not None
                                          else sim_state_file(settings, name))
        sim_networks: dict[NicNetwork, NetworkBackend] = {
            NicNetwork.SANDBOX: SimSandboxBackend(state_file=state_file)}
        if settings.sim_direct:
            from yun.node.network.sim_direct import SimDirectBackend

            # Opt-in: a sim node with a direct network reports NET_DIRECT, and the
            # scheduler's tests count on sim nodes that do not.
            sim_networks[NicNetwork.DIRECT] = SimDirectBackend(settings.sim_direct_lan,
                                                               state_file=state_file)
        return (
            load_driver("sim", hostname=name, vcpus=settings.sim_vcpus,
                        memory_mb=settings.sim_memory_mb, state_file=state_file),
            SimDiskBackend(total_gb=settings.sim_disk_gb, state_file=state_file, node=name,
                           alarm_percent=settings.storage_alarm_percent),
            sim_networks,
        )
    from yun.node.network.sandbox import SandboxNetworkBackend
    from yun.node.storage.local import LocalDiskBackend

    # Its subnet and routers come from the control server (SandboxSettings).
    networks: dict[NicNetwork, NetworkBackend] = {
        NicNetwork.SANDBOX: SandboxNetworkBackend(node_dir / "network")}
    if settings.direct_uplink is not None:
        from yun.node.network.direct import DirectNetworkBackend

        networks[NicNetwork.DIRECT] = DirectNetworkBackend(
            node_dir / "direct", settings.direct_uplink, settings.direct_bridge,
            blocked=settings.direct_blocked)
    return (
        load_driver("libvirt", uri=settings.libvirt_uri, accel=settings.accel,
                    state_dir=node_dir, vnc_listen=settings.vnc_listen or settings.listen_host),
        LocalDiskBackend(settings.storage_patterns(), image_cache_dir=settings.image_cache_dir,
                         image_cache_gb=settings.image_cache_gb,
                         shared_storage=settings.shared_storage,
                         alarm_percent=settings.storage_alarm_percent, node=name),
        networks,
    )


def build_agent(settings: NodeSettings, name: str, *,
                sim_file: SimHostFile | None = None) -> NodeAgent:
    """The node agent these settings describe: its backends, host reserve, pool and
    uplink meter (not yet joined or serving)."""
    driver, disks, networks = build_backends(settings, name, sim_file=sim_file)
    membership = Membership(settings, ComponentType.NODE, url="", name=name)
    # A simulated host has no uplink of its own: its network load is 0.
    uplink = (UplinkMeter(settings.uplink, settings.net_capacity_mbit)
              if settings.hypervisor != "sim" else None)
    # A real node's NAT ports answer on its own address, which is not loopback even
    # when the agent listens there (an all-in-one): the kernel does not DNAT loopback.
    forward_address = settings.forward_address
    if forward_address is None and settings.hypervisor != "sim":
        forward_address = reachable_address(settings.listen_host)
    return NodeAgent(membership, driver, disks, networks, settings.report_interval,
                     reserve=HostReserve(memory_mb=settings.memory_reserve_mb,
                                         vcpus=settings.vcpus_reserve,
                                         disk_gb=settings.disk_reserve_gb),
                     pool=settings.pool, uplink=uplink, forward_address=forward_address)


class NodeService:
    """One node client serving its internal API and reporting to the control servers."""

    def __init__(self, settings: NodeSettings, *, name: str | None = None) -> None:
        self.settings = settings
        self.name = name or settings.name
        self.agent = build_agent(settings, self.name)
        membership = self.agent.membership
        self.server = AppServer(create_node_app(self.agent), settings.listen_host,
                                settings.listen_port)
        self.url = membership.url = service_url(settings, self.server.port)

    async def start(self) -> None:
        await self.agent.membership.start()
        await self.agent.start()
        await self.server.start(self.agent.membership.serving_tls())
        log.info("node client ready", extra={"node": self.agent.node_id, "node_name": self.name,
                                             "url": self.url,
                                             "hypervisor": self.settings.hypervisor})

    async def stop(self) -> None:
        await self.server.stop()
        await self.agent.stop()
        await self.agent.membership.stop()
