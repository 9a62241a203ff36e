"""Credentials and the domain registry (F-JOIN, F-ASSOC, F-LEAVE)."""

from __future__ import annotations

import time

import pytest

from yun.domain.registry import Registry
from yun.proto.auth import issue_credential, verify_credential
from yun.proto.components import ComponentType as CT
from yun.proto.errors import Forbidden, NotFound, Unauthorized
from yun.proto.messages import JoinRequest


def test_credential_round_trip_and_tampering() -> None:
    cred = issue_credential("s3cret", "node-1", "node")
    who = verify_credential("s3cret", cred)
    assert (who.component_id, who.component_type) == ("node-1", "node")
    with pytest.raises(Unauthorized, match="does not match this domain"):
        verify_credential("other", cred)
    _payload, mac = cred.split(".")
    forged = issue_credential("s3cret", "node-1", "control").split(".")[0]
    with pytest.raises(Unauthorized):
        verify_credential("s3cret", f"{forged}.{mac}")
    with pytest.raises(Unauthorized, match="malformed"):
        verify_credential("s3cret", "garbage")
    expired = issue_credential("s3cret", "node-1", "node", ttl=-10)
    with pytest.raises(Unauthorized, match="expired"):
        verify_credential("s3cret", expired)


def join(reg: Registry, type_: CT, name: str, secret: str = "s", **kw: object):  # type: ignore[no-untyped-def]
    return reg.join(JoinRequest(type=type_, name=name, url=f"http://{name}", secret=secret,
                                **kw))  # type: ignore[arg-type]


def test_join_associations_expiry_and_rejoin() -> None:
    reg = Registry("d", "s", ttl=5, heartbeat_interval=1)
    with pytest.raises(Forbidden, match="wrong domain secret"):
        join(reg, CT.NODE, "n", secret="x")
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


def test_registry_generation_never_repeats_across_restarts() -> None:
    first = Registry("d", "s", ttl=5, heartbeat_interval=1)
    join(first, CT.NODE, "n")
    second = Registry("d", "s", ttl=5, heartbeat_interval=1)
    assert second.generation > first.generation
