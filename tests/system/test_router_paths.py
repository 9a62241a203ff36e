"""Real packets from the internet to real guests through intelligent routers
(F-SB-MONO, F-SB-SHARE, C-RT, F-MULTIPATH, F-ADDR).

One deployment for the module: the control plane, two node hosts (their own libvirtd,
guests under TCG), two router hosts running ``yun serve router`` (joined to the domain
like every component), each on the LAN and on a WAN switch where the "internet" client
lives (198.51.100.100). Every address is inside the test's namespaces.

How an operator sets it up (the commands the fixture runs, with the `yun` CLI logged in
as the platform admin; the routers are ``yun serve router --config router.toml`` with
``[router] lan_address = <the router's LAN address>`` and the domain's ``[common]``)::

    yun address-pool create exclusive --kind exclusive --range 203.0.113.10-203.0.113.20
    yun address-pool create shared --kind shared --range 203.0.113.30 --ports 20000-20100
    yun pool create mono --network-mode sandbox-mono --address-pool exclusive
    yun pool create share --network-mode sandbox-share --address-pool shared
    yun pool remove-node default node0 && yun pool add-node mono node0
    yun pool remove-node default node1 && yun pool add-node share node1
    yun vm create web-mono --image guest --pool mono --memory 192
    yun vm create web-share --image guest --pool share --memory 192
    yun vm port-forward add web-share 80      # web-share:80 -> 203.0.113.30:20000
    # later, while router2 is down:
    yun eip allocate --pool exclusive --name front
    yun eip bind front web-mono

From the internet: ``curl http://<web-mono's public_ip>/`` and
``curl http://203.0.113.30:20000/`` (through any router).
"""

from __future__ import annotations

import ipaddress
import re
import secrets
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import pytest

from tests.system.conftest import need_root
from tests.system.test_sandbox_network import sandbox_counters
from tests.system.test_vm_lifecycle import (
    node_leftovers,
    node_network_leftovers,
    volume_ids,
)
from yun.testing.console import serial_console
from yun.testing.datacenter import DataCenter, deployed
from yun.testing.netns import Host, Topology
from yun.testing.routernet import CLIENT_IP, Wan

pytestmark = pytest.mark.system

ECHO_PORT = 8000
ROUTER_OPTIONS = {"sync_interval": 3.0}


@dataclass
class Paths:
    dc: DataCenter
    wan: Wan
    mono: dict[str, Any]
    share: dict[str, Any]
    share_addr: tuple[str, int] = ("", 0)
    commands: list[str] = field(default_factory=list)
    routers: dict[str, Host] = field(default_factory=dict)

    def yun(self, *args: str, json_out: bool = True) -> Any:
        """Run the `yun` CLI as the admin (like an operator's shell); its JSON output."""
        return self.dc.cli(self.commands, *args, json_out=json_out)

    def add_router(self, name: str) -> None:
        host = self.dc.topo.add_host(name)
        self.wan.attach(host)
        self.dc.add_router(name, host, **ROUTER_OPTIONS)
        self.routers[name] = host

    def nft(self, router: str) -> str:
        res = self.routers[router].run(["nft", "list", "table", "ip", "yun_router"],
                                       check=False)
        return res.stdout if res.returncode == 0 else ""

    def via(self, router: str, url: str, expect: str, deadline: float = 60) -> str:
        """GET ``url`` from the client through ``router`` until the body holds ``expect``."""
        self.wan.route_client_via(router)

        def got() -> str:
            body = self.wan.get(url)
            return body if expect in body else ""

        return str(until(f"{url} via {router} ({expect!r})", got, deadline))



def until(what: str, check: Callable[[], Any], deadline: float = 60) -> Any:
    end = time.monotonic() + deadline
    while True:  # bounded by the deadline
        value = check()
        if value:
            return value
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.5)




