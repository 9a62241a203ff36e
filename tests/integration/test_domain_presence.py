"""F-LEAVE and rejoin: presence by heartbeats, peers told, service resumed."""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

import pytest

from yun.domain.service import DomainService
from yun.proto.components import ComponentType
from yun.testing.cluster import SimCluster
from yun.testing.waiting import eventually


async def test_stopped_component_is_gone_and_rejoins(cluster: SimCluster) -> None:
    assert cluster.domain and cluster.control and cluster.api
    registry = cluster.domain.registry
    node = cluster.node_services[1]
    node_id = node.agent.node_id
    control = cluster.control.ctx.membership

    # Killed without leaving (its heartbeats just stop): the domain marks it gone after
    # the TTL and tells its peers; the control server marks the node down.
    await node.agent.stop()
    await node.agent.membership.stop(leave=False)
    await node.server.stop()
    await eventually(lambda: registry.members[node_id].status == "gone")
    await eventually(lambda: node_id not in control.peers)

    async def node_status() -> str:
        assert cluster.api is not None
        return str((await cluster.api.get(f"/api/v1/nodes/{node_id}")).json()["status"])

    for _ in range(100):
        if await node_status() == "down":
            break
        await asyncio.sleep(0.1)
    assert await node_status() == "down"

    # Restarted, it joins again under the same id and service resumes.
    from yun.node.service import NodeService
    again = NodeService(node.settings, name=node.name)
    await again.start()
    cluster.node_services[1] = again
    assert again.agent.node_id == node_id
    await eventually(lambda: registry.members[node_id].status == "alive")
    await eventually(lambda: node_id in control.peers)
    for _ in range(100):
        if await node_status() == "up":
            break
        await asyncio.sleep(0.1)
    assert await node_status() == "up"


async def test_domain_server_restart_is_survived(cluster: SimCluster) -> None:
    assert cluster.domain and cluster.control
    old = cluster.domain
    settings = old.settings.model_copy(update={"listen_port": old.server.port})
    await old.stop()
    fresh = DomainService(settings)
    await fresh.start()
    cluster.domain = fresh
    # Every component notices its heartbeat is refused and joins again as itself.
    expected = 2 + len(cluster.node_services) + 2  # control, storage, nodes, gateway
    await eventually(lambda: len(fresh.registry.members) >= expected - 1, timeout=20)
    await eventually(lambda: bool(cluster.control and cluster.control.ctx.membership
                                  .peers_of(ComponentType.STORAGE)), timeout=20)
    ids = {m.component_id for m in fresh.registry.members.values()}
    assert cluster.control.ctx.membership.component_id in ids


async def test_peer_address_change_reaches_peers(cluster: SimCluster, tmp_path: Path) -> None:
    """F-MOVE: a component that reports a new URL is seen there by its peers."""
    assert cluster.control and cluster.storage
    control = cluster.control.ctx.membership
    storage = cluster.storage.membership
    storage.url = storage.url + "/"  # the same server, under a different address string
    moved = storage.url
    await eventually(lambda: any(p.url == moved for p in control.peers.values()))


async def test_a_storage_server_that_knows_no_control_server_yet_waits_for_one(
        cluster: SimCluster) -> None:
    """A storage server that joined the domain before any control server did learns of
    one at its next heartbeat; an upload finished meanwhile waited for it instead of
    failing with 503 "no control server recorded image" (seen when a test deployment
    started its services at once)."""
    storage = cluster.storage
    assert storage is not None
    # As right after an early join: no control server in its list, and the domain's
    # next answer (a newer generation) brings one.
    await storage.membership._apply_peers([])
    storage.membership.generation -= 1
    assert storage.membership.peers_of(ComponentType.CONTROL) == []
    controls = await storage._control_peers()
    assert [p.type for p in controls] == [ComponentType.CONTROL]


async def test_a_stall_of_the_domain_server_expires_nobody(
        cluster: SimCluster, caplog: pytest.LogCaptureFixture) -> None:
    """A component was dropped from its peers' lists in CI ("component gone: no heartbeat"
    for three at once, a 503 "no storage server has joined the domain" next) when the one
    event loop of an in-process cluster stalled for about the TTL. Heartbeats sent
    meanwhile were waiting unread; the server's own stall is not the members' silence."""
    assert cluster.domain is not None
    registry = cluster.domain.registry
    assert all(m.status == "alive" for m in registry.members.values())
    generation = registry.generation
    with caplog.at_level(logging.INFO, logger="yun.domain"):
        # Blocks the loop on purpose: nobody is heard, nobody sends.
        time.sleep(2 * registry.ttl)  # noqa: ASYNC251
        await asyncio.sleep(4 * registry.heartbeat_interval)  # a sweep, then heartbeats
    assert [r.getMessage() for r in caplog.records if "gone" in r.getMessage()] == []
    assert "domain server stalled; members' silence meanwhile not counted" in caplog.messages
    assert registry.generation == generation  # no peer list changed
