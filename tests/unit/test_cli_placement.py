"""The CLI of pools, zones, VM groups, node labels and QoS: its parsers of rates, labels
and weights, what each command sends, and that bad input is refused before any request.
The API is an httpx.MockTransport (see test_cli_output): the CLI's side is under test."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
import typer

from tests.unit.test_cli_output import NOW, TASK, VM, Api, ok, yun
from tests.unit.test_cli_output import api as cli_api  # noqa: F401  (a fixture)
from tests.unit.test_client_calls import FakeApi
from yun.cli.parsing import (
    format_bytes,
    format_kbit,
    parse_bandwidth,
    parse_byte_rate,
    parse_label,
    parse_weight,
)
from yun.client import AsyncClient, InvalidReference
from yun.proto.messages import CpuQos
from yun.proto.resources import Task, TaskState, VmQosUpdate

POOL: dict[str, Any] = {
    "uuid": "pl1", "name": "gold", "description": "", "tags": {}, "created_at": NOW,
    "updated_at": NOW, "zone_uuid": "z1", "zone_name": "east", "network_mode": "direct",
    "storage_mode": "local", "thin": True, "backing": False, "ha": False, "address_pool": None,
    "qos_level": "high", "cpu_ratio": 4.0, "memory_ratio": 1.0, "disk_ratio": 1.0,
    "filters": ["pool", "capacity"], "weights": {"cpu": 1.0}, "node_count": 2, "vm_count": 3,
    "capacity": [{"resource_class": "vcpu", "usable": 16, "used": 3, "free": 13}],
    "warnings": ["node n2 is down"]}
NODE: dict[str, Any] = {
    "uuid": "n1", "name": "node-1", "description": "", "tags": {}, "created_at": NOW,
    "updated_at": NOW, "url": "http://n1", "status": "up", "admin_state": "active",
    "pool_uuid": "pl1", "pool_name": "gold", "labels": {"ssd": "true", "rack": "4"},
    "hypervisor": "sim", "accel": "tcg", "vcpus": 4, "memory_mb": 8192, "disk_gb": 100,
    "vcpus_reserved": 0, "memory_reserved_mb": 0, "disk_reserved_gb": 0, "cpu_load": 0.0,
    "memory_used_mb": 0, "sandbox_subnet": "10.77.0.0/24"}


@pytest.fixture
def api(cli_api: Api) -> Api:  # noqa: F811
    """The fake API of test_cli_output, under the name these tests use."""
    return cli_api


def sent(api: Api, index: int = -1) -> Any:
    return json.loads(api.requests[index].content)


# --- parsers ----------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "kbit"), [
    ("10mbit", 10_000), ("500kbit", 500), ("1gbit", 1_000_000), ("1.5mbit", 1_500),
    ("10Mbit/s", 10_000), ("8000bit", 8), (" 2 GBIT ", 2_000_000)])
def test_bandwidth_units_become_kbit(text: str, kbit: int) -> None:
    assert parse_bandwidth(text) == kbit


@pytest.mark.parametrize(("text", "says"), [
    ("10furlongs", "unknown unit 'furlongs'; use kbit, mbit or gbit"),
    ("10", "no unit"),
    ("10mbps", "ambiguous"),
    ("10MB", "bits"),
    ("0.5kbit", "whole number"),
    ("4kbit", "smallest limit, 8kbit"),
    ("fast", "not a bandwidth"),
    ("-10mbit", "not a bandwidth"),
    ("", "not a bandwidth")])
def test_bad_bandwidths_say_what_is_wrong(text: str, says: str) -> None:
    with pytest.raises(typer.BadParameter) as caught:
        parse_bandwidth(text)
    assert says in str(caught.value)


@pytest.mark.parametrize(("text", "rate"), [
    ("4096", 4096), ("20MiB", 20 * 1024 ** 2), ("50MB", 50_000_000), ("1.5GB/s", 1_500_000_000),
    ("8KiB", 8192), ("1g", 1_000_000_000)])
def test_byte_rates(text: str, rate: int) -> None:
    assert parse_byte_rate(text) == rate


@pytest.mark.parametrize(("text", "says"), [
    ("100", "smallest limit, 4096"), ("10furlongs", "unknown unit 'furlongs'"),
    ("1.5", "whole number"), ("lots", "not a rate")])
def test_bad_byte_rates(text: str, says: str) -> None:
    with pytest.raises(typer.BadParameter) as caught:
        parse_byte_rate(text)
    assert says in str(caught.value)


def test_labels() -> None:
    assert (parse_label("ssd=true").key, parse_label("ssd=true").value) == ("ssd", "true")
    assert parse_label("zone/rack=").value == ""
    for bad, says in (("ssd", "KEY=VALUE"), ("=x", "label key"), ("-ssd=1", "label key"),
                      ("a b=1", "label key"), ("k=" + "v" * 64, "at most 63")):
        with pytest.raises(typer.BadParameter) as caught:
            parse_label(bad)
        assert says in str(caught.value), bad


def test_weights() -> None:
    assert (parse_weight("cpu=2").name, parse_weight("cpu=2").weight) == ("cpu", 2.0)
    assert parse_weight("net=0.5").weight == 0.5
    for bad, says in (("cpu=x", "'x' is not a number"), ("cpu", "NAME=WEIGHT"),
                      ("=2", "NAME=WEIGHT"), ("cpu=101", "from 0 to 100"),
                      ("cpu=-1", "from 0 to 100"), ("cpu=nan", "from 0 to 100"),
                      ("cpu=inf", "from 0 to 100")):
        with pytest.raises(typer.BadParameter) as caught:
            parse_weight(bad)
        assert says in str(caught.value), bad


def test_rates_are_shown_with_units() -> None:
    assert format_kbit(10_000) == "10 Mbit/s"
    assert format_kbit(1_000_000) == "1 Gbit/s"
    assert format_kbit(1_500) == "1500 kbit/s"
    assert format_kbit(None) == "unlimited"
    assert format_bytes(20 * 1024 ** 2) == "20 MiB/s"
    assert format_bytes(50_000_000) == "50 MB/s"
    assert format_bytes(4097) == "4097 B/s"


# --- bad input never reaches the API ----------------------------------------------------


@pytest.mark.parametrize(("args", "says"), [
    (("vm", "create", "w", "--image", "deb", "--bandwidth", "10furlongs"),
     ["--bandwidth", "furlongs"]),
    (("vm", "create", "w", "--image", "deb", "--node-label", "ssd"), ["--node-label"]),
    (("vm", "create", "w", "--image", "deb", "--pool", "p", "--zone", "z"), ["not both"]),
    (("pool", "create", "p1", "--weight", "cpu=x"), ["--weight", "'x' is not a number"]),
    (("pool", "create", "p1", "--network-mode", "bridge"), ["--network-mode", "bridge"]),
    (("pool", "create", "p1", "--qos-level", "urgent"), ["--qos-level", "urgent"]),
    (("pool", "create", "p1", "--cpu-ratio", "-1"), ["cpu_ratio", "greater than 0"]),
    (("pool", "create", "p1", "--memory-ratio", "1000"), ["memory_ratio", "64"]),
    (("pool", "update", "p1"), ["at least one field"]),
    (("vm", "set-qos", "w"), ["at least one change"]),
    (("vm", "set-qos", "w", "--cpu", "turbo"), ["--cpu", "turbo"]),
    (("vm", "set-qos", "w", "--iops", "0"), ["--iops"]),
    (("vm", "set-qos", "w", "--iops", "5", "--clear-iops"), ["contradictory", "--clear-iops"]),
    (("vm", "set-qos", "w", "--iops", "5", "--read-iops", "6"), ["--iops sets both"]),
    (("vm", "set-qos", "w", "--read-bps", "1k"), ["--read-bps", "4096"]),
    (("vm-group", "create", "g", "--policy", "spread"), ["--policy", "spread"]),
    (("node", "label", "n1"), ["KEY=VALUE or KEY-"]),
    (("node", "label", "n1", "ssd=1", "ssd-"), ["both set and removed"]),
    (("zone", "update", "z1"), ["--description"]),
])
def test_bad_input_is_refused_before_any_request(api: Api, args: tuple[str, ...],
                                                 says: list[str]) -> None:
    result = yun(*args)
    assert result.exit_code != 0
    for words in says:
        assert words in result.output, (words, result.output)
    assert api.requests == []


# --- what the commands send -------------------------------------------------------------


def test_pool_create_sends_every_template_option(api: Api) -> None:
    api.routes[("POST", "/pools")] = httpx.Response(201, json=POOL)
    ok("pool", "create", "gold", "--zone", "east", "--network-mode", "sandbox-private",
       "--storage-mode", "shared", "--thick", "--ha", "--address-pool", "ap1",
       "--qos-level", "HIGH", "--cpu-ratio", "4", "--memory-ratio", "1.5",
       "--disk-ratio", "2", "--filter", "pool", "--filter", "capacity",
       "--weight", "cpu=2", "--weight", "memory=0.5", "--description", "fast",
       "--tag", "tier=1")
    assert sent(api) == {
        "name": "gold", "tags": {"tier": "1"}, "zone": "east", "description": "fast",
        "network_mode": "sandbox-private", "storage_mode": "shared", "thin": False,
        "ha": True, "address_pool": "ap1", "qos_level": "high", "cpu_ratio": 4.0,
        "memory_ratio": 1.5, "disk_ratio": 2.0, "filters": ["pool", "capacity"],
        "weights": {"cpu": 2.0, "memory": 0.5}}


def test_pool_create_sends_only_what_was_given(api: Api) -> None:
    api.routes[("POST", "/pools")] = httpx.Response(201, json=POOL)
    ok("pool", "create", "gold")
    assert sent(api) == {"name": "gold", "tags": {}}


def test_pool_update_sends_only_the_changes(api: Api) -> None:
    api.routes[("PATCH", "/pools/gold")] = POOL
    ok("pool", "update", "gold", "--cpu-ratio", "8", "--no-ha")
    assert sent(api) == {"cpu_ratio": 8.0, "ha": False}


def test_pool_show_has_capacity_and_warnings(api: Api) -> None:
    api.routes[("GET", "/pools/gold")] = POOL
    out = ok("pool", "show", "gold").stdout
    assert "capacity" in out and "vcpu" in out and "13" in out
    assert "node n2 is down" in out and "east" in out
    assert json.loads(ok("pool", "show", "gold", "-o", "json").stdout) == POOL


def test_pool_list(api: Api) -> None:
    api.routes[("GET", "/pools")] = {"items": [POOL], "limit": 100}
    out = ok("pool", "list").stdout
    assert "gold" in out and "east" in out


@pytest.mark.parametrize(("command", "method", "path"), [
    ("add-node", "POST", "/pools/gold/nodes"),
    ("drain-node", "POST", "/pools/gold/nodes/node-1/drain"),
    ("enable-node", "POST", "/pools/gold/nodes/node-1/enable"),
    ("remove-node", "DELETE", "/pools/gold/nodes/node-1"),
])
def test_pool_node_membership(api: Api, command: str, method: str, path: str) -> None:
    api.routes[(method, path)] = NODE
    result = ok("pool", command, "gold", "node-1", "--idempotency-key", "k1")
    assert "node-1" in result.stdout and "node node-1" in result.stderr
    request = api.requests[-1]
    assert (request.method, request.url.path) == (method, "/api/v1" + path)
    assert request.headers["Idempotency-Key"] == "k1"
    if command == "add-node":
        assert sent(api) == {"node": "node-1"}


def test_zone_commands(api: Api) -> None:
    zone = {"uuid": "z1", "name": "east", "description": "", "tags": {}, "created_at": NOW,
            "updated_at": NOW, "pool_count": 1}
    api.routes[("POST", "/zones")] = httpx.Response(201, json=zone)
    api.routes[("PATCH", "/zones/east")] = zone
    api.routes[("DELETE", "/zones/east")] = httpx.Response(204)
    api.routes[("GET", "/zones")] = {"items": [zone], "limit": 100}
    ok("zone", "create", "east", "--description", "rack 4")
    assert sent(api) == {"name": "east", "description": "rack 4", "tags": {}}
    ok("zone", "update", "east", "--description", "rack 5")
    assert sent(api) == {"description": "rack 5"}
    assert "east" in ok("zone", "list").stdout
    assert "zone east deleted" in ok("zone", "delete", "east").stderr


def test_vm_group_create(api: Api) -> None:
    group = {"uuid": "g1", "name": "web", "description": "", "tags": {}, "created_at": NOW,
             "updated_at": NOW, "policy": "anti-affinity", "members": []}
    api.routes[("POST", "/vm-groups")] = httpx.Response(201, json=group)
    ok("vm-group", "create", "web", "--policy", "anti-affinity")
    assert sent(api) == {"name": "web", "policy": "anti-affinity", "description": "",
                         "tags": {}}


def test_vm_create_sends_the_placement(api: Api) -> None:
    api.routes[("POST", "/vms")] = httpx.Response(202, json={"task": TASK, "resource": VM})
    ok("vm", "create", "web1", "--image", "deb", "--pool", "gold", "--group", "web",
       "--node-label", "ssd=true", "--node-label", "rack=4", "--bandwidth", "10mbit",
       "--no-wait")
    body = sent(api)
    assert {k: body[k] for k in ("pool", "group", "node_labels", "bandwidth_kbit")} == {
        "pool": "gold", "group": "web", "node_labels": {"ssd": "true", "rack": "4"},
        "bandwidth_kbit": 10_000}
    assert "zone" not in body


def test_set_qos_sends_the_change_and_shows_the_limits(api: Api) -> None:
    limited = dict(VM, qos={"cpu": "high", "read_iops_sec": 500, "write_iops_sec": 500,
                            "read_bytes_sec": None, "write_bytes_sec": 20 * 1024 ** 2,
                            "bandwidth_kbit": 10_000})
    api.routes[("POST", "/vms/web1/qos")] = httpx.Response(202, json={"task": TASK,
                                                                      "resource": VM})
    api.routes[("GET", "/tasks/t1")] = dict(TASK, state="succeeded")
    api.routes[("GET", "/vms/web1")] = limited
    result = ok("vm", "set-qos", "web1", "--cpu", "high", "--iops", "500",
                "--write-bps", "20MiB", "--bandwidth", "10mbit")
    assert "set-qos web1: done" in result.stderr
    assert sent(api, 0) == {"cpu": "high", "read_iops_sec": 500, "write_iops_sec": 500,
                            "write_bytes_sec": 20 * 1024 ** 2, "bandwidth_kbit": 10_000}
    out = result.stdout
    assert "10 Mbit/s" in out and "20 MiB/s" in out and "unlimited" in out
    assert "default" in out  # the pool


def test_set_qos_clears(api: Api) -> None:
    api.routes[("POST", "/vms/web1/qos")] = {"task": None, "resource": VM,
                                             "message": "nothing to change"}
    api.routes[("GET", "/vms/web1")] = VM
    result = ok("vm", "set-qos", "web1", "--clear-iops", "--clear-bps", "--clear-bandwidth")
    assert sent(api, 0) == {"clear": ["read_iops_sec", "write_iops_sec", "read_bytes_sec",
                                      "write_bytes_sec", "bandwidth_kbit"]}
    assert "nothing to change" in result.stderr


def test_vm_show_spells_out_pool_and_qos(api: Api) -> None:
    api.routes[("GET", "/vms/web1")] = VM
    out = ok("vm", "show", "web1").stdout
    assert "pool_name" in out and "default" in out
    assert "qos cpu" in out and "medium" in out and "qos bandwidth" in out
    assert out.count("unlimited") == 5


def test_node_label_merges_and_removes(api: Api) -> None:
    api.routes[("GET", "/nodes/node-1")] = NODE
    api.routes[("PUT", "/nodes/node-1/labels")] = lambda r: dict(
        NODE, labels=json.loads(r.content)["labels"])
    result = ok("node", "label", "node-1", "gpu=a100", "rack-")
    assert sent(api) == {"labels": {"ssd": "true", "gpu": "a100"}}
    assert "ssd=true, gpu=a100" in result.stderr
    ok("node", "label", "node-1", "--replace", "ssd=false")
    assert sent(api) == {"labels": {"ssd": "false"}}
    assert api.requests[-2].method == "PUT"  # --replace does not read the node first


# --- the SDK underneath, both clients -------------------------------------------------


def test_sdk_pool_node_paths_are_quoted_segments() -> None:
    fake = FakeApi({("POST", "/pools/gold/nodes/node.1/drain"): NODE,
                    ("DELETE", "/pools/gold/nodes/node.1"): NODE,
                    ("POST", "/pools/gold/nodes/a/drain/enable"): NODE})  # decoded path
    client = fake.client()
    assert client.pools.drain_node("gold", "node.1").name == "node-1"
    client.pools.remove_node("gold", "node.1", idempotency_key="k")
    assert fake.requests[-1].headers["Idempotency-Key"] == "k"
    with pytest.raises(InvalidReference):
        client.pools.drain_node("gold", "..")
    # A '/' in a name stays inside its segment instead of reaching another route.
    client.pools.enable_node("gold", "a/drain")
    assert fake.requests[-1].url.raw_path == b"/api/v1/pools/gold/nodes/a%2Fdrain/enable"


async def test_async_sdk_set_qos_follows_the_task_and_set_labels_replaces() -> None:
    polls = iter(["running", "succeeded"])
    fake = FakeApi({
        ("POST", "/vms/web1/qos"): httpx.Response(202, json={"task": TASK, "resource": VM}),
        ("GET", "/tasks/t1"): lambda r: dict(TASK, state=next(polls)),
        ("PUT", "/nodes/node-1/labels"): NODE})
    async with AsyncClient("http://gw", transport=httpx.MockTransport(fake)) as client:
        done = await client.vms.set_qos("web1", VmQosUpdate(cpu=CpuQos.LOW), wait=30)
        assert isinstance(done, Task) and done.state == TaskState.SUCCEEDED
        assert json.loads(fake.requests[0].content) == {"cpu": "low"}
        await client.nodes.set_labels("node-1", {"ssd": "true"})
        assert json.loads(fake.requests[-1].content) == {"labels": {"ssd": "true"}}
