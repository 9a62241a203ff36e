"""Volumes and host images with real guests, driven only through Yun's public API
(C-STO, U-HOTPLUG for disks, F-IMAGE).

One data centre with one node host and two test guests booted in parallel under TCG,
shared by the module. One data volume goes through its life across the first three
tests, in order: hot-plugged into guest A, written, unplugged, plugged into guest B,
read there (1); grown online while B runs (2); snapshotted, overwritten and reverted
(3). The last test turns A (running) and B (stopped) into host images and boots a
clone of each (4). What the guests do is typed on their serial console and read back
from the API's console log (``yun.testing.console``).
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest

from tests.system.conftest import need_root
from yun.testing.console import guest_sh, guest_wait
from yun.testing.datacenter import DataCenter, deployed
from yun.testing.guest import READY_MARKER
from yun.testing.netns import Topology

pytestmark = pytest.mark.system

GIB_SECTORS = (1 << 30) // 512
VOLUME = "data1"
# Where the test guest keeps its disk state (boot counter, first-boot token).
STATE = "/var/lib/yun-guest"
# Shell functions typed before a command (console lines stay short): w DEV waits until
# block device DEV exists (at most 60 s); p TEXT writes TEXT at the start of vdb, synced.
WAIT_DEV = "w(){ for i in $(seq 60);do [ -b /dev/$1 ]&&break;sleep 1;done;}"
WRITE_VDB = "p(){ printf $1|dd of=/dev/vdb conv=fsync 2>/dev/null&&echo ok;}"


@dataclass
class Guests:
    dc: DataCenter
    a: dict[str, Any]
    b: dict[str, Any]
    # What the volume's first sector holds, as the tests leave it (test 1 sets it).
    marker: str = ""
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def api(self) -> httpx.Client:
        assert self.dc.api is not None
        return self.dc.api


@pytest.fixture(scope="module")
def guests() -> Iterator[Guests]:
    """One node, guests A and B on it booted in parallel; all of it removed after."""
    need_root("nft", "dnsmasq", "libvirtd", "qemu-img")
    module_started = time.monotonic()
    with Topology() as topo, deployed(topo) as dc:
        started = time.monotonic()
        with ThreadPoolExecutor(2) as pool:
            a, b = pool.map(dc.create_vm, ("a", "b"))
            list(pool.map(lambda vm: dc.wait_console(vm["uuid"], READY_MARKER, timeout=300),
                          (a, b)))
        g = Guests(dc, a, b)
        g.timings["deploy"] = started - module_started
        g.timings["boot a+b"] = time.monotonic() - started
        yield g
        g.timings["module"] = time.monotonic() - module_started
        print("\ntimings: " + ", ".join(f"{k} {v:.0f} s" for k, v in g.timings.items()))


def volume_call(g: Guests, action: str, **body: Any) -> dict[str, Any]:
    """``POST /api/v1/volumes/<VOLUME>/<action>``; the volume as the API answers."""
    resp = g.api.post(f"/api/v1/volumes/{VOLUME}/{action}", json=body or None)
    assert resp.status_code in (200, 201), f"{action}: {resp.status_code} {resp.text}"
    return resp.json()  # type: ignore[no-any-return]


def attach(g: Guests, vm: dict[str, Any]) -> dict[str, Any]:
    volume = volume_call(g, "attach", vm=vm["uuid"])
    assert (volume["status"], volume["vm_uuid"]) == ("in-use", vm["uuid"]), volume
    return volume


def detach(g: Guests) -> None:
    volume = volume_call(g, "detach")
    assert (volume["status"], volume["vm_uuid"]) == ("available", None), volume


def write_marker(g: Guests, vm: dict[str, Any], marker: str) -> None:
    """The guest writes ``marker`` at the start of its vdb (waiting for the device to
    show up first), flushed to the volume before the answer."""
    out = guest_sh(g.dc, vm, WAIT_DEV, WRITE_VDB, last=f"w vdb;p {marker}")
    assert out == "ok", out


def read_marker(g: Guests, vm: dict[str, Any], wanted: str) -> None:
    """The guest reads ``wanted`` at the start of its vdb (once the device shows up)."""
    guest_wait(g.dc, vm, f"dd if=/dev/vdb bs={len(wanted)} count=1 2>/dev/null", wanted)


def block_devices(g: Guests, vm: dict[str, Any]) -> list[str]:
    return guest_sh(g.dc, vm, last="ls /sys/block").split()


def test_volume_hot_plugged_written_moved_to_another_guest(guests: Guests) -> None:
    g, a, b = guests, guests.a, guests.b
    started = time.monotonic()
    assert "vdb" not in block_devices(g, a)
    resp = g.api.post("/api/v1/volumes", json={"name": VOLUME, "size_gb": 1})
    assert resp.status_code == 201, resp.text
    assert resp.json()["status"] == "available"

    # Plugged into running A: a new block device of the volume's size, which A writes.
    volume = attach(g, a)
    assert volume["node_uuid"] == a["node_uuid"]
    guest_wait(g.dc, a, "cat /sys/block/vdb/size", str(GIB_SECTORS))
    g.marker = "y" + secrets.token_hex(5)
    write_marker(g, a, g.marker)

    # Unplugged: gone from A (the guest acknowledged the unplug).
    detach(g)
    guest_wait(g.dc, a, "ls /sys/block/vdb 2>/dev/null|wc -l", "0")

    # Plugged into running B: what A wrote is there.
    attach(g, b)
    read_marker(g, b, g.marker)
    g.timings["hot-plug"] = time.monotonic() - started


def test_volume_grown_online_seen_by_the_guest(guests: Guests) -> None:
    g, b = guests, guests.b
    started = time.monotonic()
    volume = g.api.get(f"/api/v1/volumes/{VOLUME}").json()
    assert volume["vm_uuid"] == b["uuid"], "the hot-plug test leaves the volume on B"
    grown = volume_call(g, "resize", size_gb=2)
    assert grown["size_gb"] == 2
    guest_wait(g.dc, b, "cat /sys/block/vdb/size", str(2 * GIB_SECTORS))
    # Shrinking is refused, and the guest keeps what it had.
    resp = g.api.post(f"/api/v1/volumes/{VOLUME}/resize", json={"size_gb": 1})
    assert resp.status_code == 422 and "only grow" in resp.text, resp.text
    read_marker(g, b, g.marker)
    g.timings["resize"] = time.monotonic() - started


def test_snapshot_revert_brings_the_earlier_content_back(guests: Guests) -> None:
    g, a = guests, guests.a
    started = time.monotonic()
    detach(g)  # from B, where the earlier tests left it: closed, it can be snapshotted
    resp = g.api.post(f"/api/v1/volumes/{VOLUME}/snapshots", json={"name": "s1"})
    assert resp.status_code == 201, resp.text
    assert resp.json()["size_gb"] == 2

    # Overwritten by A after the snapshot.
    attach(g, a)
    other = "y" + secrets.token_hex(5)
    write_marker(g, a, other)
    read_marker(g, a, other)
    # Reverting needs the volume closed: refused while running A has it.
    resp = g.api.post(f"/api/v1/volumes/{VOLUME}/snapshots/s1/revert")
    assert resp.status_code == 409 and "VM a" in resp.text, resp.text
    detach(g)
    guest_wait(g.dc, a, "ls /sys/block/vdb 2>/dev/null|wc -l", "0")

    resp = g.api.post(f"/api/v1/volumes/{VOLUME}/snapshots/s1/revert")
    assert resp.status_code == 200, resp.text
    attach(g, a)
    read_marker(g, a, g.marker)

    detach(g)
    guest_wait(g.dc, a, "ls /sys/block/vdb 2>/dev/null|wc -l", "0")
    assert g.api.delete(f"/api/v1/volumes/{VOLUME}").status_code == 204
    assert g.api.get(f"/api/v1/volumes/{VOLUME}").status_code == 404
    g.timings["snapshot"] = time.monotonic() - started


def image_from_vm(g: Guests, vm: dict[str, Any], name: str) -> dict[str, Any]:
    """``POST /api/v1/images/from-vm``, its task waited for; the image as shown after."""
    resp = g.api.post("/api/v1/images/from-vm", json={"vm": vm["uuid"], "name": name})
    assert resp.status_code == 202, f"image from {vm['name']}: {resp.status_code} {resp.text}"
    task = g.dc.wait_task(resp.json()["task"]["uuid"])
    assert task["state"] == "succeeded", task
    image = g.api.get(f"/api/v1/images/{name}").json()
    assert image["status"] == "active", image
    return image  # type: ignore[no-any-return]


def stop(g: Guests, vm: dict[str, Any]) -> None:
    resp = g.api.post(f"/api/v1/vms/{vm['uuid']}/stop")
    assert resp.status_code in (200, 202), resp.text
    if resp.status_code == 202:
        assert g.dc.wait_task(resp.json()["task"]["uuid"])["state"] == "succeeded"
    assert g.api.get(f"/api/v1/vms/{vm['uuid']}").json()["state"] == "stopped"


def test_images_from_a_running_and_a_stopped_vm_boot_clones_with_their_content(
        guests: Guests) -> None:
    g, a, b = guests, guests.a, guests.b
    started = time.monotonic()
    # Each source writes a marker file on its root disk, flushed; its first-boot token
    # (kept on its disk too) is what its HTTP page shows.
    marks = {}
    for vm in (a, b):
        marks[vm["name"]] = f"{vm['name']}-{secrets.token_hex(6)}"
        out = guest_sh(g.dc, vm, last=f"echo {marks[vm['name']]} >{STATE}/mark;sync;"
                                       f"cat {STATE}/mark")
        assert out == marks[vm["name"]], out
    tokens = {vm["name"]: g.dc.guest_http(vm)["token"] for vm in (a, b)}
    assert all(tokens.values()) and tokens["a"] != tokens["b"], tokens

    # A keeps running while its image is taken (a live snapshot); B is stopped first.
    def from_b() -> dict[str, Any]:
        stop(g, b)
        return image_from_vm(g, b, "img-b")

    with ThreadPoolExecutor(2) as pool:
        done_a = pool.submit(image_from_vm, g, a, "img-a")
        done_b = pool.submit(from_b)
        images = {"a": done_a.result(), "b": done_b.result()}
    assert g.api.get(f"/api/v1/vms/{a['uuid']}").json()["state"] == "running"
    assert g.dc.guest_http(a)["token"] == tokens["a"]  # A went on serving
    g.timings["images"] = time.monotonic() - started
    print(f"images: {[(i['name'], i['format'], i['size']) for i in images.values()]}")

    # A clone of each, created and booted in parallel, shows its source's disk.
    cloned = time.monotonic()
    with ThreadPoolExecutor(2) as pool:
        clones = dict(zip(("a", "b"), pool.map(
            lambda src: g.dc.create_vm(f"clone-{src}", image=f"img-{src}"), ("a", "b")),
            strict=True))
        list(pool.map(lambda vm: g.dc.wait_console(vm["uuid"], READY_MARKER, timeout=300),
                      clones.values()))
    g.timings["clones boot"] = time.monotonic() - cloned
    for src, clone in clones.items():
        page = g.dc.guest_http(clone)
        assert page["hostname"] == clone["name"], page
        assert page["token"] == tokens[src], (src, page)
        assert guest_sh(g.dc, clone, last=f"cat {STATE}/mark") == marks[src]
    g.timings["from-vm"] = time.monotonic() - started
