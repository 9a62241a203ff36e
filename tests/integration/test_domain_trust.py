"""The encrypted, authenticated work domain (issue 6, security): the join never reveals the
secret and is mutual, credentials are per component and signed by the domain CA, every
internal request is signed for its audience, revocation reaches every peer, every
internal port is TLS, and a domain-server restart changes nothing for running work."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI, Request

from yun.config import NodeSettings
from yun.domain.service import DomainService
from yun.proto.auth import Signer, join_key
from yun.proto.client import PeerClient
from yun.proto.components import ComponentType
from yun.proto.errors import Forbidden, Unauthorized, YunError
from yun.proto.membership import JoinRefused, Membership
from yun.proto.pki import (
    DomainCA,
    client_context,
    load_or_create_key,
    server_context,
    url_authority,
    write_private,
)
from yun.testing.cluster import SimCluster
from yun.testing.waiting import eventually
from yun.util.serve import AppServer

REPORT = "/internal/v1/nodes/report"


# --- (a) an impostor answering for the domain learns nothing ------------------------------


class Impostor:
    """A domain server that does not know the secret: it answers the challenge with its own
    CA and a made-up proof, and records every request it receives."""

    def __init__(self, root: Path) -> None:
        self.received: list[dict[str, Any]] = []
        ca = DomainCA.load_or_create(root / "ca", "it")
        key = load_or_create_key(root / "server.key")
        write_private(root / "server.crt", ca.issue("evil", "domain", key.public_key(),
                                                     "127.0.0.1", 3600))
        app = FastAPI()

        @app.api_route("/{path:path}", methods=["GET", "POST", "PUT", "DELETE"])
        async def anything(path: str, request: Request) -> Any:
            body = await request.body()
            self.received.append({"method": request.method, "path": "/" + path,
                                  "headers": dict(request.headers), "body": body})
            if path == "v1/join/challenge":
                return {"challenge_id": "c1", "server_nonce": "n" * 43,
                        "ca_cert_pem": ca.cert_pem.decode(), "server_proof": "0" * 64}
            return {"component_id": "x"}

        self.server = AppServer(app, "127.0.0.1", 0)
        self.tls = server_context(root / "server.crt", root / "server.key", ca.cert_pem,
                                  require_client_cert=False)
        self.url = f"https://127.0.0.1:{self.server.port}"


@pytest.fixture
async def impostor(tmp_path: Path) -> AsyncIterator[Impostor]:
    evil = Impostor(tmp_path / "impostor")
    await evil.server.start(evil.tls)
    try:
        yield evil
    finally:
        await evil.server.stop()


async def test_impostor_domain_server_is_refused_and_learns_nothing(
        impostor: Impostor, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    secret = "the-real-domain-secret-0123456789"
    settings = NodeSettings(name="victim", domain_secret=secret, domain_url=impostor.url,
                            state_dir=tmp_path / "victim")
    membership = Membership(settings, ComponentType.NODE, "https://127.0.0.1:1")
    with caplog.at_level(logging.ERROR, "yun.membership"), \
            pytest.raises(JoinRefused, match="did not prove knowledge of the domain secret"):
        await membership.start()
    assert f"domain server at {impostor.url} did not prove knowledge of the domain secret" \
        in caplog.text
    # It got one challenge request: a type, a name and a random nonce. No client proof,
    # no public key, nothing derived from the secret, and no second step.
    [seen] = impostor.received
    assert (seen["method"], seen["path"]) == ("POST", "/v1/join/challenge")
    body = json.loads(seen["body"])
    assert set(body) == {"type", "name", "client_nonce"}
    everything = repr(impostor.received)
    for leaked in (secret, join_key(secret).hex(), "client_proof", "public_key"):
        assert leaked not in everything
    assert membership.credential is None


async def test_a_wrong_client_proof_is_refused_by_the_domain(cluster: SimCluster) -> None:
    """A client that skips the server check and guesses gets 403 and nothing issued."""
    assert cluster.domain is not None
    async with PeerClient(cluster.domain.url, None, client_context(None)) as raw:
        challenge = await raw.request("POST", "/v1/join/challenge", body={
            "type": "node", "name": "guesser", "client_nonce": "a" * 43})
        with pytest.raises(Forbidden, match="wrong domain secret"):
            await raw.request("POST", "/v1/join", body={
                "challenge_id": challenge["challenge_id"], "client_proof": "0" * 64,
                "public_key": "A" * 43, "type": "node", "name": "guesser",
                "url": "https://127.0.0.1:1"})
        # The challenge was used up by the failed attempt.
        with pytest.raises(Forbidden, match="unknown or expired"):
            await raw.request("POST", "/v1/join", body={
                "challenge_id": challenge["challenge_id"], "client_proof": "0" * 64,
                "public_key": "A" * 43, "type": "node", "name": "guesser",
                "url": "https://127.0.0.1:1"})
    assert "guesser" not in {m.name for m in cluster.domain.registry.members.values()}


# --- (b) a node cannot drive another node -------------------------------------------------


async def test_node_credential_is_refused_on_another_nodes_control_routes(
        cluster: SimCluster) -> None:
    node_a, node_b = (n.agent.membership for n in cluster.node_services[:2])
    # Node A's own key, credential and certificate: TLS accepts it (it is a member), the
    # route does not (only control servers may call it).
    async with PeerClient(cluster.node_services[1].url, node_a.signer,
                          node_a.client_tls) as as_a:
        with pytest.raises(Forbidden, match="a node component may not call"):
            await as_a.request("DELETE", "/internal/v1/domains/00000000-0000-0000-0000-"
                                         "000000000001")
        with pytest.raises(Forbidden, match="a node component may not call"):
            await as_a.request("GET", "/internal/v1/domains")
    # A request the control server signed for node A cannot be replayed to node B.
    control = cluster.control.ctx.membership if cluster.control else None
    assert control is not None and control.signer is not None
    headers = control.signer.headers("GET", "/internal/v1/domains",
                                     url_authority(cluster.node_services[0].url))
    async with httpx.AsyncClient(base_url=cluster.node_services[1].url,
                                 verify=control.client_tls) as http:
        resp = await http.get("/internal/v1/domains", headers=headers)
    assert resp.status_code == 401 and "signature does not match" in resp.text
    # Sent where it was meant to go, once, it works; a second time it is a replay.
    async with httpx.AsyncClient(base_url=cluster.node_services[0].url,
                                 verify=control.client_tls) as http:
        assert (await http.get("/internal/v1/domains", headers=headers)).status_code == 200
        resp = await http.get("/internal/v1/domains", headers=headers)
    assert resp.status_code == 401 and "replayed" in resp.text
    assert node_b.signer is not None


# --- (c) a component that left or was removed is refused ---------------------------------


async def report_status(client: PeerClient) -> tuple[int, str]:
    """What the control server answers an empty node report from ``client``: 422 means the
    caller was admitted (and the empty body refused), 401 that the caller was refused."""
    try:
        await client.request("POST", REPORT, body={})
    except YunError as exc:
        return exc.status, exc.detail
    return 200, ""


async def test_removed_component_is_refused_at_once_and_by_peers(cluster: SimCluster) -> None:
    assert cluster.domain and cluster.control
    node = cluster.node_services[1].agent.membership
    control = cluster.control.ctx.membership
    node_id = node.component_id
    assert node.signer is not None and node_id
    old_key, old_credential = node.signer.key, node.signer.credential
    old = Signer(old_key, old_credential)
    to_control = PeerClient(cluster.control.url, old, node.client_tls)
    to_domain = PeerClient(cluster.domain.url, old, node.client_tls)
    try:
        assert (await report_status(to_control))[0] == 422  # admitted, body refused
        # An operator removes the node (through a control server's credential).
        async with PeerClient(cluster.domain.url, control.signer, control.client_tls) as ops:
            await ops.request("DELETE", f"/v1/components/{node_id}")
            # A node may not remove anyone.
            async with PeerClient(cluster.domain.url, node.signer, node.client_tls) as n:
                with pytest.raises((Forbidden, Unauthorized)):
                    await n.request("DELETE", f"/v1/components/{control.component_id}")
        # The domain server refuses the old credential at once.
        with pytest.raises(Unauthorized, match="removed from the domain"):
            await to_domain.request("POST", f"/v1/components/{node_id}/heartbeat", body={})
        # Its peers within one heartbeat interval (bounded wait: a few intervals).
        loop = asyncio.get_running_loop()
        start = loop.time()

        async def refused_by_control() -> bool:
            status, detail = await report_status(to_control)
            return status == 401 and "removed from the domain" in detail

        await eventually(refused_by_control, timeout=10 * cluster.heartbeat_interval + 5)
        waited = loop.time() - start
        assert waited < 10 * cluster.heartbeat_interval + 5
        # The removed node joins again (it still knows the secret) and its new credential
        # is accepted: revocation covers only what was issued before.
        async def rejoined() -> bool:
            return node.credential is not None and node.credential != old_credential
        await eventually(rejoined)
        async with PeerClient(cluster.control.url, node.signer, node.client_tls) as fresh:
            assert (await report_status(fresh))[0] == 422
    finally:
        await to_control.aclose()
        await to_domain.aclose()


async def test_component_that_left_is_refused(cluster: SimCluster) -> None:
    assert cluster.domain and cluster.control
    service = cluster.node_services[1]
    node = service.agent.membership
    assert node.signer is not None and node.client_tls is not None
    signer, tls = node.signer, node.client_tls
    await service.stop()  # leaves the domain
    cluster.node_services.pop(1)
    async with PeerClient(cluster.domain.url, signer, tls) as to_domain:
        with pytest.raises(Unauthorized, match="removed from the domain"):
            await to_domain.request("GET", "/v1/components")

    async def refused_by_control() -> bool:
        assert cluster.control is not None
        async with PeerClient(cluster.control.url, signer, tls) as to_control:
            return (await report_status(to_control))[0] == 401

    await eventually(refused_by_control, timeout=10 * cluster.heartbeat_interval + 5)


# --- (d) no plain HTTP on internal ports --------------------------------------------------


async def test_plain_http_to_internal_ports_is_refused(cluster: SimCluster) -> None:
    assert cluster.domain and cluster.control and cluster.storage
    internal = {"domain": cluster.domain.url, "control": cluster.control.url,
                "storage": cluster.storage.url, "node": cluster.node_services[0].url}
    for name, url in internal.items():
        assert url.startswith("https://"), name
        plain = "http://" + url.removeprefix("https://")
        async with httpx.AsyncClient(timeout=5) as http:
            try:
                resp = await http.get(f"{plain}/healthz")
            except httpx.HTTPError:
                continue  # the TLS server drops a plain-HTTP connection
            raise AssertionError(f"{name} answered plain HTTP: {resp.status_code}")
    # TLS without a domain certificate: refused everywhere but the domain server's join.
    for name in ("control", "storage", "node"):
        async with httpx.AsyncClient(verify=client_context(None), timeout=5) as http:
            with pytest.raises(httpx.HTTPError):
                await http.get(f"{internal[name]}/healthz")
    async with httpx.AsyncClient(verify=client_context(None), timeout=5) as http:
        assert (await http.get(f"{internal['domain']}/healthz")).status_code == 200


# --- (e) a domain-server restart changes nothing -----------------------------------------


async def test_domain_restart_keeps_the_ca_and_running_work(cluster: SimCluster) -> None:
    assert cluster.domain and cluster.control and cluster.api
    control = cluster.control.ctx.membership
    node_id = cluster.node_services[0].agent.node_id

    async def known() -> bool:
        return any(p.component_id == node_id for p in control.peers_of(ComponentType.NODE))

    # The node as the control server knew it before the restart: a heartbeat of the
    # control server that fails while the domain server is down makes it join the new
    # one, and its peer list then lacks the nodes until they rejoin too (as the comment
    # below says).
    await eventually(known, timeout=30)
    [peer] = [p for p in control.peers_of(ComponentType.NODE) if p.component_id == node_id]
    old = cluster.domain
    fingerprint = old.ca.fingerprint
    settings = old.settings.model_copy(update={"listen_port": old.server.port})
    await old.stop()
    fresh = DomainService(settings)
    assert fresh.ca.fingerprint == fingerprint  # the CA was kept in the state dir
    await fresh.start()
    cluster.domain = fresh
    # Before anyone rejoined, the components still trust each other's certificates and
    # credentials: the control server drives a node.
    host = await control.client(peer).request("GET", "/internal/v1/host")
    assert host["vcpus"] > 0
    # And every component joins the new domain server again, as itself.
    expected = {control.component_id, cluster.gateway.membership.component_id
                if cluster.gateway else None,
                *(n.agent.node_id for n in cluster.node_services)}

    async def all_back() -> bool:
        return expected <= set(fresh.registry.members)

    await eventually(all_back, timeout=30)
    # (Meanwhile a component that rejoins before its peers sees them vanish: the control
    # server may mark nodes down and the gateway answer 502/503 for a moment, a recovery
    # defect of its own in issue 6. Here: once all rejoined, the API answers and every
    # node is up.)
    api = cluster.api

    async def nodes_up() -> bool:
        resp = await api.get("/api/v1/nodes")
        return resp.status_code == 200 and {n["status"] for n in resp.json()["items"]} == {"up"}

    await eventually(nodes_up, timeout=30)


async def test_certificate_and_credential_are_renewed_with_the_heartbeat(
        cluster: SimCluster) -> None:
    """Past half its life a component's certificate and credential are renewed through the
    heartbeat and loaded into its live TLS contexts; its peers accept the new ones."""
    assert cluster.domain and cluster.control
    node = cluster.node_services[0].agent.membership
    assert node.component_id and node.credential
    old_credential, old_cert = node.credential, node.cert_file.read_bytes()
    member = cluster.domain.registry.members[node.component_id]
    member.credential_issued_at -= cluster.domain.registry.credential_lifetime  # aged

    async def renewed() -> bool:
        return node.credential != old_credential

    await eventually(renewed, timeout=10 * cluster.heartbeat_interval + 5)
    assert node.cert_file.read_bytes() != old_cert
    # A fresh connection presents the new certificate and the new credential: admitted.
    async with PeerClient(cluster.control.url, node.signer, node.client_tls) as fresh:
        assert (await report_status(fresh))[0] == 422
