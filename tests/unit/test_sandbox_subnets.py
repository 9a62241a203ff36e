"""Each node gets its own sandbox subnet; the settings a node is answered with."""

from __future__ import annotations

import re
from datetime import timedelta
from pathlib import Path

import pytest
from pydantic import ValidationError

from yun.config import ControlSettings
from yun.control.db.models import NodeRow, RouterRow, utcnow
from yun.control.db.session import Database
from yun.control.network.subnets import assign_sandbox_subnet, gateway_of, sandbox_settings
from yun.proto.errors import InsufficientCapacity
from yun.proto.messages import NicSpec
from yun.proto.network import NodeForward, SandboxSettings


def node(i: int) -> NodeRow:
    return NodeRow(uuid=f"n{i}", name=f"n{i}", url=f"https://10.0.0.{i + 1}:7720",
                   hypervisor="sim", accel="sim")


async def test_subnets_are_unique_kept_and_run_out_clearly(tmp_path: Path) -> None:
    db = Database(f"sqlite+aiosqlite:///{tmp_path}/s.db")
    await db.migrate()
    async with db.session() as s:
        nodes = [node(i) for i in range(4)]
        for n in nodes[:3]:
            s.add(n)
            await s.flush()
            await assign_sandbox_subnet(s, n, "10.64.0.0/22", 24)
            await s.flush()
        assert [n.sandbox_subnet for n in nodes[:3]] == [
            "10.64.0.0/24", "10.64.1.0/24", "10.64.2.0/24"]
        # A node keeps the subnet it has.
        assert await assign_sandbox_subnet(s, nodes[1], "10.64.0.0/22", 24) == "10.64.1.0/24"
        s.add(nodes[3])
        await s.flush()
        await assign_sandbox_subnet(s, nodes[3], "10.64.0.0/22", 24)
        await s.flush()
        extra = node(9)
        s.add(extra)
        await s.flush()
        with pytest.raises(InsufficientCapacity, match=re.escape(
                "no free /24 left in the sandbox supernet 10.64.0.0/22 for node n9")):
            await assign_sandbox_subnet(s, extra, "10.64.0.0/22", 24)


async def test_settings_name_live_routers_only(tmp_path: Path) -> None:
    db = Database(f"sqlite+aiosqlite:///{tmp_path}/s.db")
    await db.migrate()
    settings = ControlSettings(router_timeout=30)
    async with db.session() as s:
        n = node(0)
        s.add(n)
        assert await sandbox_settings(s, n, settings) is None  # no subnet yet
        n.sandbox_subnet = "10.64.5.0/24"
        now = utcnow()
        s.add(RouterRow(uuid="r1", name="r1", url="https://x", lan_address="172.31.0.21",
                        applied_generation=0, last_seen_at=now))
        s.add(RouterRow(uuid="r2", name="r2", url="https://y", lan_address="172.31.0.22",
                        applied_generation=0, last_seen_at=now - timedelta(seconds=90)))
        await s.flush()
        got = await sandbox_settings(s, n, settings)
    assert got is not None
    assert got.subnet == "10.64.5.0/24" and got.gateway == "10.64.5.1"
    assert got.routers == ["172.31.0.21"]  # r2 has not pulled its rules for 90 s
    assert "10.64.0.0/10" in got.blocked and "192.168.0.0/16" in got.blocked
    assert gateway_of("10.64.5.0/24") == "10.64.5.1"


def test_network_messages_refuse_bad_addresses_with_the_reason() -> None:
    with pytest.raises(ValidationError, match="not an IPv4 network"):
        SandboxSettings(subnet="10.64.5.1/24", gateway="10.64.5.1")
    with pytest.raises(ValidationError, match="not an IPv4 address"):
        SandboxSettings(subnet="10.64.5.0/24", gateway="10.64.5.300")
    with pytest.raises(ValidationError, match="less than or equal to 65535"):
        NodeForward(node_port=70000, vm_ip="10.64.5.10", vm_port=80)
    with pytest.raises(ValidationError, match="Input should be 'sandbox' or 'direct'"):
        NicSpec(nic_id="n", mac="52:54:00:00:00:01", network="nat")


async def test_a_router_is_known_by_the_name_it_gives_at_its_first_pull(
        db: Database) -> None:
    """A router that just joined may not be among the control server's peers yet: its
    hello names it, and the name and notice URL it gives are kept."""
    from yun.control.network.router_sync import record_hello
    from yun.proto.network import RouterHello

    hello = RouterHello(lan_address="172.31.0.5", name="edge1",
                        url="https://172.31.0.5:7740")
    async with db.session() as session:
        await record_hello(session, "router-uuid-1", hello.name, hello.url, hello)
    async with db.session() as session:
        row = await session.get(RouterRow, "router-uuid-1")
        assert row is not None
        assert (row.name, row.url, row.lan_address) == (
            "edge1", "https://172.31.0.5:7740", "172.31.0.5")