@pytest.fixture(scope="module")
def paths() -> Iterator[Paths]:
    """The deployment, two routers, both pools set up through the CLI, one mono guest on
    node0 and one share guest on node1 booted in parallel; everything removed after."""
    need_root("nft", "dnsmasq")
    started = time.monotonic()
    # A router that stops pulling stops being a next hop of the VMs after 6 s.
    with Topology() as topo, deployed(topo, nodes=2,
                                      control_options={"router_timeout": 6.0}) as dc:
        wan = Wan(topo).build()
        try:
            commands: list[str] = []
            p = Paths(dc, wan, {}, {}, commands=commands)
            for name in ("router1", "router2"):  # one at a time: hosts take LAN addresses
                p.add_router(name)
            p.yun("address-pool", "create", "exclusive", "--kind", "exclusive",
                  "--range", "203.0.113.10-203.0.113.20")
            p.yun("address-pool", "create", "shared", "--kind", "shared",
                  "--range", "203.0.113.30", "--ports", "20000-20100")
            p.yun("pool", "create", "mono", "--network-mode", "sandbox-mono",
                  "--address-pool", "exclusive")
            p.yun("pool", "create", "share", "--network-mode", "sandbox-share",
                  "--address-pool", "shared")
            for node, pool_name in (("node0", "mono"), ("node1", "share")):
                p.yun("pool", "remove-node", "default", node)
                p.yun("pool", "add-node", pool_name, node)
            with ThreadPoolExecutor(2) as pool:
                p.mono, p.share = pool.map(
                    lambda a: p.yun("vm", "create", a[0], "--image", "guest", "--pool", a[1],
                                    "--memory", "192"),
                    (("web-mono", "mono"), ("web-share", "share")))
                forward = p.yun("vm", "port-forward", "add", "web-share", "80")
                p.share_addr = (forward["address"], forward["port"])
                list(pool.map(lambda vm: dc.wait_console(vm["uuid"], "YUN-GUEST-READY",
                                                         timeout=300), (p.mono, p.share)))
            wan.serve_echo(ECHO_PORT)
            print(f"\ndeployment, 2 routers and 2 guests ready in "
                  f"{time.monotonic() - started:.0f} s; the operator's commands:\n  "
                  + "\n  ".join(commands))
            yield p
        finally:
            wan.close()


def guest_run(dc: DataCenter, vm: dict[str, Any], command: str, timeout: float = 90) -> str:
    """Type ``echo TAG=$(command)`` on the guest's serial console; the output (newlines
    as spaces). The typed echo never matches: ``$(`` follows the tag there."""
    assert dc.api is not None
    tag = "Y" + secrets.token_hex(3)
    pattern = re.compile(rf"(?:^|\n){tag}=(?!\$\()([^\r\n]*)\r?\n")
    line = f"echo {tag}=$({command} 2>&1|tr '\\n' ' ')"
    deadline = time.monotonic() + timeout
    with serial_console(dc.node_hosts[vm["node_name"]], vm["uuid"]) as type_line:
        time.sleep(2)  # until QEMU polls the pty again and sees it open
        while time.monotonic() < deadline:
            type_line(line)
            end = min(deadline, time.monotonic() + 20)
            while time.monotonic() < end:
                found = pattern.search(dc.api.get(f"/api/v1/vms/{vm['uuid']}/console-log").text)
                if found:
                    return found.group(1).strip()
                time.sleep(1)
    raise TimeoutError(f"{vm['name']} never ran {command!r}")


def client_sees(p: Paths, vm: dict[str, Any]) -> str:
    """The address the client's echo server saw the guest's own request come from."""
    # nc, not wget: the static busybox's wget crashes resolving even a literal address.
    answer = guest_run(p.dc, vm, f"echo GET /|nc -w5 {CLIENT_IP} {ECHO_PORT}")
    found = re.search(r"client (\S+)", answer)
    if found:
        return found.group(1)
    assert p.dc.api is not None
    console = p.dc.api.get(f"/api/v1/vms/{vm['uuid']}/console-log").text[-1500:]
    print(f"{vm['name']} got {answer!r}; its console:\n{console}\n{outbound_state(p, vm)}")
    return answer


