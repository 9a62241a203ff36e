"""A real guest's whole life through every component (QEMU under TCG, in namespaces)."""

from __future__ import annotations

import contextlib
import ipaddress
import json
import re
import secrets
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.system.test_nat_network import _WHOAMI
from yun.node.network.nft import table_name
from yun.testing.datacenter import DataCenter
from yun.testing.netns import Host
from yun.testing.nodehost import NodeHost
from yun.util.run import run

pytestmark = pytest.mark.system

BRIDGE = "yunbr0"  # the node's default NAT bridge
WHOAMI_PORT = 8080


def masquerade_rules(node: Host) -> list[dict[str, Any]]:
    """The node's masquerade rules, as nft lists them (JSON)."""
    ruleset = json.loads(node.run(["nft", "-j", "list", "ruleset"]).stdout)["nftables"]
    return [item["rule"] for item in ruleset
            if "rule" in item and item["rule"]["table"] == table_name(BRIDGE)
            and any("masquerade" in e for e in item["rule"]["expr"])]


def masqueraded_source(rule: dict[str, Any]) -> ipaddress.IPv4Network | None:
    """The source prefix a masquerade rule matches (``ip saddr S``), if any."""
    for expr in rule["expr"]:
        match = expr.get("match", {})
        if match.get("left") == {"payload": {"protocol": "ip", "field": "saddr"}} \
                and match.get("op") == "==" and "prefix" in match.get("right", {}):
            prefix = match["right"]["prefix"]
            return ipaddress.IPv4Network(f"{prefix['addr']}/{prefix['len']}")
    return None


@contextlib.contextmanager
def serial_console(node_host: NodeHost, vm_uuid: str) -> Iterator[Callable[[str], None]]:
    """A function typing a line on the guest's serial console (a root shell in the test
    guest). The console stays open meanwhile: QEMU notices a newly opened pty only on
    its next poll (about a second), and what was typed into a pty closed before is lost."""
    import libvirt

    conn = libvirt.open(node_host.libvirt_uri)
    stream = conn.newStream(0)
    try:
        conn.lookupByUUIDString(vm_uuid).openConsole(None, stream,
                                                     libvirt.VIR_DOMAIN_CONSOLE_FORCE)
        yield lambda line: stream.send(f"\r{line}\r".encode())
    finally:
        with contextlib.suppress(libvirt.libvirtError):
            stream.abort()
        conn.close()


def seen_as_from_guest(dc: DataCenter, vm: dict[str, Any], server: Host,
                       timeout: float = 90) -> str | None:
    """Make the guest ask the whoami server on ``server`` (a LAN host outside the node)
    which address it comes from: the address the server saw, "" when no answer came
    back (the guest did ask), None when the guest never ran the command.

    The guest prints the answer on its serial console after a fresh tag, which is read
    back through the API's console log; the echo of the typed command never matches
    (``$(`` follows the tag there). busybox nc sends an HTTP/0.9 request, so the answer
    is the body alone; its wget crashes on this guest."""
    assert dc.api is not None
    tag = secrets.token_hex(4)
    # At the start of a line, the whole line: what the guest printed, not what was typed.
    pattern = re.compile(rf"(?:^|\n)YUN-NAT-{tag}=([0-9.]*)\r?\n")
    # Short: the console is 80 columns wide and the shell's line editing wraps it.
    command = f"echo YUN-NAT-{tag}=$(echo GET /|nc -w5 {server.ip} {WHOAMI_PORT})"
    deadline = time.monotonic() + timeout
    with serial_console(dc.node_hosts[vm["node_name"]], vm["uuid"]) as type_line:
        time.sleep(2)  # until QEMU polls the pty again and sees it open
        while time.monotonic() < deadline:
            type_line(command)
            # nc gives up after 5 s; the slow TCG guest may take a while to read the line.
            until = min(deadline, time.monotonic() + 20)
            while time.monotonic() < until:
                log = dc.api.get(f"/api/v1/vms/{vm['uuid']}/console-log").text
                found = pattern.search(log)
                if found:
                    print(f"guest asked {server.ip}, which saw: {found.group(1)!r}")
                    return found.group(1)
                time.sleep(1)
    return None


def console_tail(dc: DataCenter, vm: dict[str, Any]) -> str:
    assert dc.api is not None
    return dc.api.get(f"/api/v1/vms/{vm['uuid']}/console-log").text[-1500:]


def assert_guest_traffic_is_masqueraded(dc: DataCenter, vm: dict[str, Any]) -> None:
    """The node has one masquerade rule for the subnet the VM's address is in, and the
    guest's own connection to a host outside the node really leaves as the node."""
    node = dc.node_of(vm)
    rules = masquerade_rules(node)
    assert len(rules) == 1 and rules[0]["chain"] == "postrouting", rules
    subnet = masqueraded_source(rules[0])
    assert subnet is not None and ipaddress.IPv4Address(vm["ip"]) in subnet, rules

    ext = dc.topo.hosts.get("ext") or dc.topo.add_host("ext")
    server = ext.popen([sys.executable, "-c", _WHOAMI, ext.ip, str(WHOAMI_PORT)],
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        # The LAN host has no route to the VMs' subnet: only the node's NAT brings the
        # answer back, and it shows the node's LAN address, never the guest's.
        seen = seen_as_from_guest(dc, vm, ext)
        assert seen == node.ip, console_tail(dc, vm)
        # Without the NAT table the same request gets no answer: the check can fail.
        node.run(["nft", "delete", "table", "inet", table_name(BRIDGE)])
        assert seen_as_from_guest(dc, vm, ext) == "", console_tail(dc, vm)
    finally:
        server.terminate()
        server.wait(timeout=10)


def assert_disks_private(dc: DataCenter, vm: dict[str, Any]) -> None:
    """The VM's volume and the cached image under it: 0600, in 0700 directories, and
    (as the guest booted) readable by QEMU through libvirt all the same."""
    disks = dc.node_hosts[vm["node_name"]].root / "yun" / "node" / "disks"
    files = [*disks.glob(f"vms/{vm['uuid']}/*.qcow2"), *disks.glob("images/*.qcow2")]
    assert len(files) >= 2, files
    for path in files:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    for directory in (disks, disks / "images", disks / "vms", disks / "vms" / vm["uuid"]):
        assert stat.S_IMODE(directory.stat().st_mode) == 0o700, directory


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
    assert_guest_traffic_is_masqueraded(dc, vm)

    resp = dc.api.delete(f"/api/v1/vms/{vm['uuid']}")
    assert dc.wait_task(resp.json()["task"]["uuid"])["state"] == "succeeded"
    assert dc.api.get(f"/api/v1/vms/{vm['uuid']}").status_code == 404
    assert node_leftovers(dc, vm) == []
    node = dc.node_of(vm)
    hosts_dir = dc.node_hosts[node.name].root / "yun" / "node" / "network"
    assert not any(vm["uuid"] in p.name for p in hosts_dir.rglob("*"))
