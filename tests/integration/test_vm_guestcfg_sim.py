"""VMs from ISOs (F-ISO) and guest customisation (cloud-init NoCloud) on the sim cloud:
a blank VM booting from its ISO, a VM with both a disk image and an ISO, the CD drive
changed like a CD (eject switches the boot to the disk), the bad requests refused with
what is wrong, users' SSH keys, and what reaches the node's spec (its CD drive, boot
order and cloud-init seed)."""

from __future__ import annotations

import hashlib
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from tests.integration.conftest import PG_URL, Cli, shown, started, upload
from tests.integration.test_network_modes_sim import consistent, node_of
from yun.proto.messages import DomainSpec
from yun.testing.cluster import SimCluster

ED25519 = ("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIMw3GzjzWbPx3oruo2tWGdasM+EE1RCB6mUpqEgskBQn "
           "alice@laptop")
ED25519_FP = "SHA256:xeDqCt2+4M2aJb5P83XNWTNrs5NyFzi2I/9VwMpWp4s"
ECDSA = ("ecdsa-sha2-nistp384 AAAAE2VjZHNhLXNoYTItbmlzdHAzODQAAAAIbmlzdHAzODQAAABhBCvXdbYJea3F"
         "26SkPn6hiUq3YpSwJm1qgB6yeDPhp0QlypudQF7+wgeWXoylMSseMoH3PSNyiQGKRgSsBZB5HJ+0Li6mLkF"
         "AmXyhH8n/b/86RquDYu3/j2BygIOaZqEdFw== root@vm")
ECDSA_FP = "SHA256:4HuINaLN65j0ogITaN2zSk38RBC2Uw/YHF8IL+uU9ak"

pytestmark = pytest.mark.asyncio(loop_scope="module")


