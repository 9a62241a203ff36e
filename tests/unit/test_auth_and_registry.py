"""The domain CA, credentials, signed requests and the domain registry (F-JOIN, F-ASSOC,
F-LEAVE)."""

from __future__ import annotations

import secrets
import stat
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from yun.domain.registry import Registry
from yun.proto.auth import (
    CLOCK_SKEW,
    CONTEXT_HEADER,
    SIGNATURE_HEADER,
    Signer,
    Verifier,
    client_proof,
    issue_credential,
    join_key,
    server_proof,
    verify_credential,
)
from yun.proto.components import ComponentType as CT
from yun.proto.errors import Forbidden, NotFound, Unauthorized
from yun.proto.messages import JoinChallengeRequest, JoinRequest, JoinResponse
from yun.proto.pki import (
    CertificateError,
    DomainCA,
    b64,
    fingerprint,
    load_or_create_key,
    public_raw,
    verify_certificate,
)

# --- the domain CA --------------------------------------------------------------------------


def test_ca_is_made_once_kept_private_and_reused(tmp_path: Path) -> None:
    ca = DomainCA.load_or_create(tmp_path, "d")
    assert stat.S_IMODE((tmp_path / "ca.key").stat().st_mode) == 0o600
    again = DomainCA.load_or_create(tmp_path, "d")
    assert again.cert_pem == ca.cert_pem and again.fingerprint == ca.fingerprint


def test_certificate_names_the_component_and_is_checked_against_the_ca(tmp_path: Path) -> None:
    ca = DomainCA.load_or_create(tmp_path / "ca", "d")
    key = load_or_create_key(tmp_path / "node.key")
    assert stat.S_IMODE((tmp_path / "node.key").stat().st_mode) == 0o600
    cert = ca.issue("node-1", "node", key.public_key(), "127.0.0.1", 3600)
    info = verify_certificate(ca.cert_pem, cert)
    assert (info.component_id, info.component_type) == ("node-1", "node")
    assert time.time() + 3500 < info.not_after < time.time() + 3700
    other = DomainCA.load_or_create(tmp_path / "other", "d")
    with pytest.raises(CertificateError, match="not issued by this domain"):
        verify_certificate(other.cert_pem, cert)
    expired = ca.issue("node-1", "node", key.public_key(), "node.example", -30)
    with pytest.raises(CertificateError, match="not now"):
        verify_certificate(ca.cert_pem, expired)


# --- credentials ----------------------------------------------------------------------------

CA_KEY = Ed25519PrivateKey.generate()
NODE_KEY = Ed25519PrivateKey.generate()


def node_credential(ttl: float = 3600, ca_key: Ed25519PrivateKey = CA_KEY,
                    component_type: str = "node") -> str:
    return issue_credential(ca_key, "node-1", component_type, NODE_KEY.public_key(), ttl)


def test_credential_round_trip() -> None:
    who = verify_credential(CA_KEY.public_key(), node_credential())
    assert (who.component_id, who.component_type) == ("node-1", "node")
    assert who.public_key == public_raw(NODE_KEY)


def test_credential_minted_by_a_non_ca_key_is_refused() -> None:
    """A node holding only its own key cannot make itself a control credential."""
    forged = node_credential(ca_key=NODE_KEY, component_type="control")
    with pytest.raises(Unauthorized, match="not signed by this domain's CA"):
        verify_credential(CA_KEY.public_key(), forged)


def test_tampered_credential_payload_is_refused() -> None:
    genuine = node_credential()
    _payload, sig = genuine.split(".")
    control_payload = node_credential(component_type="control").split(".")[0]
    with pytest.raises(Unauthorized, match="not signed"):
        verify_credential(CA_KEY.public_key(), f"{control_payload}.{sig}")
    with pytest.raises(Unauthorized, match="malformed"):
        verify_credential(CA_KEY.public_key(), "garbage")


def test_expired_credential_is_refused() -> None:
    with pytest.raises(Unauthorized, match="expired"):
        verify_credential(CA_KEY.public_key(), node_credential(ttl=-10))
    verifier = Verifier(lambda: ["node-b:7720"], CA_KEY.public_key())
    with pytest.raises(Unauthorized, match="expired"):
        verifier.credential(node_credential(ttl=-10))


# --- request signatures ---------------------------------------------------------------------

AUDIENCE = "127.0.0.1:7720"
TARGET = "/internal/v1/domains/abc?max_bytes=10"


def signed(signer: Signer | None = None, *, method: str = "DELETE", target: str = TARGET,
           audience: str = AUDIENCE, context: str | None = None,
           now: float | None = None) -> dict[str, str]:
    signer = signer or Signer(NODE_KEY, node_credential(component_type="control"))
    headers = signer.headers(method, target, audience, context, now=now)
    if context is not None:
        headers[CONTEXT_HEADER] = context
    return {k.lower(): v for k, v in headers.items()}


