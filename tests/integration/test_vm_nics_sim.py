"""NICs plugged into VMs after their create (U-HOTPLUG) on the sim cloud: added, listed
and removed on running and stopped VMs, the limit, the primary NIC kept, other projects
and readers refused, the node's failure rolled back, and everything given back when the
VM is deleted."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import select

from tests.integration.conftest import Cli, shown, upload
from tests.integration.test_network_modes_sim import (
    _db,
    consistent,
    create_vm,
    delete_vm,
    network_pool,
    node_of,
    public_rows,
)
from yun.control.db.models import AddressRow, VmNicRow
from yun.control.services.vm_nics import MAX_NICS
from yun.testing.cluster import SimCluster

PASSWORD = "correct horse battery"


def api(cluster: SimCluster) -> httpx.AsyncClient:
    assert cluster.api is not None
    return cluster.api


async def held(cluster: SimCluster, vm_uuid: str) -> tuple[list[str], list[VmNicRow]]:
    """The addresses the VM holds and its plugged NICs' rows."""
    async with _db(cluster).session() as s:
        ips = (await s.scalars(select(AddressRow.ip).where(
            AddressRow.vm_uuid == vm_uuid).order_by(AddressRow.ip))).all()
        nics = (await s.scalars(select(VmNicRow).where(VmNicRow.vm_uuid == vm_uuid))).all()
        return list(ips), list(nics)


async def domain_macs(cluster: SimCluster, vm: dict[str, Any]) -> list[str]:
    info = await node_of(cluster, vm).agent.driver.get_domain(vm["uuid"])
    assert info is not None
    return list(info.nics)


async def test_nic_hot_plugged_into_a_running_vm_and_unplugged(
        cluster: SimCluster, small_qcow2: Path) -> None:
    await upload(cluster, small_qcow2)
    task, vm = await create_vm(cluster, "n1")
    assert task["state"] == "succeeded", task
    node = node_of(cluster, vm)
    resp = await api(cluster).post("/api/v1/vms/n1/nics")
    assert resp.status_code == 201, resp.text
    nic = resp.json()
    assert (nic["index"], nic["network"], nic["exposure"], nic["primary"]) == (
        1, "sandbox", "private", False)
    assert nic["ip"] != vm["ip"] and nic["ip"].rsplit(".", 1)[0] == vm["ip"].rsplit(".", 1)[0]
    assert nic["mac"] != vm["mac"] and nic["vm_uuid"] == vm["uuid"]
    # The node made its port (own tap and lease) and the running domain has it.
    ports = {p.mac: p for p in node.agent.network.ports[vm["uuid"]]}
    assert ports[nic["mac"]].ip == nic["ip"] and ports[vm["mac"]].ip == vm["ip"]
    assert ports[nic["mac"]].tap != ports[vm["mac"]].tap
    # DHCP offers the VM's own hostname on it too: a guest taking the hostname of any
    # lease (as the test guest does) keeps its name when a NIC is plugged in.
    assert ports[nic["mac"]].hostname == ports[vm["mac"]].hostname == "n1"
    assert await domain_macs(cluster, vm) == [vm["mac"], nic["mac"]]
    assert (await node.agent.driver.get_domain(vm["uuid"])).state == "running"
    listed = (await api(cluster).get("/api/v1/vms/n1/nics")).json()
    assert [(n["index"], n["mac"], n["ip"], n["primary"]) for n in listed] == [
        (0, vm["mac"], vm["ip"], True), (1, nic["mac"], nic["ip"], False)]
    assert await consistent(cluster) == []

    # The primary NIC stays, by index or by MAC; an unknown NIC is named.
    for ref in ("0", vm["mac"].replace(":", "-")):
        resp = await api(cluster).delete(f"/api/v1/vms/n1/nics/{ref}")
        assert resp.status_code == 409 and "primary NIC" in resp.text, resp.text
    resp = await api(cluster).delete("/api/v1/vms/n1/nics/5")
    assert resp.status_code == 404 and "has no NIC '5'" in resp.text

    resp = await api(cluster).delete(f"/api/v1/vms/n1/nics/{nic['mac'].replace(':', '-')}")
    assert resp.status_code == 204, resp.text
    assert [p.mac for p in node.agent.network.ports[vm["uuid"]]] == [vm["mac"]]
    assert await domain_macs(cluster, vm) == [vm["mac"]]
    assert await held(cluster, vm["uuid"]) == ([vm["ip"]], [])
    resp = await api(cluster).delete("/api/v1/vms/n1/nics/1")
    assert resp.status_code == 404
    # The index and address are free again: the next NIC gets them.
    again = (await api(cluster).post("/api/v1/vms/n1/nics")).json()
    assert (again["index"], again["ip"]) == (1, nic["ip"])
    assert (await api(cluster).get("/api/v1/vms/n1")).json()["state"] == "running"
    assert await consistent(cluster) == []


