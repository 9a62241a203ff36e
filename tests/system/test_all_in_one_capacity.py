"""The all-in-one's capacity and QoS through the whole stack, on real TCG guests.

One deployment for the module (control plane + ONE node host, which sees this machine's
CPUs and memory), configured as ``yun aio`` configures its node (default pool, 2 GiB host
reserve). What a new user of the all-in-one meets first:

* the node reports the host's real memory (``/proc/meminfo`` MemTotal) and its reserve,
  and its vCPUs overcommitted by the default pool's ratio (2 cores -> 8 usable);
* eight 1-vCPU guests boot at once and all answer; a ninth is refused at once (409),
  naming the vCPU filter and the closest miss;
* ``set-qos`` (API and CLI) on a running guest reaches libvirt's live ``<cputune>`` and
  ``<iotune>`` and tc on the guest's tap; a create with ``bandwidth_kbit`` is shaped too.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from tests.system.conftest import need_root
from yun.testing.datacenter import DataCenter, deployed
from yun.testing.netns import Topology

pytestmark = pytest.mark.system

GUESTS = 8  # 2 cores x the default pool's vCPU ratio 4.0
GUEST_MEMORY_MB = 256
RESERVE_MB = 2048  # what `yun aio` writes as memory_reserve_mb in [node]
CREATE_BANDWIDTH_KBIT = 4000  # given at create to one guest




def meminfo_total_mb() -> int:
    """MemTotal of this machine, MiB (the node host shares the machine's kernel)."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) // 1024
    raise AssertionError("no MemTotal in /proc/meminfo")


@pytest.fixture(scope="module")
def aio() -> Iterator[DataCenter]:
    """The all-in-one-like deployment, with the guest image uploaded; removed after."""
    need_root("tc")
    with Topology() as topo, deployed(topo, node_options={"memory_reserve_mb": RESERVE_MB},
                                      prefix="yun-aio-") as dc:
        yield dc


def the_node(dc: DataCenter) -> dict[str, Any]:
    assert dc.api is not None
    nodes = dc.api.get("/api/v1/nodes").json()["items"]
    assert len(nodes) == 1, nodes
    return nodes[0]  # type: ignore[no-any-return]


def inventory(node: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {item["resource_class"]: item for item in node["inventory"]}


def domain_xml(dc: DataCenter, vm: dict[str, Any]) -> ET.Element:
    """The domain's live XML, read from the node's libvirtd."""
    import libvirt

    conn = libvirt.open(dc.node_hosts[vm["node_name"]].libvirt_uri)
    try:
        return ET.fromstring(conn.lookupByUUIDString(vm["uuid"]).XMLDesc(0))
    finally:
        conn.close()


def tap_of(dom: ET.Element) -> str:
    taps = [t.get("dev") for t in dom.findall("devices/interface/target")]
    assert len(taps) == 1 and taps[0], ET.tostring(dom, encoding="unicode")
    return str(taps[0])


_UNITS = {"bit": 1, "kbit": 1000, "mbit": 1000_000, "gbit": 1000_000_000}


def tbf_rates_kbit(dc: DataCenter, vm: dict[str, Any]) -> dict[str, float]:
    """The token bucket rate (kbit/s) of each shaped device of the VM's tap: the tap
    itself (towards the guest) and the ifb its ingress is redirected to (from it)."""
    node = dc.node_of(vm)
    tap = tap_of(domain_xml(dc, vm))
    rates: dict[str, float] = {}
    ingress = node.run(["tc", "filter", "show", "dev", tap, "parent", "ffff:"]).stdout
    redirect = re.search(r"Redirect to device (\S+)\)", ingress)
    devices = [tap] + ([redirect.group(1)] if redirect else [])
    for dev in devices:
        out = node.run(["tc", "qdisc", "show", "dev", dev, "root"]).stdout
        found = re.search(r"\btbf\b.*?\brate (\d+(?:\.\d+)?)([KMG]?bit)", out)
        if found:
            rates["tap" if dev == tap else "ifb"] = (
                float(found.group(1)) * _UNITS[found.group(2).lower()] / 1000)
    return rates


def cli(dc: DataCenter, *args: str) -> str:
    """Run the ``yun`` CLI against the deployment's gateway, as the admin."""
    assert dc.api is not None and dc.ctl is not None
    with tempfile.TemporaryDirectory() as home:
        env = {**os.environ, "YUN_API_URL": str(dc.api.base_url).rstrip("/"),
               "YUN_API_TOKEN": dc.token, "XDG_CONFIG_HOME": home, "HOME": home,
               "YUN_CONFIG": str(Path(home) / "none.toml"), "COLUMNS": "200"}
        proc = subprocess.run([sys.executable, "-m", "yun", *args], env=env,
                              capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, f"yun {' '.join(args)}: {proc.stdout}\n{proc.stderr}"
    return proc.stdout


def test_node_reports_real_memory_and_overcommitted_vcpus(aio: DataCenter) -> None:
    node = the_node(aio)
    real = meminfo_total_mb()
    # libvirt reads the same /proc/meminfo; the kernel's own figure may move by a few
    # MiB (ballooning, hot-plug), never by the GiBs of the NUMA-cell figure.
    assert abs(node["memory_mb"] - real) <= max(64, real // 100), (node["memory_mb"], real)
    inv = inventory(node)
    memory = inv["memory_mb"]
    assert memory["total"] == node["memory_mb"] and memory["reserved"] == RESERVE_MB
    assert memory["ratio"] == 1.0 and memory["usable"] == memory["total"] - RESERVE_MB
    cpus = os.cpu_count() or 0
    vcpu = inv["vcpu"]
    assert vcpu["total"] == cpus == node["vcpus"], (vcpu, cpus)
    assert vcpu["ratio"] == 4.0 and vcpu["usable"] == 4 * cpus
    assert node["pool_name"] == "default"


def test_eight_guests_at_once_a_ninth_refused_then_qos(aio: DataCenter) -> None:
    dc = aio
    assert dc.api is not None
    assert os.cpu_count() == 2, "eight 1-vCPU guests fill exactly 2 cores at ratio 4.0"
    # All eight asked for before any is placed: they are provisioned side by side.
    accepted = []
    for i in range(GUESTS):
        extra = {"bandwidth_kbit": CREATE_BANDWIDTH_KBIT} if i == GUESTS - 1 else {}
        resp = dc.api.post("/api/v1/vms", json={
            "name": f"aio{i}", "image": "guest", "vcpus": 1,
            "memory_mb": GUEST_MEMORY_MB, **extra})
        assert resp.status_code == 202, resp.text
        accepted.append(resp.json())
    vms: list[dict[str, Any]] = []
    try:
        for answer in accepted:
            task = dc.wait_task(answer["task"]["uuid"])
            assert task["state"] == "succeeded", (task["error"], dc.logs())
            vms.append(dc.api.get(f"/api/v1/vms/{answer['resource']['uuid']}").json())
        assert all(vm["state"] == "running" and vm["ip"] for vm in vms), vms
        assert len({vm["ip"] for vm in vms}) == GUESTS

        # Every guest booted and answers over its own network, checked in parallel.
        def answers(vm: dict[str, Any]) -> dict[str, str]:
            dc.wait_console(vm["uuid"], "YUN-GUEST-READY", timeout=300)
            return dc.guest_http(vm, timeout=120)

        with ThreadPoolExecutor(GUESTS) as pool:
            pages = list(pool.map(answers, vms))
        assert [p.get("hostname") for p in pages] == [vm["name"] for vm in vms]

        node = the_node(dc)
        vcpu = inventory(node)["vcpu"]
        assert (vcpu["used"], vcpu["free"]) == (GUESTS, 0), vcpu
        assert inventory(node)["memory_mb"]["used"] == GUESTS * GUEST_MEMORY_MB

        # The ninth: refused at once, saying which filter and how close the best node was.
        resp = dc.api.post("/api/v1/vms", json={"name": "aio-ninth", "image": "guest",
                                                "vcpus": 1, "memory_mb": GUEST_MEMORY_MB})
        assert resp.status_code == 409, resp.text
        detail = resp.json()["detail"]
        assert "pool default: 1 node" in detail, detail
        assert "1 short of vCPU (best: 0 free of 1 needed)" in detail, detail
        names = [vm["name"] for vm in dc.api.get("/api/v1/vms").json()["items"]]
        assert "aio-ninth" not in names and len(names) == GUESTS

        _set_qos_through_api(dc, vms[0])
        _set_qos_through_cli(dc, vms[1])
        # Given at create: the guest's tap is shaped both ways from its first boot.
        shaped = vms[-1]
        assert shaped["qos"]["bandwidth_kbit"] == CREATE_BANDWIDTH_KBIT
        assert tbf_rates_kbit(dc, shaped) == {"tap": CREATE_BANDWIDTH_KBIT,
                                              "ifb": CREATE_BANDWIDTH_KBIT}
        # And the others are not: no limit asked, none applied.
        assert tbf_rates_kbit(dc, vms[2]) == {}
    finally:
        _delete_all(dc, [a["resource"]["uuid"] for a in accepted])


def _set_qos_through_api(dc: DataCenter, vm: dict[str, Any]) -> None:
    """cpu low, a write IOPS limit and a bandwidth limit on a running guest, by the API:
    the VM shows them and the node's live domain and tap carry them."""
    assert dc.api is not None
    before = domain_xml(dc, vm)
    assert before.find("devices/disk/iotune/write_iops_sec") is None
    resp = dc.api.post(f"/api/v1/vms/{vm['uuid']}/qos", json={
        "cpu": "low", "write_iops_sec": 50, "bandwidth_kbit": 10_000})
    assert resp.status_code == 202, resp.text
    task = dc.wait_task(resp.json()["task"]["uuid"])
    assert task["state"] == "succeeded", task["error"]
    shown = dc.api.get(f"/api/v1/vms/{vm['uuid']}").json()
    assert shown["state"] == "running"
    assert shown["qos"] == {"cpu": "low", "read_iops_sec": None, "write_iops_sec": 50,
                            "read_bytes_sec": None, "write_bytes_sec": None,
                            "bandwidth_kbit": 10_000}, shown["qos"]

    dom = domain_xml(dc, vm)
    period = int(dom.findtext("cputune/period") or 0)
    quota = int(dom.findtext("cputune/quota") or 0)
    shares = int(dom.findtext("cputune/shares") or 0)
    assert period > 0 and quota == round(period * 0.30), (period, quota)  # low: 30 %
    shares_before = int(before.findtext("cputune/shares") or 0)  # the pool's medium
    assert shares_before == 2 * shares, (shares_before, shares)  # medium:low = 2:1
    assert int(before.findtext("cputune/quota") or 0) == round(period * 0.50)
    iotune = [d.find("iotune") for d in dom.findall("devices/disk")
              if d.get("device") == "disk"]
    assert iotune and all(t is not None and t.findtext("write_iops_sec") == "50"
                          and t.find("read_iops_sec") is None for t in iotune), \
        ET.tostring(dom, encoding="unicode")
    assert tbf_rates_kbit(dc, vm) == {"tap": 10_000, "ifb": 10_000}


def _set_qos_through_cli(dc: DataCenter, vm: dict[str, Any]) -> None:
    """``yun vm set-qos NAME --cpu high --iops 500 --bandwidth 10mbit``, then
    ``yun vm show`` lists the effective limits."""
    cli(dc, "vm", "set-qos", vm["name"], "--cpu", "high", "--iops", "500",
        "--bandwidth", "10mbit")
    table = cli(dc, "vm", "show", vm["name"])
    rows = {m.group(1).strip(): m.group(2).strip()
            for m in re.finditer(r"^\W*(qos [a-z /]+?)\W{2,}(\S+)", table, re.M)}
    assert rows.get("qos cpu") == "high" and rows.get("qos read iops") == "500" \
        and rows.get("qos write iops") == "500", table
    assert "10" in rows.get("qos bandwidth", "") and "unlimited" == rows.get(
        "qos write bytes/s"), table
    dom = domain_xml(dc, vm)
    period = int(dom.findtext("cputune/period") or 0)
    assert int(dom.findtext("cputune/quota") or 0) == period  # high: the whole core
    tune = dom.find("devices/disk/iotune")
    assert tune is not None and tune.findtext("read_iops_sec") == "500" \
        and tune.findtext("write_iops_sec") == "500", ET.tostring(dom, encoding="unicode")
    assert tbf_rates_kbit(dc, vm) == {"tap": 10_000, "ifb": 10_000}


def _delete_all(dc: DataCenter, uuids: list[str]) -> None:
    """Delete the VMs (all asked for first, then waited on) and check the node is empty."""
    assert dc.api is not None
    tasks = []
    for uuid in uuids:
        resp = dc.api.delete(f"/api/v1/vms/{uuid}")
        if resp.status_code == 202:
            tasks.append(resp.json()["task"]["uuid"])
    states = [dc.wait_task(t)["state"] for t in tasks]
    assert states == ["succeeded"] * len(tasks), states
    assert dc.api.get("/api/v1/vms").json()["items"] == []
    import libvirt

    conn = libvirt.open(next(iter(dc.node_hosts.values())).libvirt_uri)
    try:
        assert conn.listAllDomains() == []
    finally:
        conn.close()
