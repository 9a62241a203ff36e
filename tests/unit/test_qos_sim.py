"""QoS on the sim driver and through the node agent: set on a running VM, reported in
DomainInfo.qos, kept across a restart of the sim host (as libvirt keeps a definition)."""

from __future__ import annotations

import uuid
from pathlib import Path
from types import SimpleNamespace

import pytest

from yun.node.agent import NodeAgent
from yun.node.hypervisor.base import DomainNotFound
from yun.node.hypervisor.sim.driver import SimDriver
from yun.node.network.sim import SimSandboxBackend
from yun.node.storage.sim import SimDiskBackend
from yun.proto.errors import NotFound
from yun.proto.messages import CpuQos, DomainSpec, DomainState, QosSpec
from yun.proto.network import NicNetwork


async def test_sim_keeps_qos_running_and_across_a_host_restart(tmp_path: Path) -> None:
    path = tmp_path / "sim-host.json"
    driver = SimDriver(state_file=path)
    vm = str(uuid.uuid4())
    first = QosSpec(cpu=CpuQos.HIGH)
    await driver.ensure_defined(DomainSpec(uuid=vm, name="q", vcpus=1, memory_mb=64,
                                           qos=first), [], [])
    await driver.start(vm)
    assert (await driver.get_domain(vm)).qos == first  # type: ignore[union-attr]
    qos = QosSpec(cpu=CpuQos.LOW, read_iops_sec=500, write_iops_sec=50, bandwidth_kbit=10_000)
    await driver.set_qos(vm, qos)
    info = await driver.get_domain(vm)
    assert info is not None and info.qos == qos and info.state is DomainState.RUNNING
    assert [d.qos for d in await driver.list_domains()] == [qos]
    assert driver.caps.qos_cpu and driver.caps.qos_disk and driver.caps.qos_net
    with pytest.raises(DomainNotFound):
        await driver.set_qos(str(uuid.uuid4()), qos)

    restarted = SimDriver(state_file=path)
    info = await restarted.get_domain(vm)
    assert info is not None and info.qos == qos and info.state is DomainState.SHUTOFF


async def test_agent_set_qos_answers_the_limits_in_force(tmp_path: Path) -> None:
    driver = SimDriver()
    membership = SimpleNamespace(component_id="node-1", name="n1")
    agent = NodeAgent(membership, driver, SimDiskBackend(total_gb=10),  # type: ignore[arg-type]
                      {NicNetwork.SANDBOX: SimSandboxBackend()}, report_interval=60)
    vm = str(uuid.uuid4())
    await driver.ensure_defined(DomainSpec(uuid=vm, name="q", vcpus=1, memory_mb=64), [], [])
    await driver.start(vm)
    qos = QosSpec(cpu=CpuQos.HIGH, write_iops_sec=500)
    info = await agent.set_qos(vm, qos)
    assert info.uuid == vm and info.qos == qos
    with pytest.raises(NotFound, match="no domain"):
        await agent.set_qos(str(uuid.uuid4()), qos)
