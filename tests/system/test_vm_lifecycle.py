"""A real guest's whole life through every component (QEMU under TCG, in namespaces)."""

from __future__ import annotations

import ipaddress
import json
import stat
from pathlib import Path
from typing import Any

import pytest

from yun.node.network.nft import FAMILY, TABLE
from yun.testing.console import serial_console  # noqa: F401  (imported from here by sibling tests)
from yun.testing.datacenter import DataCenter
from yun.testing.netns import Host
from yun.util.run import run

pytestmark = pytest.mark.system



def sandbox_dir(dc: DataCenter, node_name: str) -> Path:
    """The node agent's sandbox network state (settings, hosts, leases)."""
    return dc.node_hosts[node_name].root / "yun" / "node" / "network"


def sandbox_table(node: Host) -> dict[str, Any] | None:
    """The node's ``inet yun_sandbox`` table as nft lists it (JSON), None without it."""
    done = node.run(["nft", "-j", "list", "table", FAMILY, TABLE], check=False)
    if done.returncode != 0:
        return None
    return json.loads(done.stdout)  # type: ignore[no-any-return]


def set_elements(table: dict[str, Any]) -> list[str]:
    """Every element of every set of the table, flattened to text."""
    return [json.dumps(item["set"].get("elem", [])) for item in table["nftables"]
            if "set" in item]


def assert_guest_on_the_sandbox(dc: DataCenter, vm: dict[str, Any]) -> None:
    """The VM's address is in its node's sandbox subnet, dnsmasq leased it to the VM's
    MAC, the tap holding it is a routed ``ys*`` tap with a /32 route, and the table
    yun_sandbox allows the tap to send from that address."""
    node = dc.node_of(vm)
    state = sandbox_dir(dc, node.name)
    settings = json.loads((state / "settings.json").read_text())
    subnet = ipaddress.IPv4Network(settings["subnet"])
    assert ipaddress.IPv4Address(vm["ip"]) in subnet, (vm["ip"], settings)
    assert str(subnet).startswith("10.") and subnet.subnet_of(
        ipaddress.IPv4Network("10.64.0.0/10")), settings
    leases = (state / "dnsmasq.leases").read_text()
    assert any(line.split()[2] == vm["ip"] for line in leases.splitlines()), leases
    route = node.run(["ip", "-j", "-4", "route", "show", f"{vm['ip']}/32"]).stdout
    devs = [r["dev"] for r in json.loads(route or "[]")]
    assert len(devs) == 1 and devs[0].startswith("ys"), route
    table = sandbox_table(node)
    assert table is not None
    assert any(vm["ip"] in e and devs[0] in e for e in set_elements(table)), table


def node_network_leftovers(dc: DataCenter, vm: dict[str, Any]) -> list[str]:
    """What of the VM's sandbox port is still on its node: tap, lease, route, element."""
    node = dc.node_of(vm)
    state = sandbox_dir(dc, node.name)
    found = []
    links = node.run(["ip", "-o", "link"]).stdout
    taps = [line.split(": ")[1].split("@")[0] for line in links.splitlines()
            if line.split(": ")[1].startswith("ys")]
    if taps:
        found.append(f"taps {taps}")
    lease_file = state / "dnsmasq.leases"
    if lease_file.exists() and vm["ip"] in lease_file.read_text():
        found.append("lease")
    if vm["ip"] in node.run(["ip", "-4", "route", "show", "table", "all"]).stdout:
        found.append("route")
    table = sandbox_table(node)
    if table is not None and any(vm["ip"] in e for e in set_elements(table)):
        found.append("set element")
    if any(vm["uuid"] in p.name for p in state.rglob("*")):
        found.append("files")
    return found


def volume_ids(dc: DataCenter, vm: dict[str, Any]) -> list[str]:
    """The ids of the VM's volumes, as the API lists them."""
    assert dc.api is not None
    page = dc.api.get("/api/v1/volumes", params={"q": f"vm_uuid={vm['uuid']}"}).json()
    return [v["uuid"] for v in page["items"]]


