"""The sim host remembers like a libvirt host: domains, disks and leases survive a restart
of its process, and the domains come back shut off (a host crash)."""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

import pytest

from yun.node.hypervisor.sim.driver import SimDriver
from yun.node.hypervisor.sim.hostfile import FILE_NAME, SimHostFile, SimHostFileError
from yun.node.network.sim import SimSandboxBackend
from yun.node.storage.sim import SimDiskBackend
from yun.proto.messages import (
    DiskSpec,
    DomainSpec,
    DomainState,
    ImageLocation,
    NicSpec,
    legacy_volume_id,
)


def backends(path: Path | None) -> tuple[SimDriver, SimDiskBackend, SimSandboxBackend]:
    return (SimDriver(state_file=path), SimDiskBackend(total_gb=100, state_file=path),
            SimSandboxBackend(state_file=path))


async def provision(driver: SimDriver, disks: SimDiskBackend, net: SimSandboxBackend,
                    vm: str, ip: str, mac: str) -> None:
    image = ImageLocation(image_id=str(uuid.uuid4()), url="http://s/x", sha256="ab" * 32,
                          size=1, format="qcow2")
    spec = DomainSpec(uuid=vm, name="vm", vcpus=1, memory_mb=256,
                      disks=[DiskSpec(disk_id="root", size_gb=3, image_id=image.image_id,
                                      image_sha256=image.sha256, image_format="qcow2",
                                      volume_id=legacy_volume_id(vm, "root"))],
                      nics=[NicSpec(nic_id="n0", mac=mac, ip=ip)])
    await disks.ensure_image(image, None)
    resolved = [await disks.ensure_volume(d) for d in spec.disks]
    await disks.set_attachments(vm, {d.disk_id: str(d.volume_id) for d in spec.disks})
    nics = [await net.ensure_port(vm, n) for n in spec.nics]
    await driver.ensure_defined(spec, resolved, nics)
    await driver.start(vm)


async def test_restart_keeps_everything_and_shuts_domains_off(tmp_path: Path) -> None:
    path = tmp_path / FILE_NAME
    driver, disks, net = backends(path)
    a, b = str(uuid.uuid4()), str(uuid.uuid4())
    await provision(driver, disks, net, a, "10.77.0.10", "52:54:00:00:00:0a")
    await provision(driver, disks, net, b, "10.77.0.11", "52:54:00:00:00:0b")
    await driver.destroy(b)

    # The documented format, which the chaos test's checker reads.
    data = json.loads(path.read_text())
    assert data["domains"][a]["state"] == "running"
    assert data["domains"][b]["state"] == "shutoff"
    assert data["domains"][a]["disk_ids"] == ["root"]
    assert data["domains"][a]["macs"] == ["52:54:00:00:00:0a"]
    volume = data["volumes"][legacy_volume_id(a, "root")]
    assert (volume["size_gb"], volume["thin"], volume["image_id"]) == (3, True,
                                                                      volume["image_id"])
    assert data["vm_files"][a]["attached"] == {"root": legacy_volume_id(a, "root")}
    assert data["ports"]["52:54:00:00:00:0b"]["vm_uuid"] == b
    assert data["ports"]["52:54:00:00:00:0b"]["ip"] == "10.77.0.11"

    # The process dies; a new one on the same state dir finds it all, guests shut off.
    driver, disks, net = backends(path)
    states = {d.uuid: d.state for d in await driver.list_domains()}
    assert states == {a: DomainState.SHUTOFF, b: DomainState.SHUTOFF}
    assert await disks.vm_disk_ids() == {vm: ["root"] for vm in sorted([a, b])}
    assert await net.vm_ports() == {a: ["52:54:00:00:00:0a"], b: ["52:54:00:00:00:0b"]}
    assert "host restarted" in await driver.console_log(a)
    # The cached images survived too (one per provision above).
    assert disks.downloads == 0 and len(disks.images) == 2
    # The address is still leased: another VM cannot take it.
    from yun.node.network.base import NetworkError
    with pytest.raises(NetworkError, match="already held"):
        await net.ensure_port(str(uuid.uuid4()), NicSpec(nic_id="n0", mac="52:54:00:00:00:0c",
                                                          ip="10.77.0.10"))
    await driver.start(a)
    assert (await driver.get_domain(a)).state is DomainState.RUNNING  # type: ignore[union-attr]

    # Removal is remembered as well.
    await driver.undefine(a)
    await net.release_ports(a)
    await disks.delete_volume(legacy_volume_id(a, "root"))
    await disks.set_attachments(a, {})
    await disks.delete_vm_files(a)
    driver, disks, net = backends(path)
    assert [d.uuid for d in await driver.list_domains()] == [b]
    assert a not in await disks.vm_disk_ids() and a not in await net.vm_ports()
    assert await disks.volume_ids() == [legacy_volume_id(b, "root")]


async def test_without_state_file_nothing_is_written(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    driver, disks, net = backends(None)
    await provision(driver, disks, net, str(uuid.uuid4()), "10.77.0.10", "52:54:00:00:00:0a")
    assert os.listdir(tmp_path) == []


def test_a_damaged_state_file_is_named(tmp_path: Path) -> None:
    path = tmp_path / FILE_NAME
    path.write_text("{not json")
    with pytest.raises(SimHostFileError, match=str(path)):
        SimDriver(state_file=path)
    assert SimHostFile(tmp_path / "absent.json").read() == {}


async def test_disks_of_the_per_vm_layout_are_adopted_as_volumes(tmp_path: Path) -> None:
    """A sim host file of the older per-VM layout: its disks become volumes under their
    legacy ids, attached to their VM, as the local backend adopts vms/<vm>/<disk>.qcow2."""
    path = tmp_path / FILE_NAME
    vm, image_id = str(uuid.uuid4()), str(uuid.uuid4())
    path.write_text(json.dumps({"disks": {f"{vm}/root": {
        "vm_uuid": vm, "disk_id": "root", "size_gb": 3, "image_id": image_id,
        "bus": "virtio"}}}))
    disks = SimDiskBackend(total_gb=100, state_file=path)
    volume_id = legacy_volume_id(vm, "root")
    assert await disks.volume_ids() == [volume_id]
    assert (await disks.volume_info(volume_id)).backing_image_id == image_id
    assert await disks.attachments() == {vm: {"root": volume_id}}
    # The per-VM view the invariant checker reads names the volume now.
    assert json.loads(path.read_text())["disks"] == {f"{vm}/root": {
        "vm_uuid": vm, "disk_id": "root", "volume_id": volume_id, "size_gb": 3}}
    # Restarted again: the same, nothing adopted twice.
    again = SimDiskBackend(total_gb=100, state_file=path)
    assert await again.volume_ids() == [volume_id]
    assert await again.attachments() == {vm: {"root": volume_id}}
