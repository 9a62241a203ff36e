"""Z-FLOW crash safety: a control server killed mid-create leaves nothing leaked."""

from __future__ import annotations

import time

import pytest

from tests.system.test_vm_lifecycle import node_leftovers, volume_ids
from yun.testing.datacenter import DataCenter
from yun.util.run import run

pytestmark = pytest.mark.system


def test_control_killed_mid_create_rolls_back(datacenter_factory) -> None:  # type: ignore[no-untyped-def]
    dc: DataCenter = datacenter_factory(nodes=1)
    assert dc.api is not None
    dc.upload_guest_image()
    # The hook pauses the create flow after the node provisioned the VM but before the
    # journal recorded it: the worst moment to die.
    dc.restart("control", env={"YUN_TEST_PAUSE_AFTER_STEP": "vm.create:provision"})
    dc.wait_nodes(1)
    resp = dc.api.post("/api/v1/vms", json={"name": "crash", "image": "guest",
                                            "memory_mb": 192})
    assert resp.status_code == 202
    vm_uuid = resp.json()["resource"]["uuid"]
    task_uuid = resp.json()["task"]["uuid"]
    uri = dc.node_hosts["node0"].libvirt_uri
    for _ in range(120):
        task = dc.api.get(f"/api/v1/tasks/{task_uuid}").json()
        domains = run(["virsh", "-c", uri, "list", "--uuid"]).stdout
        if task["current_step"] == "provision" and vm_uuid in domains:
            break
        time.sleep(0.5)
    else:
        pytest.fail(f"the flow never reached the paused provision step: {task}")
    time.sleep(1)  # the step has returned; the hook holds the flow before "done"
    dc.procs["control"].kill()

    dc.restart("control", env={})
    task = dc.wait_task(task_uuid, timeout=120)
    assert task["state"] == "failed"
    assert "interrupted during step 'provision'" in task["error"]
    assert {s["name"]: s["state"] for s in task["steps"]} == {
        "schedule": "rolled_back", "address": "skipped", "provision": "rolled_back"}
    vm = dc.api.get(f"/api/v1/vms/{vm_uuid}").json()
    assert vm["state"] == "error" and vm["ip"] is None and vm["node_uuid"] is None
    assert node_leftovers(dc, {**vm, "node_name": "node0", "ip": None},
                          volume_ids(dc, vm)) == []
    node = dc.api.get("/api/v1/nodes").json()["items"][0]
    assert node["vcpus_reserved"] == 0 and node["memory_reserved_mb"] == 0

    # Nothing leaked: the address is free again, and a new VM gets it and boots.
    fresh = dc.create_vm("after-crash")
    dc.wait_console(fresh["uuid"], "YUN-GUEST-READY")
    assert dc.guest_http(fresh)["boots"] == "1"