def verifier() -> Verifier:
    return Verifier(lambda: [AUDIENCE], CA_KEY.public_key())


def test_a_signed_request_is_accepted_once() -> None:
    v = verifier()
    headers = signed(context="ctx-1")
    who = v.verify("DELETE", TARGET, headers)
    assert who.component_type == "control"
    with pytest.raises(Unauthorized, match="replayed"):
        v.verify("DELETE", TARGET, headers)


def test_request_signed_with_another_key_is_refused() -> None:
    """A stolen credential is useless without its private key."""
    thief = Signer(Ed25519PrivateKey.generate(), node_credential(component_type="control"))
    with pytest.raises(Unauthorized, match="signature does not match"):
        verifier().verify("DELETE", TARGET, signed(thief))


def test_request_for_another_audience_is_refused() -> None:
    """A request a node received cannot be replayed to another node."""
    headers = signed(audience="127.0.0.1:7721")
    with pytest.raises(Unauthorized, match="signature does not match"):
        verifier().verify("DELETE", TARGET, headers)


def test_stale_or_future_timestamp_is_refused() -> None:
    for skew in (-CLOCK_SKEW - 5, CLOCK_SKEW + 5):
        with pytest.raises(Unauthorized, match="from this component's clock"):
            verifier().verify("DELETE", TARGET, signed(now=time.time() + skew))


def test_altered_request_or_context_is_refused() -> None:
    headers = signed(context="user=alice")
    with pytest.raises(Unauthorized, match="signature does not match"):
        verifier().verify("DELETE", TARGET, {**headers, CONTEXT_HEADER.lower(): "user=root"})
    without = {k: v for k, v in headers.items() if k != CONTEXT_HEADER.lower()}
    with pytest.raises(Unauthorized, match="signature does not match"):
        verifier().verify("DELETE", TARGET, without)
    with pytest.raises(Unauthorized, match="signature does not match"):
        verifier().verify("GET", TARGET, headers)
    with pytest.raises(Unauthorized, match="signature does not match"):
        verifier().verify("DELETE", "/internal/v1/domains/xyz", headers)
    unsigned = {k: v for k, v in headers.items() if k != SIGNATURE_HEADER.lower()}
    with pytest.raises(Unauthorized, match="signed by the caller's key"):
        verifier().verify("DELETE", TARGET, unsigned)


def test_revoked_component_is_refused_until_it_joins_again() -> None:
    v = verifier()
    old = Signer(NODE_KEY, node_credential(component_type="control"))
    v.set_revoked({"node-1": time.time()}, 1)
    with pytest.raises(Unauthorized, match="removed from the domain"):
        v.verify("DELETE", TARGET, signed(old))
    time.sleep(0.01)
    fresh = Signer(NODE_KEY, node_credential(component_type="control"))
    assert v.verify("DELETE", TARGET, signed(fresh)).component_id == "node-1"


# --- the registry ---------------------------------------------------------------------------


def registry(tmp_path: Path, secret: str = "s") -> Registry:
    ca = DomainCA.load_or_create(tmp_path / "ca", "d")
    return Registry("d", secret, ttl=5, heartbeat_interval=1, ca=ca, state_dir=tmp_path)


def join(reg: Registry, type_: CT, name: str, secret: str = "s",
         component_id: str | None = None) -> JoinResponse:
    """Both steps of a join as a component does them."""
    key = Ed25519PrivateKey.generate()
    public = b64(public_raw(key))
    nonce = secrets.token_urlsafe(32)
    challenge = reg.challenge(JoinChallengeRequest(type=type_, name=name, client_nonce=nonce))
    k = join_key(secret)
    url = f"https://{name.replace('_', '-')}.example:7000"
    return reg.join(JoinRequest(
        challenge_id=challenge.challenge_id, public_key=public, type=type_, name=name, url=url,
        client_proof=client_proof(k, challenge.server_nonce, nonce, str(type_), name, url,
                                  public),
        component_id=component_id))


def test_challenge_proves_the_server_knows_the_secret(tmp_path: Path) -> None:
    reg = registry(tmp_path)
    nonce = secrets.token_urlsafe(32)
    challenge = reg.challenge(JoinChallengeRequest(type=CT.NODE, name="n", client_nonce=nonce))
    ca_fp = fingerprint(challenge.ca_cert_pem)
    assert challenge.server_proof == server_proof(join_key("s"), nonce, challenge.server_nonce,
                                                  ca_fp)
    assert challenge.server_proof != server_proof(join_key("x"), nonce,
                                                  challenge.server_nonce, ca_fp)