def outbound_state(p: Paths, vm: dict[str, Any]) -> str:
    """What routes a guest's outbound packets (for a failure's message)."""
    node = p.dc.node_of(vm)
    parts = [node.run(["ip", "-4", "rule"]).stdout,
             node.run(["ip", "-4", "route", "show", "table", "all"]).stdout,
             node.run(["nft", "list", "counters"], check=False).stdout]
    parts += [f"--- {name}\n{p.nft(name)}" for name in p.routers]
    return "\n".join(parts)


def test_pools_and_guests_as_the_operator_set_them_up(paths: Paths) -> None:
    mono, share = paths.mono, paths.share
    assert mono["network_mode"] == "sandbox-mono" and share["network_mode"] == "sandbox-share"
    assert mono["node_name"] != share["node_name"]  # the routers reach VMs on either node
    public = ipaddress.IPv4Address(mono["public_ip"])
    assert ipaddress.IPv4Address("203.0.113.10") <= public <= ipaddress.IPv4Address(
        "203.0.113.20")
    assert share["public_ip"] is None and paths.share_addr == ("203.0.113.30", 20000)
    pools = {ap["name"]: ap for ap in paths.yun("address-pool", "list")["items"]}
    assert (pools["exclusive"]["used"], pools["shared"]["used"]) == (1, 1), pools


def test_mono_guest_through_each_router_and_out_from_its_public_ip(paths: Paths) -> None:
    url = f"http://{paths.mono['public_ip']}/"
    for router in ("router1", "router2"):
        body = paths.via(router, url, "hostname=web-mono")
        assert "hostname=web-mono" in body
    # The guest's own request reaches the internet with its public address as source
    # (whichever router the node sends it to: both translate).
    assert client_sees(paths, paths.mono) == paths.mono["public_ip"]


def test_share_guest_port_through_each_router(paths: Paths) -> None:
    ip, port = paths.share_addr
    for router in ("router1", "router2"):
        assert "hostname=web-share" in paths.via(router, f"http://{ip}:{port}/",
                                                 "hostname=web-share")
        # A port of the shared address not handed out leads nowhere.
        assert paths.wan.get(f"http://{ip}:{port + 1}/", timeout=2) == ""


def test_guest_cannot_reach_a_guest_on_another_node(paths: Paths) -> None:
    """Sandbox isolation across nodes: the mono guest's packets to the share guest's
    sandbox address (on the other node) are dropped by its own node, counted as sent to
    a blocked network (the sandbox supernet is one), and get no answer."""
    mono, share = paths.mono, paths.share
    # The share guest is up and listening: its node gets its page.
    assert paths.dc.guest_http(share)["hostname"] == "web-share"
    node = paths.dc.node_of(mono)
    before = sandbox_counters(node)["blocked"]
    answer = guest_run(paths.dc, mono, f"echo GET /|nc -w3 {share['ip']} 80")
    assert "hostname=" not in answer, answer
    assert until("the blocked counter of the mono guest's node",
                 lambda: sandbox_counters(node)["blocked"] > before, deadline=10)


def reboot(host: Host) -> None:
    """What a router host's restart clears: the router's table, routes and forwarding."""
    host.run(["nft", "delete", "table", "ip", "yun_router"], check=False)
    host.run(["ip", "-4", "route", "flush", "proto", "201"])
    host.run(["sysctl", "-qw", "net.ipv4.ip_forward=0"])