async def test_nic_added_to_a_stopped_vm_is_there_at_its_next_start(
        cluster: SimCluster, small_qcow2: Path) -> None:
    """The NIC is part of the VM's spec: a stopped VM starts with it, and a redefinition
    of the domain (the node asked to make the VM again) keeps it."""
    await upload(cluster, small_qcow2)
    _, vm = await create_vm(cluster, "s1")
    resp = await api(cluster).post("/api/v1/vms/s1/stop", params={"wait": 60})
    assert resp.status_code == 202 and resp.json()["task"]["state"] == "succeeded", resp.text
    nic = (await api(cluster).post("/api/v1/vms/s1/nics", json={})).json()
    assert await domain_macs(cluster, vm) == [vm["mac"], nic["mac"]]
    resp = await api(cluster).post("/api/v1/vms/s1/start", params={"wait": 60})
    assert resp.json()["task"]["state"] == "succeeded", resp.text
    assert await domain_macs(cluster, vm) == [vm["mac"], nic["mac"]]
    # An extra address makes the node define the VM again from its spec: the NIC stays.
    assert (await api(cluster).post("/api/v1/vms/s1/addresses")).status_code == 201
    assert await domain_macs(cluster, vm) == [vm["mac"], nic["mac"]]
    ports = {p.mac: p.ip for p in node_of(cluster, vm).agent.network.ports[vm["uuid"]]}
    assert ports[nic["mac"]] == nic["ip"]
    assert await consistent(cluster) == []


async def test_at_most_eight_nics_and_deleting_the_vm_gives_everything_back(
        one_on_each_db: SimCluster, small_qcow2: Path) -> None:
    """Also on PostgreSQL: its unique constraints and the cascade of the VM's rows."""
    cluster = one_on_each_db
    await upload(cluster, small_qcow2)
    _, vm = await create_vm(cluster, "l1")
    made = []
    for _ in range(MAX_NICS - 1):
        resp = await api(cluster).post("/api/v1/vms/l1/nics")
        assert resp.status_code == 201, resp.text
        made.append(resp.json())
    assert [n["index"] for n in made] == list(range(1, MAX_NICS))
    assert len({n["mac"] for n in made} | {vm["mac"]}) == MAX_NICS
    resp = await api(cluster).post("/api/v1/vms/l1/nics")
    assert resp.status_code == 409 and f"the most a VM may have ({MAX_NICS})" in resp.text
    ips, rows = await held(cluster, vm["uuid"])
    assert len(ips) == MAX_NICS and len(rows) == MAX_NICS - 1
    node = node_of(cluster, vm)
    assert len(node.agent.network.ports[vm["uuid"]]) == MAX_NICS
    await delete_vm(cluster, "l1")
    assert await held(cluster, vm["uuid"]) == ([], [])
    assert vm["uuid"] not in node.agent.network.ports
    assert not node.agent.network.taps
    assert await consistent(cluster) == []


async def test_node_failure_rolls_the_nic_back(cluster: SimCluster, small_qcow2: Path) -> None:
    """The hypervisor refuses: the node releases the port it made, the control server
    gives the MAC and address back. The port refused: nothing was made."""
    await upload(cluster, small_qcow2)
    _, vm = await create_vm(cluster, "r1")
    node = node_of(cluster, vm)
    taps = set(node.agent.network.taps)
    for fail in (lambda: node.agent.driver.fail_next("attach_nic"),
                 lambda: node.agent.network.fail_next("ensure_port")):
        fail()
        resp = await api(cluster).post("/api/v1/vms/r1/nics")
        assert resp.status_code >= 500, resp.text
        assert await held(cluster, vm["uuid"]) == ([vm["ip"]], [])
        assert [p.mac for p in node.agent.network.ports[vm["uuid"]]] == [vm["mac"]]
        assert node.agent.network.taps == taps
        assert await domain_macs(cluster, vm) == [vm["mac"]]
    # The unplug refused by the hypervisor: the NIC stays, held and listed.
    nic = (await api(cluster).post("/api/v1/vms/r1/nics")).json()
    node.agent.driver.fail_next("detach_nic")
    resp = await api(cluster).delete("/api/v1/vms/r1/nics/1")
    assert resp.status_code >= 500, resp.text
    assert len((await api(cluster).get("/api/v1/vms/r1/nics")).json()) == 2
    assert await domain_macs(cluster, vm) == [vm["mac"], nic["mac"]]
    assert (await api(cluster).delete("/api/v1/vms/r1/nics/1")).status_code == 204
    assert await consistent(cluster) == []