def test_join_with_wrong_secret_or_reused_challenge_is_refused(tmp_path: Path) -> None:
    reg = registry(tmp_path)
    with pytest.raises(Forbidden, match="wrong domain secret"):
        join(reg, CT.NODE, "n", secret="x")
    key = b64(public_raw(Ed25519PrivateKey.generate()))
    nonce = secrets.token_urlsafe(32)
    challenge = reg.challenge(JoinChallengeRequest(type=CT.NODE, name="n", client_nonce=nonce))
    req = JoinRequest(challenge_id=challenge.challenge_id, public_key=key, type=CT.NODE,
                      name="n", url="https://n.example:1",
                      client_proof=client_proof(join_key("s"), challenge.server_nonce, nonce,
                                                "node", "n", "https://n.example:1", key))
    reg.join(req)
    with pytest.raises(Forbidden, match="unknown or expired"):
        reg.join(req)


def test_join_issues_a_certificate_and_a_credential_for_the_key(tmp_path: Path) -> None:
    reg = registry(tmp_path)
    resp = join(reg, CT.NODE, "node_a")
    info = verify_certificate(resp.ca_cert_pem, resp.certificate_pem)
    assert (info.component_id, info.component_type) == (resp.component_id, "node")
    who = verify_credential(reg.ca.public_key, resp.credential)
    assert (who.component_id, who.component_type) == (resp.component_id, "node")


def test_join_associations_expiry_and_rejoin(tmp_path: Path) -> None:
    reg = registry(tmp_path)
    join(reg, CT.STORAGE, "storage_a")
    control = join(reg, CT.CONTROL, "control_b")
    join(reg, CT.ROUTER, "router_c")
    node = join(reg, CT.NODE, "node_d")
    # The seed's example: a node connects to the storage server and the control server only.
    assert sorted(p.name for p in node.peers) == ["control_b", "storage_a"]
    gateway = join(reg, CT.GATEWAY, "gw")
    assert [p.name for p in gateway.peers] == ["control_b"]

    generation = reg.generation
    reg.heartbeat(node.component_id, None, now=time.time() + 10)  # the node stays alive
    gone = reg.expire(now=time.time() + 10)
    assert {m.name for m in gone} == {"storage_a", "control_b", "router_c", "gw"}
    assert reg.generation > generation
    assert reg.peers_of(reg.get(node.component_id)) == []

    again = join(reg, CT.CONTROL, "control_b")  # restarted without its id: same member
    assert again.component_id == control.component_id
    assert reg.get(control.component_id).status == "alive"
    reg.leave(node.component_id)
    with pytest.raises(NotFound, match="join again"):
        reg.heartbeat(node.component_id, None)


def test_leaving_revokes_and_a_rejoin_is_accepted(tmp_path: Path) -> None:
    reg = registry(tmp_path)
    node = join(reg, CT.NODE, "n")
    generation = reg.revocation_generation
    reg.leave(node.component_id)
    assert reg.revocation_generation > generation
    v = Verifier(lambda: [], reg.ca.public_key)
    v.set_revoked({c: r.revoked_at for c, r in reg.revoked.items()}, reg.revocation_generation)
    with pytest.raises(Unauthorized, match="removed"):
        v.credential(node.credential)
    again = join(reg, CT.NODE, "n", component_id=node.component_id)
    assert v.credential(again.credential)[0].component_id == node.component_id
    # The revocation outlives a domain-server restart.
    assert node.component_id in registry(tmp_path).revoked


def test_registry_generation_never_repeats_across_restarts(tmp_path: Path) -> None:
    first = registry(tmp_path)
    join(first, CT.NODE, "n")
    second = registry(tmp_path)
    assert second.generation > first.generation


def test_the_domain_servers_own_stall_is_not_counted_as_silence(tmp_path: Path) -> None:
    reg = registry(tmp_path)  # TTL 5 s
    node = join(reg, CT.NODE, "n")
    seen = reg.get(node.component_id).last_seen
    # The server heard nobody from 1 s to 7 s after the node's last heartbeat.
    reg.deaf(seen + 1, seen + 7)
    assert reg.silence(reg.get(node.component_id), seen + 9) == pytest.approx(3)
    assert reg.expire(now=seen + 9) == []
    gone = reg.expire(now=seen + 11.1)  # 5.1 s of silence while listening
    assert [m.component_id for m in gone] == [node.component_id]


def test_stalls_older_than_any_silence_that_matters_are_forgotten(tmp_path: Path) -> None:
    reg = registry(tmp_path)
    now = time.time()
    for k in range(1000):
        reg.deaf(now + k, now + k + 0.5)
    assert len(reg._deaf) <= 10 * reg.ttl + 1
