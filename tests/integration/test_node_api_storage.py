"""The node's storage API (volumes, snapshots, disk hot-plug, CD, seeds) against a real sim
node agent over its signed, TLS internal API, spoken to as a control server would: routes,
bodies, answers and the error statuses (404, 409, 422, 507) the control side relies on."""

from __future__ import annotations

import uuid as uuidlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from yun.node.storage.sim import SimDiskBackend
from yun.proto.client import PeerClient
from yun.proto.components import ComponentType
from yun.proto.errors import Conflict, NotFound, PeerError, Unprocessable
from yun.proto.messages import (
    CdromChange,
    CdromSpec,
    CloudInitSpec,
    DiskAttach,
    DiskSpec,
    DomainInfo,
    DomainSpec,
    DomainState,
    ImageLocation,
    ProvisionRequest,
    StopRequest,
    VolumeEnsure,
    VolumeInfo,
    VolumeResize,
    legacy_volume_id,
)
from yun.testing.cluster import SimCluster

BASE = "/internal/v1"


@pytest.fixture
async def node(tmp_path: Path) -> AsyncIterator[tuple[Any, PeerClient]]:
    c = SimCluster(tmp_path, nodes=1)
    await c.start()
    # No control server: it would remove the test's VMs from the node as orphans.
    assert c.control is not None
    await c.control.stop()
    c.control = None
    service = c.node_services[0]
    client = c.member_client(service.url, ComponentType.CONTROL, "ctl-storage")
    try:
        yield service, client
    finally:
        await client.aclose()
        await c.stop()


def image(fmt: str = "qcow2") -> ImageLocation:
    return ImageLocation(image_id=str(uuidlib.uuid4()), url="http://storage:7730/x",
                         sha256="ab" * 32, size=1 << 20, format=fmt)


async def ensure(client: PeerClient, disk: DiskSpec, img: ImageLocation | None = None
                 ) -> VolumeInfo:
    return await client.call("PUT", f"{BASE}/volumes/{disk.volume_id}", VolumeInfo,
                             body=VolumeEnsure(disk=disk, image=img))