def test_routers_restarted_changed_while_down_and_added_later(paths: Paths) -> None:
    dc, mono_url = paths.dc, f"http://{paths.mono['public_ip']}/"
    share_url = "http://{}:{}/".format(*paths.share_addr)
    # kill -9 router1, start it again: forwarding returns with no API call. The kernel
    # state a dead process leaves would go on forwarding, so the host "reboots" too:
    # its table, routes and forwarding go, and nothing passes there any more.
    dc.procs["router1"].kill()
    reboot(paths.routers["router1"])
    paths.wan.route_client_via("router1")
    assert paths.wan.get(mono_url, timeout=2) == ""
    dc.start_again("router1")
    paths.via("router1", mono_url, "hostname=web-mono")
    paths.via("router1", share_url, "hostname=web-share")

    # Router2 down while an EIP is allocated and bound to the mono guest: router1 serves
    # it at once, router2 has it right after it comes back.
    dc.procs["router2"].kill()
    reboot(paths.routers["router2"])
    eip = paths.yun("eip", "allocate", "--pool", "exclusive", "--name", "front")
    paths.yun("eip", "bind", "front", "web-mono")
    eip_url = f"http://{eip['ip']}/"
    assert eip["ip"] != paths.mono["public_ip"]
    paths.via("router1", eip_url, "hostname=web-mono")
    assert eip["ip"] not in paths.nft("router2")  # it missed the change
    dc.start_again("router2")
    paths.via("router2", eip_url, "hostname=web-mono", deadline=30)
    # While bound, the EIP is the guest's public address both ways.
    assert client_sees(paths, paths.mono) == eip["ip"]

    # A third router added later serves every existing mapping.
    paths.add_router("router3")
    paths.via("router3", eip_url, "hostname=web-mono")
    paths.via("router3", share_url, "hostname=web-share")
    # The API lists all three by name (a router's first pull may come before the control
    # server learned its name from the domain: its uuid stands in until the next pull).
    until("3 routers listed", lambda: {"router1", "router2", "router3"} <= {
        r["name"] for r in paths.yun("router", "list") if r["live"]}, deadline=30)

    # Unbound, the guest's own address is translated again (router3 follows too).
    paths.yun("eip", "unbind", "front")
    paths.via("router3", mono_url, "hostname=web-mono")
    assert paths.wan.get(eip_url, timeout=2) == ""
    paths.yun("eip", "release", "front", json_out=False)


def test_deleted_guests_leave_nothing_on_routers_or_nodes(paths: Paths) -> None:
    dc = paths.dc
    mono_ip, (share_ip, share_port) = paths.mono["public_ip"], paths.share_addr
    volumes = {vm["uuid"]: volume_ids(dc, vm) for vm in (paths.mono, paths.share)}
    with ThreadPoolExecutor(2) as pool:
        list(pool.map(lambda name: paths.yun("vm", "delete", name), ("web-mono", "web-share")))
    pools = {ap["name"]: ap for ap in paths.yun("address-pool", "list")["items"]}
    assert (pools["exclusive"]["used"], pools["shared"]["used"]) == (0, 0), pools
    assert pools["exclusive"]["free"] == 11 and pools["shared"]["free"] == 101, pools
    for router in paths.routers:
        until(f"{router} forgets the guests", lambda r=router: (  # type: ignore[misc]
            t := paths.nft(r)) and mono_ip not in t and paths.mono["ip"] not in t
            and paths.share["ip"] not in t and str(share_port) not in t, deadline=30)
    paths.wan.route_client_via("router1")
    assert paths.wan.get(f"http://{mono_ip}/", timeout=2) == ""
    assert paths.wan.get(f"http://{share_ip}:{share_port}/", timeout=2) == ""
    for vm in (paths.mono, paths.share):
        assert node_leftovers(dc, vm, volumes[vm["uuid"]]) == [], vm["name"]
        assert node_network_leftovers(dc, vm) == [], vm["name"]
        node = dc.node_of(vm)
        rules = node.run(["ip", "-4", "rule", "show"]).stdout
        assert vm["ip"] not in rules, rules
    # The routes to the nodes' subnets stay (they are per node, not per VM).
    for router, host in paths.routers.items():
        routes = host.run(["ip", "-4", "route", "show", "proto", "201"]).stdout
        assert routes.count(" via ") == 2, (router, routes)
