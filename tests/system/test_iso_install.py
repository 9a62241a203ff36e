"""ISO install end to end through Yun's API (F-ISO), on one real deployment.

The installer ISO of the test guest (:func:`yun.testing.guest.ensure_installer_iso`)
is uploaded as an image of format ``iso``; a blank VM made with it boots from the CD,
writes the test guest onto its blank root volume and powers itself off (the node's
report turns the VM ``stopped``); the CD is ejected through the API, which makes the
VM boot from its disk; started again it boots the installed system. Along the way:
an ISO in a VM's CD drive cannot be deleted, and can be once ejected.
"""

from __future__ import annotations

import time
from typing import Any

import httpx
import pytest

from tests.system.conftest import need_root
from yun.testing.datacenter import DataCenter, deployed
from yun.testing.guest import (
    INSTALLED_MARKER,
    NO_INSTALL_MARKER,
    READY_MARKER,
    ensure_installer_iso,
)
from yun.testing.netns import Topology

pytestmark = pytest.mark.system

INSTALL_TIMEOUT = 240.0  # boot from the CD and write ~22 MiB under TCG: ~10 s when idle


def _timed(timings: dict[str, float], name: str, started: float) -> float:
    timings[name] = round(time.monotonic() - started, 1)
    return time.monotonic()


def _vm(api: httpx.Client, uuid: str) -> dict[str, Any]:
    resp = api.get(f"/api/v1/vms/{uuid}")
    resp.raise_for_status()
    return resp.json()  # type: ignore[no-any-return]


def _wait_state(api: httpx.Client, uuid: str, state: str, timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    vm = _vm(api, uuid)
    while vm["state"] != state:
        if time.monotonic() > deadline:
            raise TimeoutError(f"VM {uuid} still {vm['state']} (power {vm.get('power_state')}),"
                               f" not {state}")
        time.sleep(0.5)
        vm = _vm(api, uuid)
    return vm


def _done(dc: DataCenter, resp: httpx.Response) -> None:
    """The task of an accepted request succeeded."""
    assert resp.status_code == 202, resp.text
    task = dc.wait_task(resp.json()["task"]["uuid"])
    assert task["state"] == "succeeded", task


def test_install_from_iso_then_boot_from_disk() -> None:
    need_root("libvirtd", "qemu-system-x86_64", "qemu-img", "genisoimage")
    timings: dict[str, float] = {}
    started = time.monotonic()
    iso_path = ensure_installer_iso()
    with Topology() as topo, deployed(topo, image=None, prefix="yun-isoinst-") as dc:
        api = dc.api
        assert api is not None
        started = _timed(timings, "deploy", started)

        with iso_path.open("rb") as f:
            resp = api.post("/api/v1/images", params={"name": "installer", "format": "iso"},
                            content=f, headers={"Content-Type": "application/octet-stream"})
        assert resp.status_code == 201, resp.text
        image = resp.json()
        assert image["format"] == "iso" and image["status"] == "active", image
        started = _timed(timings, "upload", started)

        # A blank 1 GiB root volume and the ISO in the CD drive, booted from the CD.
        resp = api.post("/api/v1/vms", json={"name": "inst", "iso": "installer", "disk_gb": 1,
                                             "memory_mb": 192})
        assert resp.status_code == 202, resp.text
        uuid = resp.json()["resource"]["uuid"]
        _done(dc, resp)
        vm = _vm(api, uuid)
        assert vm["boot"] == "cdrom" and vm["cdrom_image_uuid"] == image["uuid"], vm
        console = dc.wait_console(uuid, INSTALLED_MARKER, timeout=INSTALL_TIMEOUT)
        assert NO_INSTALL_MARKER not in console
        assert f"{INSTALLED_MARKER} /dev/vda " in console  # the root volume, the only disk
        started = _timed(timings, "create+install", started)

        # The guest powered itself off: the node's report makes the VM stopped.
        vm = _wait_state(api, uuid, "stopped", timeout=60)
        started = _timed(timings, "seen stopped", started)

        # The ISO in the drive is in use: not deletable.
        refused = api.delete("/api/v1/images/installer")
        assert refused.status_code == 409, refused.text
        assert "inst" in refused.json()["detail"]

        _done(dc, api.delete(f"/api/v1/vms/{uuid}/cdrom"))
        vm = _vm(api, uuid)
        assert vm["cdrom_image_uuid"] is None and vm["boot"] == "disk", vm
        started = _timed(timings, "eject", started)

        _done(dc, api.post(f"/api/v1/vms/{uuid}/start"))
        console = dc.wait_console(uuid, READY_MARKER, timeout=INSTALL_TIMEOUT)
        page = dc.guest_http(_vm(api, uuid))
        assert page["hostname"] == "inst" and page["boots"] == "1", page
        # Booted the installed disk: the live system (which says so) never ran.
        assert "YUN-GUEST-LIVE" not in console and "YUN-GUEST-NO-ROOT" not in console
        started = _timed(timings, "boot from disk", started)

        # Ejected, the ISO is no longer in use.
        gone = api.delete("/api/v1/images/installer")
        assert gone.status_code == 204, gone.text
        _done(dc, api.delete(f"/api/v1/vms/{uuid}"))
        assert api.get(f"/api/v1/images/{image['uuid']}").status_code == 404
        _timed(timings, "delete", started)
    print("ISO install timings (s):", timings)