async def test_mono_vm_nic_is_private_and_the_same_key_plugs_once(
        cluster: SimCluster, small_qcow2: Path) -> None:
    """In a mono pool a plugged NIC gets only a sandbox address (no public one), and a
    repeated request with the same Idempotency-Key answers the same NIC."""
    await upload(cluster, small_qcow2)
    await network_pool(cluster, "sandbox-mono", "exclusive")
    _, vm = await create_vm(cluster, "m1")
    headers = {"Idempotency-Key": "nic-once"}
    first = await api(cluster).post("/api/v1/vms/m1/nics", headers=headers)
    second = await api(cluster).post("/api/v1/vms/m1/nics", headers=headers)
    assert first.status_code == second.status_code == 201, second.text
    assert first.json() == second.json()
    nic = first.json()
    assert nic["exposure"] == "private"
    listed = (await api(cluster).get("/api/v1/vms/m1/nics")).json()
    assert [n["exposure"] for n in listed] == ["mono", "private"]
    ports = {p.mac: p for p in node_of(cluster, vm).agent.network.ports[vm["uuid"]]}
    assert (ports[vm["mac"]].exposure, ports[nic["mac"]].exposure) == ("mono", "private")
    assert [r.vm_uuid for r in await public_rows(cluster)] == [vm["uuid"]]
    await delete_vm(cluster, "m1")
    assert await public_rows(cluster) == [] and await held(cluster, vm["uuid"]) == ([], [])


async def test_bad_requests_and_other_users_are_refused(
        cluster: SimCluster, small_qcow2: Path) -> None:
    admin = api(cluster)
    await upload(cluster, small_qcow2)
    _, vm = await create_vm(cluster, "t1")
    for body, words in (({"network": "direct"}, "its NICs are on the sandbox network"),
                        ({"exposure": "mono"}, "exposure"),
                        ({"colour": "red"}, "colour")):
        resp = await admin.post("/api/v1/vms/t1/nics", json=body)
        assert resp.status_code == 422 and words in resp.text, resp.text
    resp = await admin.post("/api/v1/vms/nope/nics")
    assert resp.status_code == 404 and "no VM 'nope'" in resp.text
    # A reader of the VM's project may list but not plug; another project sees nothing.
    await admin.post("/api/v1/departments", json={"name": "d2"})
    await admin.post("/api/v1/projects", json={"name": "p2", "department": "d2"})
    for user, role, project in (("rita", "reader", vm["project_uuid"]),
                                ("bob", "member", "p2")):
        resp = await admin.post("/api/v1/users", json={"name": user, "password": PASSWORD,
                                                       "department": "d2"})
        assert resp.status_code == 201, resp.text
        resp = await admin.post("/api/v1/role-assignments", json={
            "user": user, "role": role, "project": project})
        assert resp.status_code == 201, resp.text
    rita = cluster.client(await cluster.login("rita", PASSWORD, vm["project_uuid"]))
    bob = cluster.client(await cluster.login("bob", PASSWORD, "p2"))
    try:
        assert len((await rita.get(f"/api/v1/vms/{vm['uuid']}/nics")).json()) == 1
        resp = await rita.post(f"/api/v1/vms/{vm['uuid']}/nics")
        assert resp.status_code == 403 and "add NICs to VM t1" in resp.text, resp.text
        for resp in (await bob.get(f"/api/v1/vms/{vm['uuid']}/nics"),
                     await bob.post(f"/api/v1/vms/{vm['uuid']}/nics"),
                     await bob.delete(f"/api/v1/vms/{vm['uuid']}/nics/0")):
            assert resp.status_code == 404, resp.text
    finally:
        await rita.aclose()
        await bob.aclose()
    assert await held(cluster, vm["uuid"]) == ([vm["ip"]], [])


async def test_cli_adds_lists_and_removes_nics(
        cluster: SimCluster, small_qcow2: Path, cli: Cli) -> None:
    await upload(cluster, small_qcow2)
    _, vm = await create_vm(cluster, "c1")
    code, out = await cli("vm", "nic", "add", "c1")
    assert code == 0 and out.startswith("NIC 1 of c1: 52:54:00:"), out
    listed = await shown(cli, "vm", "nic", "add", "c1")
    assert listed["index"] == 2
    code, out = await cli("vm", "nic", "list", "c1")
    assert code == 0 and vm["mac"] in out and listed["mac"] in out, out
    code, out = await cli("vm", "nic", "remove", "c1", "0")
    assert code != 0 and "primary NIC" in out, out
    code, out = await cli("vm", "nic", "remove", "c1", "2")
    assert code == 0 and "NIC 2 removed from c1" in out, out
    code, out = await cli("vm", "nic", "add", "c1", "--network", "direct")
    assert code != 0 and "sandbox network" in out, out
