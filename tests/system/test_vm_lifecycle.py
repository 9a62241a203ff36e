"""A real guest's whole life through every component (QEMU under TCG, in namespaces)."""

from __future__ import annotations

import pytest

from yun.testing.datacenter import DataCenter
from yun.util.run import run

pytestmark = pytest.mark.system


def node_leftovers(dc: DataCenter, vm: dict) -> list[str]:
    """Whatever of ``vm`` is still on its node: domain, QEMU, disk, tap, DHCP entry, rule."""
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
    if any(vm["uuid"] in str(p) for p in state.rglob("*")):
        found.append(f"files: {[str(p) for p in state.rglob('*') if vm['uuid'] in str(p)]}")
    links = node.run(["ip", "-o", "link"]).stdout
    if any(line.split(": ")[1].startswith("yv") for line in links.splitlines()):
        found.append("tap device")
    ruleset = node.run(["nft", "list", "ruleset"]).stdout
    if vm["ip"] and vm["ip"] in ruleset:
        found.append("nftables rule")
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

    resp = dc.api.delete(f"/api/v1/vms/{vm['uuid']}")
    assert dc.wait_task(resp.json()["task"]["uuid"])["state"] == "succeeded"
    assert dc.api.get(f"/api/v1/vms/{vm['uuid']}").status_code == 404
    assert node_leftovers(dc, vm) == []
    node = dc.node_of(vm)
    hosts_dir = dc.node_hosts[node.name].root / "yun" / "node" / "network"
    assert not any(vm["uuid"] in p.name for p in hosts_dir.rglob("*"))
