"""F-DISC: a node given no address finds its domain server by mDNS on the LAN and joins."""

from __future__ import annotations

import pytest

from yun.testing.datacenter import DataCenter

pytestmark = pytest.mark.system


def test_node_discovers_the_domain_by_mdns(datacenter_factory) -> None:  # type: ignore[no-untyped-def]
    dc: DataCenter = datacenter_factory(nodes=1, discover=True)
    assert dc.api is not None and dc.ctl is not None
    config = (dc.workdir / "node0.toml").read_text()
    assert "domain_url" not in config
    nodes = dc.api.get("/api/v1/nodes").json()["items"]
    assert [n["status"] for n in nodes] == ["up"]
    log = dc.procs["node0"].log.read_text()
    assert "found domain server by mDNS" in log
    assert f"https://{dc.ctl.ip}:7700" in log
    # The join proved the domain server knows the secret before sending anything.
    assert "joined domain" in log