@pytest_asyncio.fixture(scope="module", loop_scope="module",
                        params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
async def shared(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
                 ) -> AsyncIterator[SimCluster]:
    """One cloud per database for the module (a build and stop is ~3 s, twelve of them
    were most of the module's time); every test on SQLite and on PostgreSQL (its
    foreign keys and JSON columns)."""
    root = tmp_path_factory.mktemp(f"guestcfg-{request.param}")
    if request.param == "sqlite":
        async with started(SimCluster(root, nodes=2)) as sim:
            yield sim
        return
    if not PG_URL:
        pytest.skip("YUN_TEST_POSTGRES_URL is not set (scripts/test.sh sets it)")
    from tests.integration.test_postgres import cluster_on_postgres

    async with cluster_on_postgres(root, nodes=2) as sim:
        yield sim


@pytest_asyncio.fixture(loop_scope="module")
async def cluster(shared: SimCluster) -> AsyncIterator[SimCluster]:
    """The module's cloud, emptied after each test through the API (VMs, then images
    and SSH keys), so each test starts from a cloud with nothing in it. Emptying it
    also keeps the next PostgreSQL module's schema downgrade possible: it cannot keep
    a blank VM (no disk image before migration 0008)."""
    assert await everything_of(shared) == {"vms": [], "images": [], "ssh-keys": []}
    yield shared
    await delete_all_vms(shared)
    for kind in ("images", "ssh-keys"):
        for item in (await api(shared).get(f"/api/v1/{kind}")).json()["items"]:
            resp = await api(shared).delete(f"/api/v1/{kind}/{item['uuid']}")
            assert resp.status_code == 204, resp.text
    assert await consistent(shared) == []


async def everything_of(sim: SimCluster) -> dict[str, list[str]]:
    """The names of the VMs, images and SSH keys the cloud holds."""
    return {kind: [item["name"] for item in
                   (await api(sim).get(f"/api/v1/{kind}")).json()["items"]]
            for kind in ("vms", "images", "ssh-keys")}


async def delete_all_vms(sim: SimCluster) -> None:
    assert sim.api is not None
    vms = (await sim.api.get("/api/v1/vms")).json()["items"]
    tasks = [(await sim.api.delete(f"/api/v1/vms/{vm['uuid']}")).json()["task"]["uuid"]
             for vm in vms]
    done = await sim.wait_tasks(tasks)
    assert all(t["state"] == "succeeded" for t in done), done


@pytest.fixture(scope="session")
def small_iso(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real ISO 9660 image (one file on it), as an installer CD would be."""
    root = tmp_path_factory.mktemp("isoroot")
    (root / "README.TXT").write_text("yun test installer\n")
    path = root.parent / "installer.iso"
    subprocess.run(["genisoimage", "-quiet", "-V", "INSTALLER", "-o", str(path), str(root)],
                   check=True)
    return path


def api(cluster: SimCluster) -> Any:
    assert cluster.api is not None
    return cluster.api


async def images(cluster: SimCluster, small_qcow2: Path, small_iso: Path
                 ) -> tuple[dict[str, Any], dict[str, Any]]:
    disk = await upload(cluster, small_qcow2, "img")
    iso = await upload(cluster, small_iso, "installer")
    assert (disk["format"], iso["format"]) == ("qcow2", "iso")
    return disk, iso


async def created(cluster: SimCluster, body: dict[str, Any]
                  ) -> tuple[dict[str, Any], dict[str, Any]]:
    resp = await api(cluster).post("/api/v1/vms", json={"memory_mb": 64, **body})
    assert resp.status_code == 202, resp.text
    task = await cluster.wait_task(resp.json()["task"]["uuid"])
    assert task["state"] == "succeeded", task
    vm = (await api(cluster).get(f"/api/v1/vms/{resp.json()['resource']['uuid']}")).json()
    return task, vm


def spec_on_node(cluster: SimCluster, vm: dict[str, Any]) -> DomainSpec:
    """The domain spec the VM's node was last given (what it defined)."""
    spec = node_of(cluster, vm).agent.driver.domains[vm["uuid"]].spec
    assert isinstance(spec, DomainSpec)
    return spec


async def cdrom(cluster: SimCluster, vm: str, image: str | None) -> Any:
    """Insert (``image``) or eject, waiting for the task."""
    if image is None:
        return await api(cluster).delete(f"/api/v1/vms/{vm}/cdrom", params={"wait": 60})
    return await api(cluster).put(f"/api/v1/vms/{vm}/cdrom", json={"image": image},
                                  params={"wait": 60})


async def test_blank_vm_installs_from_its_iso_and_boots_from_disk_after_eject(
        cluster: SimCluster, small_qcow2: Path, small_iso: Path) -> None:
    disk, iso = await images(cluster, small_qcow2, small_iso)
    _, vm = await created(cluster, {"name": "inst1", "iso": "installer", "disk_gb": 3})
    assert (vm["image_uuid"], vm["cdrom_image_uuid"], vm["boot"]) == (None, iso["uuid"],
                                                                      "cdrom")
    spec = spec_on_node(cluster, vm)
    assert spec.boot == "cdrom"
    assert spec.cdrom is not None and spec.cdrom.image_id == iso["uuid"]
    assert spec.cdrom.image_sha256
    root = spec.disks[0]
    assert (root.image_id, root.size_gb) == (None, 3)  # a blank disk to install onto
    assert spec.cloud_init is not None
    assert (spec.cloud_init.instance_id, spec.cloud_init.hostname) == (vm["uuid"], "inst1")
    assert (spec.cloud_init.ssh_keys, spec.cloud_init.user_data) == ([], None)
    # A VM made from a disk image alone has an empty CD drive, for an ISO inserted later.
    _, plain = await created(cluster, {"name": "plain", "image": "img"})
    assert (plain["cdrom_image_uuid"], plain["boot"]) == (None, "disk")
    plain_cd = spec_on_node(cluster, plain).cdrom
    assert plain_cd is not None and plain_cd.image_id is None
    resp = await cdrom(cluster, "plain", "installer")
    assert resp.json()["task"]["state"] == "succeeded", resp.text
    assert (await api(cluster).get("/api/v1/vms/plain")).json()["cdrom_image_uuid"] == iso[
        "uuid"]

    # Installed: eject. The VM boots from its disk from now on, and the node's
    # definition says so (redefined, the guest left running).
    resp = await cdrom(cluster, "inst1", None)
    assert resp.status_code == 202, resp.text
    task = resp.json()["task"]
    assert task["state"] == "succeeded", task
    assert [s["name"] for s in task["steps"]] == ["cdrom", "redefine"]
    vm = (await api(cluster).get("/api/v1/vms/inst1")).json()
    assert (vm["cdrom_image_uuid"], vm["boot"], vm["state"]) == (None, "disk", "running")
    spec = spec_on_node(cluster, vm)
    assert spec.boot == "disk" and spec.cdrom is not None and spec.cdrom.image_id is None
    # Nothing in the drive: nothing to do, said so.
    resp = await cdrom(cluster, "inst1", None)
    assert resp.status_code == 200 and resp.json()["task"] is None
    assert "no ISO in its CD drive" in resp.json()["message"]

    # A CD inserted later (e.g. tools) leaves the boot on the disk.
    resp = await cdrom(cluster, "inst1", "installer")
    assert resp.status_code == 202 and resp.json()["task"]["state"] == "succeeded", resp.text
    vm = (await api(cluster).get("/api/v1/vms/inst1")).json()
    assert (vm["cdrom_image_uuid"], vm["boot"]) == (iso["uuid"], "disk")
    info = await node_of(cluster, vm).agent.driver.get_domain(vm["uuid"])
    assert info is not None and info.cdrom_image == iso["uuid"]
    resp = await cdrom(cluster, "inst1", "installer")
    assert resp.status_code == 200 and "already in the CD drive" in resp.json()["message"]
    # A disk image is not a CD.
    resp = await cdrom(cluster, "inst1", "img")
    assert resp.status_code == 422 and "not an ISO" in resp.text, resp.text
    assert disk["uuid"] in (await api(cluster).get("/api/v1/images/img")).text

    # Restarted, the VM keeps its CD and boots from its disk.
    for action in ("stop", "start"):
        resp = await api(cluster).post(f"/api/v1/vms/inst1/{action}", params={"wait": 60})
        assert resp.json()["task"]["state"] == "succeeded", resp.text
    info = await node_of(cluster, vm).agent.driver.get_domain(vm["uuid"])
    assert info is not None and info.cdrom_image == iso["uuid"]
    assert spec_on_node(cluster, vm).boot == "disk"
    # Defined again from its record (an extra address does that): the CD stays in.
    assert (await api(cluster).post("/api/v1/vms/inst1/addresses")).status_code == 201
    spec = spec_on_node(cluster, vm)
    assert spec.boot == "disk" and spec.cdrom is not None
    assert spec.cdrom.image_id == iso["uuid"]
    assert await consistent(cluster) == []


async def test_vm_from_a_disk_image_with_an_iso_inserted_boots_from_its_disk(
        cluster: SimCluster, small_qcow2: Path, small_iso: Path) -> None:
    disk, iso = await images(cluster, small_qcow2, small_iso)
    _, vm = await created(cluster, {"name": "both", "image": "img", "iso": "installer"})
    assert (vm["image_uuid"], vm["cdrom_image_uuid"], vm["boot"]) == (
        disk["uuid"], iso["uuid"], "disk")
    spec = spec_on_node(cluster, vm)
    assert spec.boot == "disk" and spec.disks[0].image_id == disk["uuid"]
    assert spec.cdrom is not None and spec.cdrom.image_id == iso["uuid"]
    # Ejected from a VM booting from its disk: the boot stays, nothing to redefine for.
    resp = await cdrom(cluster, "both", None)
    assert resp.json()["task"]["state"] == "succeeded", resp.text
    vm = (await api(cluster).get("/api/v1/vms/both")).json()
    assert (vm["cdrom_image_uuid"], vm["boot"]) == (None, "disk")
    spec = spec_on_node(cluster, vm)
    assert spec.cdrom is not None and spec.cdrom.image_id is None  # an empty drive stays


async def test_an_iso_used_by_a_cd_drive_cannot_be_deleted(
        cluster: SimCluster, small_qcow2: Path, small_iso: Path) -> None:
    await images(cluster, small_qcow2, small_iso)
    await created(cluster, {"name": "cd1", "image": "img", "iso": "installer"})
    resp = await api(cluster).delete("/api/v1/images/installer")
    assert resp.status_code == 409, resp.text
    assert (await api(cluster).get("/api/v1/images/installer")).json()["status"] == "active"


async def test_bad_iso_and_guest_requests_are_refused_saying_what_is_wrong(
        cluster: SimCluster, small_qcow2: Path, small_iso: Path) -> None:
    await images(cluster, small_qcow2, small_iso)
    cases = [
        ({"image": "installer"}, 422, "is an ISO; a VM boots from a disk image"),
        ({"image": "installer"}, 422, "--iso installer"),
        ({"iso": "img"}, 422, "is a qcow2 disk image, not an ISO"),
        ({}, 422, "give an image to boot from, or an iso"),
        ({"image": "img", "user_data": "x" * 65537}, 422, "at most 65536 (64 KiB)"),
        ({"image": "img", "ssh_keys": ["nokey"]}, 404, "no SSH key named 'nokey'"),
        ({"image": "img", "ssh_keys": ["ssh-rsa AAA"]}, 422, "not valid base64"),
        ({"image": "img", "ssh_keys": ["ssh-dss AAAAB3NzaC1kc3M= x"]}, 422,
         "unknown key type 'ssh-dss'"),
    ]
    for body, status, error in cases:
        resp = await api(cluster).post("/api/v1/vms", json={"name": "bad", **body})
        assert resp.status_code == status and error in resp.text, (body, resp.text)
    assert (await api(cluster).get("/api/v1/vms")).json()["items"] == []


async def test_ssh_keys_stored_listed_and_given_to_the_guest_with_user_data(
        cluster: SimCluster, small_qcow2: Path) -> None:
    await upload(cluster, small_qcow2, "img")
    resp = await api(cluster).post("/api/v1/ssh-keys",
                                   json={"name": "laptop", "public_key": ED25519 + "\n"})
    assert resp.status_code == 201, resp.text
    key = resp.json()
    assert (key["fingerprint"], key["public_key"]) == (ED25519_FP, ED25519)
    for body, status, error in (
            ({"name": "laptop", "public_key": ECDSA}, 409, "already have an SSH key named"),
            ({"name": "again", "public_key": ED25519}, 409, "already yours, named 'laptop'"),
            ({"name": "bad", "public_key": "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5"}, 422,
             "one 32-byte public key"),
            ({"name": "bad", "public_key": "-----BEGIN OPENSSH PRIVATE KEY-----"}, 422,
             "private key")):
        resp = await api(cluster).post("/api/v1/ssh-keys", json=body)
        assert resp.status_code == status and error in resp.text, (body, resp.text)
    listed = (await api(cluster).get("/api/v1/ssh-keys")).json()["items"]
    assert [(k["name"], k["fingerprint"]) for k in listed] == [("laptop", ED25519_FP)]
    assert (await api(cluster).get("/api/v1/ssh-keys/laptop")).json()["uuid"] == key["uuid"]

    user_data = "#cloud-config\nruncmd:\n  - echo hello > /tmp/hello\n"
    _, vm = await created(cluster, {"name": "web_1", "image": "img",
                                    "ssh_keys": ["laptop", ECDSA, ED25519],
                                    "user_data": user_data})
    seed = spec_on_node(cluster, vm).cloud_init
    assert seed is not None
    assert (seed.instance_id, seed.hostname) == (vm["uuid"], "web-1")
    assert seed.ssh_keys == [ED25519, ECDSA]  # the same key named twice is given once
    assert seed.user_data == user_data
    # Shown: the keys' fingerprints and the user data's size and hash, never the data.
    assert vm["ssh_key_fingerprints"] == [ED25519_FP, ECDSA_FP]
    assert vm["user_data_size"] == len(user_data)
    assert vm["user_data_sha256"] == hashlib.sha256(user_data.encode()).hexdigest()
    assert "runcmd" not in (await api(cluster).get("/api/v1/vms/web_1")).text

    # A deleted key stays in the guests given it, and is gone from the list.
    assert (await api(cluster).delete("/api/v1/ssh-keys/laptop")).status_code == 204
    assert (await api(cluster).get("/api/v1/ssh-keys")).json()["items"] == []
    assert (await api(cluster).get("/api/v1/ssh-keys/laptop")).status_code == 404
    vm = (await api(cluster).get("/api/v1/vms/web_1")).json()
    assert vm["ssh_key_fingerprints"] == [ED25519_FP, ECDSA_FP]
    assert await consistent(cluster) == []


async def test_cli_keys_iso_create_and_cdrom_eject(
        cluster: SimCluster, cli: Cli, small_qcow2: Path, small_iso: Path,
        tmp_path: Path) -> None:
    await images(cluster, small_qcow2, small_iso)
    pub = tmp_path / "id_ecdsa.pub"
    pub.write_text(ECDSA + "\n")
    made = await shown(cli, "key", "add", "work", str(pub))
    assert made["fingerprint"] == ECDSA_FP
    code, out = await cli("key", "list")
    assert code == 0 and "work" in out and ECDSA_FP in out, out
    data = tmp_path / "user-data"
    data.write_text("#!/bin/sh\necho installed\n")
    vm = await shown(cli, "vm", "create", "cli1", "--iso", "installer", "--disk", "2",
                     "--ssh-key", "work", "--ssh-key", ED25519, "--user-data", str(data))
    assert (vm["state"], vm["boot"], vm["image_uuid"]) == ("running", "cdrom", None)
    seed = spec_on_node(cluster, vm).cloud_init
    assert seed is not None and seed.ssh_keys == [ECDSA, ED25519]
    assert seed.user_data == "#!/bin/sh\necho installed\n"
    vm = await shown(cli, "vm", "cdrom", "eject", "cli1")
    assert (vm["boot"], vm["cdrom_image_uuid"]) == ("disk", None)
    code, out = await cli("vm", "create", "cli2", "--iso", "img")
    assert code != 0 and "not an ISO" in out, out
    code, out = await cli("key", "delete", "work")
    assert code == 0, out