async def test_volumes_snapshots_hotplug_cd_and_removal(node: tuple[Any, PeerClient]) -> None:
    service, client = node
    disks: SimDiskBackend = service.agent.disks
    root_img, iso = image(), image("iso")
    data = DiskSpec(disk_id="data", size_gb=2, volume_id=str(uuidlib.uuid4()), create=False)

    # A data volume made ahead of its VM; made again: the same volume.
    info = await ensure(client, data.model_copy(update={"create": True}))
    assert (info.volume_id, info.size_gb, info.thin) == (data.volume_id, 2, True)
    assert await ensure(client, data.model_copy(update={"create": True})) == info
    assert await client.call("GET", f"{BASE}/volumes/{data.volume_id}", VolumeInfo) == info
    missing = str(uuidlib.uuid4())
    with pytest.raises(NotFound, match=missing):
        await client.request("GET", f"{BASE}/volumes/{missing}")

    # A VM: its root of an older control server (no volume id), the data volume, an
    # empty CD drive and a cloud-init seed.
    vm = str(uuidlib.uuid4())
    root = DiskSpec(disk_id="root", size_gb=3, image_id=root_img.image_id,
                    image_sha256=root_img.sha256, image_format="qcow2")
    spec = DomainSpec(uuid=vm, name="web1", vcpus=1, memory_mb=64, disks=[root, data],
                      cdrom=CdromSpec(), cloud_init=CloudInitSpec(instance_id=vm,
                                                                  hostname="web1"))
    dom = await client.call("PUT", f"{BASE}/domains/{vm}", DomainInfo,
                            body=ProvisionRequest(spec=spec, images=[root_img]), timeout=30)
    assert dom.state is DomainState.RUNNING
    root_id = legacy_volume_id(vm, "root")
    report = await service.agent.snapshot()
    assert report.disks[vm] == ["cidata", "data", "root"]
    assert report.volumes is not None and set(report.volumes) == {root_id, data.volume_id}
    assert report.storage is not None and report.storage[0].volumes == 2
    sim_dom = service.agent.driver.domains[vm]
    devices = {d.disk_id: d for d in sim_dom.disks}
    assert devices["cdrom"].device == "cdrom" and devices["cdrom"].path is None
    assert devices["cidata"].read_only and devices["root"].path.name == f"{root_id}.qcow2"

    # Open by a running domain: no snapshot, no deletion.
    with pytest.raises(Conflict, match="open by running VM"):
        await client.request("PUT", f"{BASE}/volumes/{data.volume_id}/snapshots/s1")
    with pytest.raises(Conflict, match="attached to VM"):
        await client.request("DELETE", f"{BASE}/volumes/{data.volume_id}")

    # Online resize goes through the hypervisor.
    grown = await client.call("POST", f"{BASE}/volumes/{data.volume_id}/resize", VolumeInfo,
                              body=VolumeResize(size_gb=5))
    assert grown.size_gb == 5
    assert service.agent.driver.disk_size(vm, "data") == 5 * 1024**3
    with pytest.raises(Unprocessable, match="cannot shrink"):
        await client.request("POST", f"{BASE}/volumes/{data.volume_id}/resize",
                             body=VolumeResize(size_gb=1))

    # Hot-plug a second volume into the running VM; not into a second VM too.
    extra = DiskSpec(disk_id="extra", size_gb=1, volume_id=str(uuidlib.uuid4()))
    await ensure(client, extra)
    dom = await client.call("PUT", f"{BASE}/domains/{vm}/disks/extra", DomainInfo,
                            body=DiskAttach(disk=extra))
    assert "extra" in {d.disk_id for d in service.agent.driver.domains[vm].disks}
    other = str(uuidlib.uuid4())
    await client.call("PUT", f"{BASE}/domains/{other}", DomainInfo, body=ProvisionRequest(
        spec=DomainSpec(uuid=other, name="other", vcpus=1, memory_mb=64)), timeout=30)
    with pytest.raises(Conflict, match=f"already attached to VM {vm}"):
        await client.request("PUT", f"{BASE}/domains/{other}/disks/x", body=DiskAttach(
            disk=extra.model_copy(update={"disk_id": "x"})))
    third = str(uuidlib.uuid4())
    with pytest.raises(Conflict, match=f"already attached to VM {vm}"):
        await client.request("PUT", f"{BASE}/domains/{third}", body=ProvisionRequest(
            spec=DomainSpec(uuid=third, name="third", vcpus=1, memory_mb=64,
                            disks=[extra.model_copy(update={"create": False})])))
    assert await service.agent.driver.get_domain(third) is None
    await client.call("DELETE", f"{BASE}/domains/{vm}/disks/extra", DomainInfo)
    assert "extra" not in (await service.agent.snapshot()).disks[vm]
    await client.call("PUT", f"{BASE}/domains/{other}/disks/x", DomainInfo,
                      body=DiskAttach(disk=extra.model_copy(update={"disk_id": "x"})))

    # A volume that was never made is not conjured blank by an attach.
    ghost = DiskSpec(disk_id="ghost", size_gb=1, volume_id=str(uuidlib.uuid4()))
    with pytest.raises(NotFound, match="not made blank"):
        await client.request("PUT", f"{BASE}/domains/{vm}/disks/ghost",
                             body=DiskAttach(disk=ghost))

    # An ISO into the CD drive, then out; an ISO is never a disk.
    await client.call("PUT", f"{BASE}/domains/{vm}/cdrom", DomainInfo,
                      body=CdromChange(image=iso))
    cd = {d.disk_id: d for d in service.agent.driver.domains[vm].disks}["cdrom"]
    assert cd.path is not None and cd.path.name == f"{iso.image_id}.iso"
    await client.call("PUT", f"{BASE}/domains/{vm}/cdrom", DomainInfo, body=CdromChange())
    cd = {d.disk_id: d for d in service.agent.driver.domains[vm].disks}["cdrom"]
    assert cd.path is None
    with pytest.raises(Unprocessable, match="is an ISO, which is never a disk"):
        await ensure(client, DiskSpec(disk_id="d", size_gb=1, volume_id=str(uuidlib.uuid4()),
                                      image_id=iso.image_id, image_format="iso"), iso)

    # Stopped: snapshots work, and revert restores the content.
    await client.call("POST", f"{BASE}/domains/{vm}/stop", DomainInfo,
                      body=StopRequest(force=True))
    disks.write(str(data.volume_id), "first")
    snap = await client.call("PUT", f"{BASE}/volumes/{data.volume_id}/snapshots/s1", VolumeInfo)
    assert [s.name for s in snap.snapshots] == ["s1"]
    disks.write(str(data.volume_id), "second")
    await client.call("POST", f"{BASE}/volumes/{data.volume_id}/snapshots/s1/revert", VolumeInfo)
    assert disks.read(str(data.volume_id)) == "first"
    gone = await client.call("DELETE", f"{BASE}/volumes/{data.volume_id}/snapshots/s1",
                             VolumeInfo)
    assert gone.snapshots == []

    # Larger than any storage directory: 507 with the sizes named.
    with pytest.raises(PeerError, match="do not fit in any storage directory") as too_big:
        await ensure(client, DiskSpec(disk_id="huge", size_gb=60000,
                                      volume_id=str(uuidlib.uuid4())))
    assert too_big.value.peer_status == 507

    # The VM removed with its root; the data volume is kept for another VM.
    await client.request("DELETE", f"{BASE}/domains/{vm}", params={"delete_volume": [root_id]})
    report = await service.agent.snapshot()
    assert vm not in report.disks
    assert report.volumes is not None
    assert root_id not in report.volumes and data.volume_id in report.volumes
    await client.request("DELETE", f"{BASE}/volumes/{data.volume_id}")
    assert data.volume_id not in await disks.volume_ids()
