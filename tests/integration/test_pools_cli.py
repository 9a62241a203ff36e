"""Pools, zones, VM groups, node labels and QoS through the `yun` CLI and the SDK, against
a real gateway and control server over sim nodes (F-POOL, F-1PN, F-PUB, T-SCHED, QoS)."""

from __future__ import annotations

from pathlib import Path

from tests.integration.conftest import shown
from yun.client import AsyncClient, TokenAuth
from yun.proto.resources import GroupPolicy, PoolCreate, VmGroupCreate, ZoneCreate
from yun.testing.cluster import SimCluster


async def into_pool(cli, node: str, pool: str) -> None:  # type: ignore[no-untyped-def]
    """Move an empty node into ``pool``, out of whichever pool it is in."""
    current = (await shown(cli, "node", "show", node))["pool_name"]
    if current == pool:
        return
    if current is not None:
        code, out = await cli("pool", "remove-node", current, node)
        assert code == 0, out
    code, out = await cli("pool", "add-node", pool, node)
    assert code == 0, out
    assert f"node {node} added to pool {pool}" in out


async def test_two_pools_place_vms_by_their_templates(
        cli, cluster: SimCluster, small_qcow2: Path) -> None:  # type: ignore[no-untyped-def]
    code, out = await cli("zone", "create", "east", "--description", "rack 4")
    assert code == 0, out
    code, out = await cli("pool", "create", "gold", "--zone", "east", "--cpu-ratio", "2",
                          "--qos-level", "high", "--thin", "--no-ha",
                          "--network-mode", "sandbox-private", "--weight", "cpu=2")
    assert code == 0, out
    gold = await shown(cli, "pool", "show", "gold")
    assert (gold["zone_name"], gold["cpu_ratio"], gold["qos_level"], gold["thin"]) == (
        "east", 2.0, "high", True)
    assert gold["weights"].get("cpu") == 2.0
    await into_pool(cli, "node-0001", "gold")

    code, out = await cli("node", "label", "node-0001", "ssd=true")
    assert code == 0, out
    assert (await shown(cli, "node", "show", "node-0001"))["labels"] == {"ssd": "true"}
    code, out = await cli("pool", "show", "gold")
    assert code == 0 and "capacity" in out and "warnings" in out
    assert (await shown(cli, "pool", "show", "gold"))["node_count"] == 1

    code, out = await cli("image", "upload", str(small_qcow2), "--name", "base")
    assert code == 0, out
    code, out = await cli("vm-group", "create", "web", "--policy", "anti-affinity")
    assert code == 0, out
    code, out = await cli("vm", "create", "a1", "--image", "base", "--memory", "128",
                          "--pool", "gold", "--group", "web", "--node-label", "ssd=true",
                          "--bandwidth", "10mbit")
    assert code == 0, out
    assert "create a1: done" in out and "10 Mbit/s" in out
    a1 = await shown(cli, "vm", "show", "a1")
    assert (a1["pool_name"], a1["node_name"], a1["qos"]["bandwidth_kbit"]) == (
        "gold", "node-0001", 10_000)
    assert a1["qos"]["cpu"] == "high"  # the pool's level

    # Anti-affinity: gold has one node, which already holds a member of the group.
    code, out = await cli("vm", "create", "a2", "--image", "base", "--memory", "128",
                          "--pool", "gold", "--group", "web")
    assert code == 1 and "anti-affinity" in out, out
    # A label no node of the pool carries.
    code, out = await cli("vm", "create", "a3", "--image", "base", "--memory", "128",
                          "--pool", "gold", "--node-label", "gpu=a100")
    assert code == 1 and "gpu" in out, out

    # F-1PN: a drained node gets no new VM and keeps its own; it leaves only when empty.
    code, out = await cli("pool", "drain-node", "gold", "node-0001")
    assert code == 0 and "drained" in out, out
    code, out = await cli("vm", "create", "a4", "--image", "base", "--memory", "128",
                          "--pool", "gold")
    assert code == 1, out
    assert (await shown(cli, "vm", "show", "a1"))["state"] == "running"
    code, out = await cli("pool", "remove-node", "gold", "node-0001")
    assert code == 1 and "409" in out, out
    code, out = await cli("pool", "enable-node", "gold", "node-0001")
    assert code == 0 and "active" in out, out
    code, out = await cli("vm-group", "delete", "web")
    assert code == 1 and "409" in out, out

    for vm in ("a2", "a3", "a4"):  # a refused create may have left a VM in error
        await cli("vm", "delete", vm)
    code, out = await cli("vm", "delete", "a1")
    assert code == 0, out
    code, out = await cli("vm-group", "delete", "web")
    assert code == 0, out
    code, out = await cli("zone", "delete", "east")
    assert code == 1 and "409" in out, out  # it still holds gold
    code, out = await cli("pool", "remove-node", "gold", "node-0001")
    assert code == 0, out
    assert (await shown(cli, "node", "show", "node-0001"))["pool_name"] is None
    code, out = await cli("pool", "delete", "gold")
    assert code == 0, out
    code, out = await cli("zone", "delete", "east")
    assert code == 0, out


