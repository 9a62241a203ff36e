"""The namespace data-centre builder: hosts reach each other, and nothing is left behind."""

from __future__ import annotations

import json
import secrets
import subprocess
import sys
import time
import urllib.request

import pytest

from yun.testing.netns import (
    Namespace,
    Topology,
    cleanup_stale,
    http_get_in,
    list_namespaces,
    ping_argv,
    wait_http_in,
)
from yun.util.run import run

pytestmark = pytest.mark.system


def _links() -> set[str]:
    return {link["ifname"] for link in json.loads(run(["ip", "-j", "link", "show"]).stdout)}


def _leftovers(topo: Topology) -> list[str]:
    found = [n for n in list_namespaces() if n.startswith(topo.tag)]
    found += [n for n in _links() if n.startswith(topo.tag)]
    if topo.state_dir.is_dir():
        found += [p.name for p in topo.state_dir.iterdir() if topo.tag in p.name]
        found += [p.name for p in topo.state_dir.glob("net-*") if p.read_text() == topo.tag]
    return found


def test_two_hosts_ping_each_other(topology: Topology) -> None:
    a = topology.add_host("a")
    b = topology.add_host("b")
    assert a.ip != b.ip
    assert a.ns.name.startswith(topology.tag) and len(topology.root_link or "") <= 15
    a.run(ping_argv(b.ip), timeout=10)
    b.run(ping_argv(a.ip), timeout=10)
    # The test process reaches the hosts through the root link, and they reach it.
    assert topology.root_ip is not None
    run(ping_argv(a.ip), timeout=10)
    b.run(ping_argv(topology.root_ip), timeout=10)
    # No default route: anything off the test LAN is unreachable, never sent out.
    res = a.run(["ip", "-j", "route", "show", "default"])
    assert res.stdout.strip() in ("", "[]")


def test_everything_deleted_on_exit() -> None:
    with Topology() as topo:
        topo.add_host("a")
        topo.add_namespace("bare")
        assert len(_leftovers(topo)) >= 4  # lan, a, bare, root link, marker, claim
    assert _leftovers(topo) == []


def test_everything_deleted_after_exception() -> None:
    topo = Topology()
    with pytest.raises(RuntimeError, match="boom"), topo:
        host = topo.add_host("a")
        # A process still running inside must not keep the namespace alive.
        host.popen(["sleep", "30"])
        raise RuntimeError("boom")
    assert _leftovers(topo) == []


def test_http_get_in_namespace(topology: Topology) -> None:
    srv = topology.add_host("srv")
    cli = topology.add_host("cli")
    server = srv.popen(
        [sys.executable, "-m", "http.server", "--bind", srv.ip, "8080"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        res = wait_http_in(cli.ns.name, f"http://{srv.ip}:8080/", deadline=20)
        assert res.status == 200, res
        assert "Directory listing" in res.body
        missing = http_get_in(cli.ns.name, f"http://{srv.ip}:8080/no-such-file")
        assert missing.status == 404
        refused = http_get_in(cli.ns.name, f"http://{srv.ip}:8081/", timeout=2)
        assert refused.status == 0 and refused.error
    finally:
        server.terminate()
        server.wait(timeout=10)


def test_root_process_reaches_host_service(topology: Topology) -> None:
    """The test process (root namespace) reaches a server inside a host namespace."""
    host = topology.add_host("web")
    server = host.popen(
        [sys.executable, "-m", "http.server", "--bind", host.ip, "8080"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        body = b""
        for _ in range(40):  # bounded: 40 x 0.25 s
            try:
                with opener.open(f"http://{host.ip}:8080/", timeout=2) as resp:
                    body = resp.read()
                break
            except OSError:
                time.sleep(0.25)
        assert b"Directory listing" in body
    finally:
        server.terminate()
        server.wait(timeout=10)


def test_cleanup_stale_spares_live_runs_and_removes_dead_ones(topology: Topology) -> None:
    topology.add_host("a")
    # A live run (this one) is never touched.
    cleanup_stale()
    assert topology.lan.ns.exists() and topology.hosts["a"].ns.exists()
    # A "killed run": a namespace and link with the prefix but no live owner marker
    # (a random tag, so that parallel sessions do not fight over it).
    tag = f"ytdead{secrets.token_hex(2)}"
    dead = Namespace(f"{tag}-lan").create()
    try:
        run(["ip", "link", "add", f"{tag}r", "type", "veth", "peer", "name", f"{tag}x"])
        removed = cleanup_stale()
        assert f"netns {tag}-lan" in removed
        assert not dead.exists()
        assert f"{tag}r" not in _links()
    finally:
        dead.delete()
        run(["ip", "link", "del", f"{tag}r"], check=False)
