"""`yun serve sim-nodes` in-process against a real domain server: every node joins as
itself at https://host:port/n/<name>, and over real TLS (the listener shows the first
node's certificate, checked against the domain CA and the host name) each path reaches its
own node, checked by that node's own verifier."""

from __future__ import annotations

import secrets
from pathlib import Path

import pytest

from yun.config import DomainSettings, NodeSettings
from yun.domain.service import DomainService
from yun.node.simnodes import PREFIX, SharedTransport, SimNodesService
from yun.proto.client import PeerClient
from yun.proto.errors import Forbidden, NotFound


async def test_sim_nodes_join_as_themselves_behind_one_listener(tmp_path: Path) -> None:
    secret = secrets.token_urlsafe(16)
    domain = DomainService(DomainSettings(
        name="domain", domain_name="t", domain_secret=secret, listen_host="127.0.0.1",
        listen_port=0, state_dir=tmp_path / "domain", mdns=False))
    await domain.start()
    sims = SimNodesService(NodeSettings(
        name="sims", domain_name="t", domain_secret=secret, domain_url=domain.url,
        listen_host="127.0.0.1", listen_port=0, state_dir=tmp_path / "nodes",
        hypervisor="sim", heartbeat_interval=5), 3, prefix="t", join_concurrency=2)
    try:
        await sims.start()
        nodes = sims.nodes
        ids = {n.agent.node_id for n in nodes}
        assert len(ids) == 3 and "" not in ids
        assert [n.agent.membership.url for n in nodes] == [
            f"{sims.url}{PREFIX}t-{i:05d}" for i in range(3)]
        first = nodes[0].agent.membership
        for node in nodes[1:]:  # one pool, one pair of TLS contexts for the process
            transport = node.agent.membership.transport
            assert isinstance(transport, SharedTransport)
            assert node.agent.membership.pools is transport.whole
            assert node.agent.membership.client_tls is first.client_tls
            assert node.agent.membership.server_tls is first.server_tls
        # Their calls to the domain server go over the group's connections: one pool for
        # that peer, shared by both nodes.
        group = nodes[1].agent.membership.pools
        assert group is not None and group is nodes[2].agent.membership.pools
        [domain_pool] = group.pools.values()
        for node in nodes[1:]:
            client = node.agent.membership.client_for_url(domain.url)
            await client.request("GET", "/healthz")
        assert domain_pool.opened == 1
        caller = nodes[1].agent.membership  # any member of the domain may read /healthz
        for node in nodes:
            async with PeerClient(node.agent.membership.url, caller.signer,
                                  caller.client_tls) as peer:
                assert (await peer.request("GET", "/healthz"))["node"] == node.agent.node_id
                # Signature checked by that node's verifier; a node may not drive a node.
                with pytest.raises(Forbidden, match="node component may not call"):
                    await peer.request("GET", "/internal/v1/host")
        async with PeerClient(f"{sims.url}{PREFIX}t-00099", caller.signer,
                              caller.client_tls) as peer:
            with pytest.raises(NotFound, match="t-00099"):
                await peer.request("GET", "/healthz")
    finally:
        await sims.stop()
        await domain.stop()