async def test_set_qos_changes_a_running_vm(
        cli, cluster: SimCluster, small_qcow2: Path) -> None:  # type: ignore[no-untyped-def]
    code, out = await cli("image", "upload", str(small_qcow2), "--name", "base")
    assert code == 0, out
    await into_pool(cli, "node-0000", "default")
    code, out = await cli("vm", "create", "q1", "--image", "base", "--memory", "128")
    assert code == 0, out
    code, out = await cli("vm", "set-qos", "q1", "--cpu", "low", "--iops", "500",
                          "--write-bps", "20MiB", "--bandwidth", "10mbit")
    assert code == 0, out
    assert "set-qos q1: done" in out and "10 Mbit/s" in out and "20 MiB/s" in out
    vm = await shown(cli, "vm", "show", "q1")
    assert vm["state"] == "running"
    assert vm["qos"] == {"cpu": "low", "read_iops_sec": 500, "write_iops_sec": 500,
                         "read_bytes_sec": None, "write_bytes_sec": 20 * 1024 ** 2,
                         "bandwidth_kbit": 10_000}
    code, out = await cli("vm", "set-qos", "q1", "--clear-iops", "--clear-bandwidth")
    assert code == 0, out
    qos = (await shown(cli, "vm", "show", "q1"))["qos"]
    assert (qos["read_iops_sec"], qos["write_iops_sec"], qos["bandwidth_kbit"]) == (
        None, None, None)
    assert (qos["cpu"], qos["write_bytes_sec"]) == ("low", 20 * 1024 ** 2)  # kept


async def test_bad_input_is_refused_and_changes_nothing(
        cli, cluster: SimCluster, small_qcow2: Path) -> None:  # type: ignore[no-untyped-def]
    before = await shown(cli, "pool", "list", "--all")
    code, out = await cli("pool", "create", "bad", "--cpu-ratio", "0")
    assert code == 1 and "cpu_ratio" in out, out
    code, out = await cli("pool", "create", "bad", "--weight", "cpu=x")
    assert code == 2 and "'x' is not a number" in out, out
    code, out = await cli("pool", "create", "bad", "--zone", "nowhere")
    assert code == 1 and "nowhere" in out, out
    assert await shown(cli, "pool", "list", "--all") == before

    code, out = await cli("image", "upload", str(small_qcow2), "--name", "base")
    assert code == 0, out
    code, out = await cli("vm", "create", "x1", "--image", "base", "--bandwidth", "10furlongs")
    assert code == 2 and "furlongs" in out, out
    code, out = await cli("vm", "create", "x1", "--image", "base", "--pool", "nosuch")
    assert code == 1 and "nosuch" in out, out
    code, out = await cli("vm", "create", "x1", "--image", "base", "--zone", "nowhere")
    assert code == 1 and "nowhere" in out, out
    await into_pool(cli, "node-0000", "default")
    # Bigger than any node (memory is not overcommitted by default), said per filter.
    code, out = await cli("vm", "create", "x1", "--image", "base", "--memory", "1048576")
    assert code == 1 and "pool default:" in out and "short of memory" in out, out
    assert (await shown(cli, "vm", "list", "-q", "name=x1"))["items"] == []

    # The API refuses the same as the CLI: a QoS level that does not exist.
    assert cluster.api is not None
    resp = await cluster.api.post("/api/v1/vms/x1/qos", json={"cpu": "turbo"})
    assert resp.status_code == 422


async def test_the_async_sdk_reads_and_writes_pools(cluster: SimCluster) -> None:
    assert cluster.gateway is not None
    async with AsyncClient(cluster.gateway.url, TokenAuth(cluster.token)) as client:
        zone = await client.zones.create(ZoneCreate(name="west"))
        pool = await client.pools.create(PoolCreate(name="silver", zone="west",
                                                    memory_ratio=1.5))
        assert (pool.zone_uuid, pool.memory_ratio) == (zone.uuid, 1.5)
        assert "silver" in [p.name async for p in client.pools.iterate()]
        group = await client.vm_groups.create(VmGroupCreate(name="g", policy=GroupPolicy.AFFINITY))
        assert (await client.vm_groups.get("g")).uuid == group.uuid
        node = await client.nodes.set_labels("node-0000", {"rack": "7"})
        assert node.labels == {"rack": "7"}
        await client.vm_groups.delete("g")
        await client.pools.delete("silver")
        await client.zones.delete("west")
