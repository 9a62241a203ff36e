"""Two node hosts on one machine, and U-SPLIT: guests outlive the control plane and the agent."""

from __future__ import annotations

import time

import pytest

from yun.testing.datacenter import DataCenter
from yun.util.run import run

pytestmark = pytest.mark.system


def test_vms_on_two_nodes_and_guests_outlive_the_control_plane(datacenter_factory) -> None:  # type: ignore[no-untyped-def]
    dc: DataCenter = datacenter_factory(nodes=2)
    assert dc.api is not None
    dc.upload_guest_image()
    # Both node hosts run on this one machine and report its same real-time load, so
    # the weighers alone need not split two VMs: an anti-affinity group does.
    resp = dc.api.post("/api/v1/vm-groups", json={"name": "split", "policy": "anti-affinity"})
    assert resp.status_code == 201, resp.text
    a = dc.create_vm("a", group="split")
    b = dc.create_vm("b", group="split")
    assert {a["node_name"], b["node_name"]} == {"node0", "node1"}
    for vm in (a, b):
        dc.wait_console(vm["uuid"], "YUN-GUEST-READY")
        assert dc.guest_http(vm)["boots"] == "1"
    # Each node host's libvirtd, and so each agent, sees only its own domain.
    for vm, other in ((a, b), (b, a)):
        uri = dc.node_hosts[vm["node_name"]].libvirt_uri
        listed = run(["virsh", "-c", uri, "list", "--all", "--uuid"]).stdout
        assert vm["uuid"] in listed and other["uuid"] not in listed

    # kill -9 the node agent of `a`: its guest keeps running and answering.
    node_a = a["node_name"]
    dc.procs[node_a].kill()
    before = dc.guest_http(a)
    assert int(before["uptime"]) >= 0 and before["boots"] == "1"
    # The domain server notices the silent agent, the control server marks its node down.
    nodes = {}
    for _ in range(30):
        nodes = {n["name"]: n for n in dc.api.get("/api/v1/nodes").json()["items"]}
        if nodes[node_a]["status"] == "down":
            break
        time.sleep(1)
    assert nodes[node_a]["status"] == "down"
    unknown = dc.api.get(f"/api/v1/vms/{a['uuid']}").json()
    assert unknown["state"] == "unknown" and "is down" in unknown["error"]
    assert dc.guest_http(a)["boots"] == "1"  # ... while the guest itself runs on

    # A restarted agent finds its domain in libvirt and reports it: the VM is running.
    dc.restart(node_a)
    dc.wait_nodes(2)
    for _ in range(20):  # settled by the agent's first report
        vm = dc.api.get(f"/api/v1/vms/{a['uuid']}").json()
        if vm["state"] == "running":
            break
        time.sleep(0.5)
    assert vm["state"] == "running" and vm["power_state"] == "running"
    assert vm["error"] is None
    assert dc.guest_http(a)["boots"] == "1"  # the same boot: it was never restarted
    log = dc.api.get(f"/api/v1/vms/{a['uuid']}/console-log").text
    assert log.count("YUN-GUEST-READY") == 1

    # Stop the control server and the gateway: the guests keep answering.
    dc.procs["gateway"].kill()
    dc.procs["control"].kill()
    for vm in (a, b):
        page = dc.guest_http(vm)
        assert page["boots"] == "1"

    # The control plane comes back and finds everything as it was.
    dc.restart("control")
    dc.restart("gateway")
    dc.wait_nodes(2)
    for vm in (a, b):
        assert dc.api.get(f"/api/v1/vms/{vm['uuid']}").json()["state"] == "running"
