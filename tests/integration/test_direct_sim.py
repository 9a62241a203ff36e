"""Direct mode on sim nodes (F-NET-DIRECT): with ``[node] sim_direct`` a sim node offers a
direct network whose simulated LAN DHCP server gives the VM its address; the node reports
it and the API shows it; the delete gives the port back."""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.integration.conftest import started, upload
from tests.integration.test_network_modes_sim import consistent, create_vm, network_pool
from yun.config import NodeSettings
from yun.node.network.sim_direct import SimDirectBackend
from yun.proto.network import NicNetwork
from yun.testing.cluster import SimCluster

LAN = ipaddress.IPv4Network("192.168.88.0/24")


@dataclass
class DirectSimCluster(SimCluster):
    def node_settings(self, name: str) -> NodeSettings:
        return super().node_settings(name).model_copy(
            update={"sim_direct": True, "sim_direct_lan": str(LAN)})


@pytest.fixture
async def direct_cluster(tmp_path: Path) -> AsyncIterator[SimCluster]:
    async with started(DirectSimCluster(tmp_path, nodes=1)) as c:
        yield c


async def test_direct_vm_shows_the_address_of_the_lan(direct_cluster: SimCluster,
                                                      small_qcow2: Path) -> None:
    cluster = direct_cluster
    assert cluster.api is not None
    await upload(cluster, small_qcow2)
    await network_pool(cluster, "direct")
    task, vm = await create_vm(cluster, "lan1")
    assert task["state"] == "succeeded", task
    (node,) = cluster.node_services
    backend = node.agent.networks[NicNetwork.DIRECT]
    assert isinstance(backend, SimDirectBackend)
    assert await backend.vm_ports() == {vm["uuid"]: [vm["mac"]]}
    lease = backend.leases[vm["mac"]]
    assert ipaddress.IPv4Address(lease) in LAN
    shown = vm
    for _ in range(100):  # the next report of the node carries it
        shown = (await cluster.api.get("/api/v1/vms/lan1")).json()
        if shown["ip"] == lease:
            break
        await asyncio.sleep(0.2)
    assert shown["ip"] == lease, shown
    assert await consistent(cluster) == []
    resp = await cluster.api.delete("/api/v1/vms/lan1")
    assert resp.status_code == 202, resp.text
    await cluster.wait_task(resp.json()["task"]["uuid"])
    assert await backend.vm_ports() == {} and backend.leases == {}
