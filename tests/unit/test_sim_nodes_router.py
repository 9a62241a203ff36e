"""One listener for the many nodes of `yun serve sim-nodes`: /n/<name>/... reaches the
node called so (its own agent, its own verifier), an unknown name is a 404, and a request
signed for one node is refused by another although they share host and port."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from yun.config import NodeSettings
from yun.node.agent import NodeAgent
from yun.node.service import build_agent
from yun.node.simnodes import PREFIX, NodeRouter
from yun.proto.auth import Signer, issue_credential
from yun.proto.client import PeerClient
from yun.proto.errors import NotFound, Unauthorized
from yun.proto.messages import HostInfo

CA_KEY = Ed25519PrivateKey.generate()


def control_signer() -> Signer:
    key = Ed25519PrivateKey.generate()
    return Signer(key, issue_credential(CA_KEY, "control-1", "control", key.public_key(),
                                        ttl=3600))


@pytest.fixture
def router(tmp_path: Path) -> NodeRouter:
    settings = NodeSettings(hypervisor="sim", state_dir=tmp_path, name="sims", sim_vcpus=8)
    router = NodeRouter()
    for i, name in enumerate(("sim-a", "sim-b")):
        agent: NodeAgent = build_agent(settings, name)
        agent.membership.component_id = f"node-{i}"
        agent.membership.url = f"http://sims{PREFIX}{name}"
        agent.membership.verifier.set_ca(CA_KEY.public_key())
        router.add(name, agent)
    return router


def client(router: NodeRouter, name: str, signer: Signer | None) -> PeerClient:
    return PeerClient(f"http://sims{PREFIX}{name}", signer,
                      transport=httpx.ASGITransport(app=router))


async def test_each_name_reaches_its_own_node(router: NodeRouter) -> None:
    signer = control_signer()
    for name, node_id in (("sim-a", "node-0"), ("sim-b", "node-1")):
        async with client(router, name, signer) as peer:
            assert (await peer.request("GET", "/healthz"))["node"] == node_id
            host = await peer.call("GET", "/internal/v1/host", HostInfo)
            assert host.hostname == name


async def test_unknown_node_is_404(router: NodeRouter) -> None:
    async with client(router, "sim-z", control_signer()) as peer:
        with pytest.raises(NotFound, match="sim-z"):
            await peer.request("GET", "/internal/v1/host")
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=router),
                                 base_url="http://sims") as raw:
        resp = await raw.get("/internal/v1/host")  # no /n/<name> prefix
        assert resp.status_code == 404
        assert "/n/<name>" in resp.json()["detail"]


async def test_a_request_signed_for_one_node_is_refused_by_another(router: NodeRouter) -> None:
    signer = control_signer()
    target_a = f"{PREFIX}sim-a/internal/v1/host"
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=router),
                                 base_url="http://sims") as raw:
        ok = await raw.get(target_a, headers=signer.headers("GET", target_a, "sims"))
        assert ok.status_code == 200, ok.text
        # The same signature replayed to node b (its path differs: the signature covers it).
        headers = signer.headers("GET", target_a, "sims")
        refused = await raw.get(f"{PREFIX}sim-b/internal/v1/host", headers=headers)
        assert refused.status_code == Unauthorized.status, refused.text
        assert "signature does not match" in refused.json()["detail"]
