"""Test node hosts: each a network namespace with its own libvirtd, isolated from others."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import uuid as uuidlib
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

import libvirt
import pytest

from yun.node.hypervisor.libvirt.driver import LibvirtDriver
from yun.proto.messages import DomainSpec
from yun.testing.netns import Topology
from yun.testing.nodehost import NodeHost, NodeHostError, cleanup_stale

pytestmark = pytest.mark.system


@pytest.fixture
def topo() -> Iterator[Topology]:
    if os.geteuid() != 0:
        pytest.skip("system tests need root")
    for tool in ("ip", "unshare", "libvirtd", "virtlogd"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed")
    with Topology() as topology:
        yield topology


def host_uuid(uri: str) -> str:
    conn = libvirt.open(uri)
    try:
        return ET.fromstring(conn.getCapabilities()).findtext("host/uuid") or ""
    finally:
        conn.close()


def mounts_under(path: Path) -> list[str]:
    with open("/proc/self/mounts") as f:
        return [line.split()[1] for line in f if line.split()[1].startswith(str(path))]


async def test_two_node_hosts_are_separate(topo: Topology) -> None:
    a_ns, b_ns = topo.add_host("na").ns.name, topo.add_host("nb").ns.name
    a, b = NodeHost(a_ns, name="a"), NodeHost(b_ns, name="b")
    try:
        a.start()
        b.start()
        assert a.libvirt_uri != b.libvirt_uri
        assert host_uuid(a.libvirt_uri) == a.host_uuid
        assert host_uuid(b.libvirt_uri) == b.host_uuid
        assert a.host_uuid != b.host_uuid
        # Each daemon runs in its host's network namespace.
        for nh in (a, b):
            assert nh.pids()
            for pid in nh.pids():
                assert os.readlink(f"/proc/{pid}/ns/net") == _netns_id(nh.netns)

        vm = str(uuidlib.uuid4())
        da = LibvirtDriver(**a.driver_options(accel="tcg"))  # type: ignore[arg-type]
        db = LibvirtDriver(**b.driver_options(accel="tcg"))  # type: ignore[arg-type]
        await da.open()
        await db.open()
        try:
            await da.ensure_defined(DomainSpec(uuid=vm, name="only-on-a", vcpus=1,
                                               memory_mb=64), [], [])
            assert [d.uuid for d in await da.list_domains()] == [vm]
            assert await db.list_domains() == []
            assert await db.get_domain(vm) is None
        finally:
            await da.close()
            await db.close()
    finally:
        a.stop()
        b.stop()
    for nh in (a, b):
        assert nh.pids() == []
        assert not nh.root.exists()
        assert mounts_under(nh.root) == []
    a.stop()  # twice: harmless


def _netns_id(name: str) -> str:
    """The ``net:[inode]`` of a named network namespace."""
    out = subprocess.run(["ip", "netns", "exec", name, "readlink", "/proc/self/ns/net"],
                         capture_output=True, text=True, check=True, timeout=10)
    return out.stdout.strip()


def test_failed_start_cleans_up(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("system tests need root")
    nh = NodeHost("yun-no-such-netns", base_dir=tmp_path / "hosts", start_timeout=10)
    with pytest.raises(NodeHostError, match="daemons did not start"):
        nh.start()
    assert not nh.root.exists()
    assert nh.pids() == []


def test_cleanup_stale_stops_hosts_of_dead_runs(topo: Topology, tmp_path: Path) -> None:
    base = tmp_path / "hosts"
    nh = NodeHost(topo.add_host("nc").ns.name, base_dir=base)
    try:
        nh.start()
        assert cleanup_stale(base) == []  # its owner (this process) is alive
        owner = json.loads((nh.root / "owner.json").read_text())
        dead = subprocess.Popen(["true"])
        dead.wait(timeout=10)
        owner["pid"] = dead.pid  # as if the test process had been killed
        (nh.root / "owner.json").write_text(json.dumps(owner))
        assert cleanup_stale(base) == [nh.id]
        assert nh.pids() == []
        assert not nh.root.exists()
    finally:
        nh.stop()
