"""The control side's network modes: chosen by the pool's mode, what each asks of the
scheduler and the node, and how a VM's port is reached."""

from __future__ import annotations

import uuid

import pytest

from yun.control.db.models import PoolRow, VmNicRow, VmRow
from yun.control.flows.engine import FlowContext
from yun.control.flows.vm import placement_request
from yun.control.network.modes import mode_for
from yun.control.scheduler.placement import pool_policy
from yun.proto.errors import Conflict, Unprocessable
from yun.proto.network import Exposure, NicNetwork


def vm(**fields: object) -> VmRow:
    base: dict[str, object] = dict(
        uuid=str(uuid.uuid4()), name="web1", vcpus=1, memory_mb=64, disk_gb=1,
        pool_uuid="p", ip="10.64.3.10", mac="52:54:00:00:00:01", extra_ips=["10.64.3.11"],
        qos={}, node_labels={})
    base.update(fields)
    return VmRow(**base)


def test_each_pool_mode_has_its_class_and_unknown_is_refused() -> None:
    assert [mode_for(m).name for m in ("direct", "sandbox-private", "sandbox-mono",
                                       "sandbox-share")] == [
        "direct", "sandbox-private", "sandbox-mono", "sandbox-share"]
    assert mode_for(None).name == "sandbox-private"  # a VM without a pool
    with pytest.raises(Unprocessable, match="unknown network mode 'nat'"):
        mode_for("nat")


def test_sandbox_nics_carry_the_address_and_the_exposure() -> None:
    row = vm()
    extra = VmNicRow(uuid="x", vm_uuid=row.uuid, idx=1, mac="52:54:00:00:00:02",
                     ip="10.64.3.12")
    [primary, second] = mode_for("sandbox-mono").nic_specs(row, [extra], hostname="web1")
    assert (primary.network, primary.ip, primary.exposure, primary.extra_ips) == (
        NicNetwork.SANDBOX, "10.64.3.10", Exposure.MONO, ["10.64.3.11"])
    assert (second.mac, second.ip) == ("52:54:00:00:00:02", "10.64.3.12")
    assert primary.nic_id != second.nic_id
    with pytest.raises(Conflict, match="no sandbox address"):
        mode_for("sandbox-private").nic_specs(vm(ip=None))


def test_direct_nic_has_no_address_and_needs_a_direct_node() -> None:
    [nic] = mode_for("direct").nic_specs(vm(ip=None))
    assert (nic.network, nic.ip, nic.extra_ips) == (NicNetwork.DIRECT, None, [])
    ctx = FlowContext(flow_uuid="f", kind="vm.create", resource_uuid="v", data={},
                      services=None)
    req = placement_request(vm(qos={"bandwidth_kbit": 1000}), ctx)
    assert req.capabilities == frozenset({"qos_net"})  # the VM's own needs
    # What the network mode needs is its pool's policy, whichever way the VM got there.
    def needs(mode: str | None) -> frozenset[str]:
        return mode_for(mode).capabilities

    pool = PoolRow(uuid="p", name="lan", cpu_ratio=4.0, memory_ratio=1.0, disk_ratio=1.0,
                   filters=["status"], weights={}, network_mode="direct")
    assert pool_policy(pool, needs).needs == frozenset({"net_direct"})
    pool.network_mode = "sandbox-mono"
    assert pool_policy(pool, needs).needs == frozenset()


def test_how_a_port_is_reached_depends_on_the_mode() -> None:
    assert mode_for("sandbox-private").forward_kind() == "node"
    assert mode_for("sandbox-share").forward_kind() == "public"
    with pytest.raises(Conflict, match="own public address"):
        mode_for("sandbox-mono").forward_kind()
    with pytest.raises(Conflict, match="on the LAN itself"):
        mode_for("direct").forward_kind()