def assert_disks_private(dc: DataCenter, vm: dict[str, Any]) -> None:
    """The VM's root volume, its cloud-init seed and the cached image under the volume:
    0600, in 0700 directories, and (as the guest booted) readable by QEMU through libvirt
    all the same."""
    disks = dc.node_hosts[vm["node_name"]].root / "yun" / "node" / "disks"
    [root] = volume_ids(dc, vm)
    files = [disks / "volumes" / f"{root}.qcow2", disks / "vms" / vm["uuid"] / "cidata.iso",
             *disks.glob("images/*.qcow2")]
    assert len(files) >= 3 and all(path.is_file() for path in files), files
    for path in files:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    for directory in (disks, disks / "images", disks / "volumes", disks / "vms",
                      disks / "vms" / vm["uuid"]):
        assert stat.S_IMODE(directory.stat().st_mode) == 0o700, directory


def node_leftovers(dc: DataCenter, vm: dict, volumes: list[str]) -> list[str]:
    """Whatever of ``vm`` is still on its node: domain, QEMU, volumes, files, tap, DHCP
    entry, rule."""
    node = dc.node_of(vm)
    node_host = dc.node_hosts[node.name]
    found = []
    domains = run(["virsh", "-c", node_host.libvirt_uri, "list", "--all", "--uuid"]).stdout
    if vm["uuid"] in domains:
        found.append("libvirt domain")
    qemu = run(["pgrep", "-af", "qemu-system"], check=False).stdout
    if vm["uuid"] in qemu:
        found.append("QEMU process")
    state = node_host.root / "yun" / "node"
    names = [vm["uuid"], *volumes]
    left = [str(p) for p in state.rglob("*") if any(name in str(p) for name in names)]
    if left:
        found.append(f"files: {left}")
    links = node.run(["ip", "-o", "link"]).stdout
    if any(line.split(": ")[1].startswith("ys") for line in links.splitlines()):
        found.append("tap device")
    return found


def test_full_lifecycle_on_a_real_guest(datacenter_factory) -> None:  # type: ignore[no-untyped-def]
    dc: DataCenter = datacenter_factory(nodes=1)
    assert dc.api is not None
    image = dc.upload_guest_image()
    assert image["status"] == "active" and image["format"] == "qcow2"

    vm = dc.create_vm("life")
    assert vm["state"] == "running" and vm["ip"]
    dc.wait_console(vm["uuid"], "YUN-GUEST-READY")
    page = dc.guest_http(vm)
    assert page["boots"] == "1"
    assert page["hostname"] == "life"  # the VM's name, offered by the node's DHCP
    token = page["token"]
    assert_disks_private(dc, vm)
    volumes = volume_ids(dc, vm)
    console = dc.api.get(f"/api/v1/vms/{vm['uuid']}/console").json()
    assert console["vnc_port"] and console["vnc_port"] >= 5900

    resp = dc.api.post(f"/api/v1/vms/{vm['uuid']}/stop", json={"timeout": 60})
    assert dc.wait_task(resp.json()["task"]["uuid"])["state"] == "succeeded"
    stopped = dc.api.get(f"/api/v1/vms/{vm['uuid']}").json()
    assert stopped["state"] == "stopped"
    # A graceful stop: the guest saw the ACPI power button and halted cleanly.
    assert "YUN-GUEST-HALTED" in dc.api.get(f"/api/v1/vms/{vm['uuid']}/console-log").text

    resp = dc.api.post(f"/api/v1/vms/{vm['uuid']}/start")
    assert dc.wait_task(resp.json()["task"]["uuid"])["state"] == "succeeded"
    dc.wait_console(vm["uuid"], "YUN-GUEST-READY", count=2)
    page = dc.guest_http(vm)
    assert page["boots"] == "2" and page["token"] == token  # what it wrote is still there

    resp = dc.api.post(f"/api/v1/vms/{vm['uuid']}/reboot")
    assert dc.wait_task(resp.json()["task"]["uuid"])["state"] == "succeeded"
    dc.wait_console(vm["uuid"], "YUN-GUEST-READY", count=3)
    page = dc.guest_http(vm)
    assert page["boots"] == "3" and page["token"] == token
    assert_guest_on_the_sandbox(dc, vm)

    resp = dc.api.delete(f"/api/v1/vms/{vm['uuid']}")
    assert dc.wait_task(resp.json()["task"]["uuid"])["state"] == "succeeded"
    assert dc.api.get(f"/api/v1/vms/{vm['uuid']}").status_code == 404
    assert node_leftovers(dc, vm, volumes) == []
    assert node_network_leftovers(dc, vm) == []
    assert sandbox_table(dc.node_of(vm)) is not None  # the node's network stays
