"""The control server's typed node client against a real (sim) node agent over its signed,
TLS internal API: each method's route, body and answer model agree with the node's."""

from __future__ import annotations

import uuid as uuidlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from yun.control.nodeclient import NodeClient
from yun.proto.components import ComponentType
from yun.proto.errors import Conflict, NotFound
from yun.proto.messages import DomainSpec, DomainState, ProvisionRequest, StopRequest
from yun.testing.cluster import SimCluster


@pytest.fixture
async def node_cluster(tmp_path: Path) -> AsyncIterator[SimCluster]:
    c = SimCluster(tmp_path, nodes=1)
    await c.start()
    # No control server: it would remove the test's VMs from the node as orphans (it
    # knows no such VM); the client here speaks as a control server of its own.
    assert c.control is not None
    await c.control.stop()
    c.control = None
    try:
        yield c
    finally:
        await c.stop()


async def test_typed_calls_against_a_node_agent(node_cluster: SimCluster) -> None:
    node = node_cluster.node_services[0]
    client = NodeClient(node_cluster.member_client(node.url, ComponentType.CONTROL, "ctl-t"))
    vm = str(uuidlib.uuid4())
    spec = DomainSpec(uuid=vm, name="typed", vcpus=1, memory_mb=64)

    info = await client.provision(ProvisionRequest(spec=spec), request_id="t:provision",
                                  timeout=30)
    assert (info.uuid, info.state, info.memory_mb) == (vm, DomainState.RUNNING, 64)
    assert (await client.get_domain(vm)).state is DomainState.RUNNING

    stopped = await client.power(vm, "stop", StopRequest(force=True), request_id="t:stop")
    assert stopped.state is DomainState.SHUTOFF
    # The node refuses to reboot a stopped domain: a 409 that says what to do.
    with pytest.raises(Conflict, match=r"not running.*start it"):
        await client.power(vm, "reboot")
    assert (await client.power(vm, "start")).state is DomainState.RUNNING
    assert (await client.power(vm, "reboot")).state is DomainState.RUNNING

    console = await client.console(vm)
    assert console.vnc_port is None  # the sim has no display
    assert "YUN-GUEST-READY" in await client.console_log(vm)
    assert len(await client.console_log(vm, max_bytes=16)) <= 16

    await client.remove(vm, request_id="t:remove", timeout=30)
    await client.remove(vm)  # already gone: no error
    with pytest.raises(NotFound, match=vm):
        await client.get_domain(vm)
    assert await node.agent.driver.get_domain(vm) is None


async def test_bad_power_calls_are_refused_before_reaching_the_node() -> None:
    client = NodeClient(peer=None)  # type: ignore[arg-type]  # never reached
    with pytest.raises(ValueError, match="unknown power action 'halt'"):
        await client.power("x", "halt")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="goes with 'stop', not 'start'"):
        await client.power("x", "start", StopRequest())
