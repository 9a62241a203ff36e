"""One contract, every hypervisor driver: the same tests run over the sim driver and the
libvirt driver on libvirt's built-in test hypervisor (``test:///default``: domains are
defined, started and destroyed in libvirtd's memory, no QEMU runs), as Nova runs one
test case over its fake and libvirt drivers. The real libvirt on QEMU is held to the
same behaviour in tests/system/test_libvirt_driver.py.

Whatever a test here asserts, the control plane may rely on from any driver; a driver
that diverges fails here, not in production.
"""

from __future__ import annotations

import asyncio
import uuid as uuidlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from yun.node.hypervisor import load_driver
from yun.node.hypervisor.base import (
    SEED_DISK_ID,
    DomainEvent,
    DomainNotFound,
    DomainNotRunning,
    HypervisorDriver,
    HypervisorError,
    NotSupported,
    ResolvedDisk,
    ResolvedNic,
)
from yun.proto.messages import DomainSpec, DomainState

DRIVERS = ["sim", "libvirt-test"]
EVENT_TIMEOUT = 10.0  # seconds; events are immediate, this only bounds a broken test


@pytest.fixture(params=DRIVERS)
async def driver(request: pytest.FixtureRequest, tmp_path: Path
                 ) -> AsyncIterator[HypervisorDriver]:
    if request.param == "sim":
        drv = load_driver("sim", hostname="contract", vcpus=8, memory_mb=16384)
    else:
        drv = load_driver("libvirt", uri="test:///default", accel="tcg", state_dir=tmp_path)
    await drv.open()
    created: list[str] = []
    drv.created = created  # type: ignore[attr-defined]
    try:
        yield drv
    finally:
        # test:///default lives as long as the process: leave no domain behind.
        for vm in created:
            await drv.undefine(vm)
        await drv.close()


def new_spec(driver: HypervisorDriver, **fields: object) -> DomainSpec:
    """A fresh domain spec; the fixture undefines it after the test."""
    vm = str(uuidlib.uuid4())
    driver.created.append(vm)  # type: ignore[attr-defined]
    values: dict[str, object] = {"uuid": vm, "name": f"c-{vm[:8]}", "vcpus": 1,
                                 "memory_mb": 128}
    values.update(fields)
    return DomainSpec(**values)  # type: ignore[arg-type]


async def state(driver: HypervisorDriver, vm: str) -> DomainState:
    info = await driver.get_domain(vm)
    return DomainState.ABSENT if info is None else info.state


async def defined(driver: HypervisorDriver, running: bool = False, **fields: object) -> str:
    spec = new_spec(driver, **fields)
    await driver.ensure_defined(spec, [], [])
    if running:
        await driver.start(spec.uuid)
    return spec.uuid


class EventWatch:
    """The driver's events, read in the background so none is missed."""

    def __init__(self, driver: HypervisorDriver) -> None:
        self.seen: list[DomainEvent] = []
        self._changed = asyncio.Event()
        self._task = asyncio.create_task(self._read(driver))

    async def _read(self, driver: HypervisorDriver) -> None:
        async for ev in driver.events():
            self.seen.append(ev)
            self._changed.set()

    async def wait(self, vm: str, state: DomainState) -> DomainEvent:
        """The first event putting ``vm`` in ``state`` (consumed, so the next wait finds
        a later one)."""
        async def find() -> DomainEvent:
            while True:
                for i, ev in enumerate(self.seen):
                    if ev.uuid == vm and ev.state is state:
                        del self.seen[: i + 1]
                        return ev
                self._changed.clear()
                await self._changed.wait()
        return await asyncio.wait_for(find(), EVENT_TIMEOUT)

    async def stop(self) -> None:
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)


# --- definition ----------------------------------------------------------------------------


async def test_define_is_idempotent_and_updates_never_start(driver: HypervisorDriver) -> None:
    spec = new_spec(driver, vcpus=2, memory_mb=256)
    assert await driver.get_domain(spec.uuid) is None
    await driver.ensure_defined(spec, [], [])
    await driver.ensure_defined(spec, [], [])  # again: the same one domain
    listed = [d for d in await driver.list_domains() if d.uuid == spec.uuid]
    assert len(listed) == 1 and listed[0].state is DomainState.SHUTOFF
    assert (listed[0].name, listed[0].vcpus, listed[0].memory_mb) == (spec.name, 2, 256)
    # A changed spec replaces the definition, and defining never boots the domain.
    await driver.ensure_defined(spec.model_copy(update={"vcpus": 1}), [], [])
    info = await driver.get_domain(spec.uuid)
    assert info is not None and info.vcpus == 1 and info.state is DomainState.SHUTOFF


async def test_list_and_get_show_only_what_exists(driver: HypervisorDriver) -> None:
    a = await defined(driver)
    b = await defined(driver, running=True)
    states = {d.uuid: d.state for d in await driver.list_domains()}
    assert states[a] is DomainState.SHUTOFF and states[b] is DomainState.RUNNING
    # libvirt's test host ships a domain called "test": not Yun's, never listed.
    assert all(d.name != "test" for d in await driver.list_domains())
    assert await driver.get_domain(str(uuidlib.uuid4())) is None


async def test_undefine_removes_running_or_stopped_and_absent_is_fine(
        driver: HypervisorDriver) -> None:
    stopped = await defined(driver)
    running = await defined(driver, running=True)
    for vm in (stopped, running):
        await driver.undefine(vm)
        assert await driver.get_domain(vm) is None
        await driver.undefine(vm)  # already gone: no error
    assert {stopped, running}.isdisjoint(d.uuid for d in await driver.list_domains())


# --- power ---------------------------------------------------------------------------------


async def test_start_and_destroy_are_idempotent(driver: HypervisorDriver) -> None:
    vm = await defined(driver)
    await driver.start(vm)
    await driver.start(vm)  # already running: left alone
    assert await state(driver, vm) is DomainState.RUNNING
    await driver.destroy(vm)
    await driver.destroy(vm)  # already off: left alone
    assert await state(driver, vm) is DomainState.SHUTOFF
    await driver.start(vm)  # a stopped domain starts again
    assert await state(driver, vm) is DomainState.RUNNING


async def test_shutdown_stops_a_running_domain_and_leaves_a_stopped_one(
        driver: HypervisorDriver) -> None:
    vm = await defined(driver, running=True)
    await driver.shutdown(vm, timeout=5)
    assert await state(driver, vm) is DomainState.SHUTOFF
    await driver.shutdown(vm, timeout=5)
    assert await state(driver, vm) is DomainState.SHUTOFF
    # timeout 0: no grace, off at once.
    await driver.start(vm)
    await driver.shutdown(vm, timeout=0)
    assert await state(driver, vm) is DomainState.SHUTOFF


async def test_reboot_restarts_a_running_domain(driver: HypervisorDriver) -> None:
    vm = await defined(driver, running=True)
    await driver.reboot(vm)
    assert await state(driver, vm) is DomainState.RUNNING


async def test_reboot_of_a_stopped_domain_is_refused_and_leaves_it_stopped(
        driver: HypervisorDriver) -> None:
    """The divergence this suite was made for: libvirt used to start the domain, sim
    refused. Both refuse now, saying what to do, and the domain stays off."""
    vm = await defined(driver)
    with pytest.raises(DomainNotRunning, match=rf"{vm}.*shutoff, not running.*start it"):
        await driver.reboot(vm)
    assert await state(driver, vm) is DomainState.SHUTOFF
    await driver.start(vm)
    await driver.destroy(vm)
    with pytest.raises(DomainNotRunning):
        await driver.reboot(vm)
    assert await state(driver, vm) is DomainState.SHUTOFF


@pytest.mark.parametrize("op", ["start", "destroy", "reboot", "console"])
async def test_operations_on_an_unknown_domain_say_not_found(
        driver: HypervisorDriver, op: str) -> None:
    vm = str(uuidlib.uuid4())
    with pytest.raises(DomainNotFound, match=vm):
        await getattr(driver, op)(vm)
    with pytest.raises(DomainNotFound, match=vm):
        await driver.shutdown(vm, timeout=1)
    # DomainNotFound is a HypervisorError: callers catching the family see it too.
    assert issubclass(DomainNotFound, HypervisorError)


# --- events ----------------------------------------------------------------------------------


async def test_events_follow_each_state_change(driver: HypervisorDriver) -> None:
    watch = EventWatch(driver)
    try:
        vm = await defined(driver)
        await driver.start(vm)
        assert (await watch.wait(vm, DomainState.RUNNING)).uuid == vm
        await driver.destroy(vm)
        await watch.wait(vm, DomainState.SHUTOFF)
        await driver.start(vm)
        await watch.wait(vm, DomainState.RUNNING)
        await driver.undefine(vm)  # running: stopped, then gone
        await watch.wait(vm, DomainState.SHUTOFF)
        await watch.wait(vm, DomainState.ABSENT)
    finally:
        await watch.stop()


# --- host and console --------------------------------------------------------------------


async def test_host_info_is_sane(driver: HypervisorDriver) -> None:
    host = await driver.host_info()
    assert host.hostname and host.vcpus > 0 and host.memory_mb > 0
    assert host.accel in ("kvm", "tcg", "sim")
    assert 0 <= host.memory_used_mb <= host.memory_mb
    assert 0.0 <= host.cpu_load <= 1.0
    assert (await driver.host_info()).memory_mb == host.memory_mb  # stable between calls


async def test_console_of_a_defined_domain(driver: HypervisorDriver) -> None:
    vm = await defined(driver, running=True)
    info = await driver.console(vm)
    assert info.vnc_port is None or info.vnc_port > 0
    assert isinstance(await driver.console_log(vm), str)
    assert len(await driver.console_log(vm, max_bytes=10)) <= 10


async def test_qos_is_kept_in_the_definition_and_read_back(driver: HypervisorDriver) -> None:
    from yun.proto.messages import CpuQos, QosSpec

    assert driver.caps.qos_cpu and driver.caps.qos_disk and driver.caps.qos_net
    vm = await defined(driver, qos=QosSpec(cpu=CpuQos.HIGH))
    info = await driver.get_domain(vm)
    assert info is not None and info.qos is not None and info.qos.cpu is CpuQos.HIGH
    # No disk limit here: this domain has no disk to carry one (every VM has a root disk;
    # disk limits on real disks are held in tests/system/test_qos.py).
    wanted = QosSpec(cpu=CpuQos.LOW, bandwidth_kbit=10_000)
    await driver.set_qos(vm, wanted)
    info = await driver.get_domain(vm)
    assert info is not None and info.qos == wanted  # read back, not echoed
    await driver.set_qos(vm, QosSpec())  # back to unlimited, medium
    info = await driver.get_domain(vm)
    assert info is not None and info.qos == QosSpec()
    with pytest.raises(DomainNotFound):
        await driver.set_qos(str(uuidlib.uuid4()), wanted)


# --- NIC hot-plug (U-HOTPLUG) ----------------------------------------------------------------


def resolved_nic(n: int) -> ResolvedNic:
    """A sandbox-style NIC (a tap made by the network backend) numbered ``n``."""
    return ResolvedNic(nic_id=f"nic{n}", mac=f"52:54:00:c0:00:{n:02x}", bridge=None,
                       tap=f"ysct{n}")


async def macs(driver: HypervisorDriver, vm: str) -> list[str]:
    info = await driver.get_domain(vm)
    assert info is not None
    return list(info.nics)


async def test_nic_plugged_into_a_stopped_domain_is_there_at_boot(
        driver: HypervisorDriver) -> None:
    assert driver.caps.hotplug_nic
    spec = new_spec(driver)
    first, second = resolved_nic(0), resolved_nic(1)
    await driver.ensure_defined(spec, [], [first])
    await driver.attach_nic(spec.uuid, second)
    await driver.attach_nic(spec.uuid, second)  # again: still one such NIC
    assert await macs(driver, spec.uuid) == [first.mac, second.mac]
    assert await state(driver, spec.uuid) is DomainState.SHUTOFF  # plugging never boots
    await driver.start(spec.uuid)
    assert await macs(driver, spec.uuid) == [first.mac, second.mac]
    await driver.destroy(spec.uuid)
    await driver.detach_nic(spec.uuid, second.nic_id)
    await driver.detach_nic(spec.uuid, second.nic_id)  # gone already: fine
    await driver.detach_nic(spec.uuid, "never-plugged")
    assert await macs(driver, spec.uuid) == [first.mac]
    await driver.start(spec.uuid)
    assert await macs(driver, spec.uuid) == [first.mac]
    for call in (driver.attach_nic(str(uuidlib.uuid4()), second),
                 driver.detach_nic(str(uuidlib.uuid4()), second.nic_id)):
        with pytest.raises(DomainNotFound):
            await call


async def test_nic_hot_plugged_into_a_running_domain_stays_after_a_restart(
        driver: HypervisorDriver) -> None:
    spec = new_spec(driver)
    first, second = resolved_nic(2), resolved_nic(3)
    await driver.ensure_defined(spec, [], [first])
    await driver.start(spec.uuid)
    if driver.name == "libvirt":
        # libvirt's test:/// hypervisor cannot attach devices to a running domain: the
        # driver says so with NotSupported and changes nothing (a NIC plugged into a
        # real QEMU guest: tests/system/test_sandbox_network.py).
        with pytest.raises(NotSupported):
            await driver.attach_nic(spec.uuid, second)
        assert await macs(driver, spec.uuid) == [first.mac]
        return
    await driver.attach_nic(spec.uuid, second)
    assert await macs(driver, spec.uuid) == [first.mac, second.mac]
    assert await state(driver, spec.uuid) is DomainState.RUNNING
    await driver.destroy(spec.uuid)  # live and in the definition: the next boot has it
    await driver.start(spec.uuid)
    assert await macs(driver, spec.uuid) == [first.mac, second.mac]
    await driver.detach_nic(spec.uuid, second.nic_id)
    assert await macs(driver, spec.uuid) == [first.mac]
    await driver.destroy(spec.uuid)
    await driver.start(spec.uuid)
    assert await macs(driver, spec.uuid) == [first.mac]


# --- disks: hot-plug, online resize, CD drive, live copy (U-HOTPLUG, F-ISO, F-IMAGE) --------


def disk_file(tmp_path: Path, name: str, size: int = 1 << 20) -> Path:
    """A raw disk file of ``size`` bytes (no QEMU opens it: test:/// and sim only)."""
    path = tmp_path / name
    with path.open("wb") as f:
        f.truncate(size)
    return path


def root_disk(tmp_path: Path) -> ResolvedDisk:
    return ResolvedDisk("root", disk_file(tmp_path, "root.raw"), "raw")


async def disk_ids(driver: HypervisorDriver, vm: str) -> list[str]:
    info = await driver.get_domain(vm)
    assert info is not None
    return list(info.disks)


async def test_disk_plugged_into_a_stopped_domain_is_there_at_boot(
        driver: HypervisorDriver, tmp_path: Path) -> None:
    assert driver.caps.hotplug_disk
    spec = new_spec(driver)
    data = ResolvedDisk("data-1", disk_file(tmp_path, "data.raw"), "raw")
    await driver.ensure_defined(spec, [root_disk(tmp_path)], [])
    assert await disk_ids(driver, spec.uuid) == ["root"]
    await driver.attach_disk(spec.uuid, data)
    await driver.attach_disk(spec.uuid, data)  # again: still one such disk
    assert await disk_ids(driver, spec.uuid) == ["root", "data-1"]
    assert await state(driver, spec.uuid) is DomainState.SHUTOFF  # plugging never boots
    await driver.start(spec.uuid)
    assert await disk_ids(driver, spec.uuid) == ["root", "data-1"]
    await driver.destroy(spec.uuid)
    await driver.detach_disk(spec.uuid, "data-1")
    await driver.detach_disk(spec.uuid, "data-1")  # gone already: fine
    await driver.detach_disk(spec.uuid, "never-plugged")
    assert await disk_ids(driver, spec.uuid) == ["root"]
    # A second disk takes the place the first one left, and a third the next one.
    await driver.attach_disk(spec.uuid, data)
    await driver.attach_disk(spec.uuid, ResolvedDisk("data-2", disk_file(tmp_path, "d2"), "raw"))
    assert await disk_ids(driver, spec.uuid) == ["root", "data-1", "data-2"]
    for call in (driver.attach_disk(str(uuidlib.uuid4()), data),
                 driver.detach_disk(str(uuidlib.uuid4()), "data-1")):
        with pytest.raises(DomainNotFound):
            await call


async def test_disk_hot_plugged_into_a_running_domain_stays_after_a_restart(
        driver: HypervisorDriver, tmp_path: Path) -> None:
    spec = new_spec(driver)
    data = ResolvedDisk("data", disk_file(tmp_path, "data.raw"), "raw")
    await driver.ensure_defined(spec, [root_disk(tmp_path)], [])
    await driver.start(spec.uuid)
    if driver.name == "libvirt":
        # test:/// cannot attach devices to a running domain: NotSupported, nothing
        # changed (a disk plugged into a real QEMU guest: tests/system/test_disk_hotplug.py).
        with pytest.raises(NotSupported):
            await driver.attach_disk(spec.uuid, data)
        assert await disk_ids(driver, spec.uuid) == ["root"]
        await driver.destroy(spec.uuid)
        assert await disk_ids(driver, spec.uuid) == ["root"]  # not in the definition either
        return
    await driver.attach_disk(spec.uuid, data)
    assert await disk_ids(driver, spec.uuid) == ["root", "data"]
    await driver.destroy(spec.uuid)  # live and in the definition: the next boot has it
    await driver.start(spec.uuid)
    assert await disk_ids(driver, spec.uuid) == ["root", "data"]
    await driver.detach_disk(spec.uuid, "data")
    assert await disk_ids(driver, spec.uuid) == ["root"]
    await driver.destroy(spec.uuid)
    await driver.start(spec.uuid)
    assert await disk_ids(driver, spec.uuid) == ["root"]


async def test_online_resize_grows_only_a_running_domain_disk(
        driver: HypervisorDriver, tmp_path: Path) -> None:
    spec = new_spec(driver)
    await driver.ensure_defined(spec, [root_disk(tmp_path)], [])
    with pytest.raises(DomainNotRunning, match="not running"):
        await driver.resize_disk(spec.uuid, "root", 4 << 20)
    await driver.start(spec.uuid)
    with pytest.raises(HypervisorError, match="no disk 'nope'"):
        await driver.resize_disk(spec.uuid, "nope", 4 << 20)
    # Smaller than the disk (1 MiB here, 1 TiB as test:/// reports every disk): refused.
    with pytest.raises(HypervisorError, match="only growing"):
        await driver.resize_disk(spec.uuid, "root", 512 << 10)
    bigger = 4 << 40
    if driver.name == "libvirt":
        # test:/// cannot resize block devices: refused, never a silent success (the
        # guest seeing the new size on real QEMU: tests/system/test_disk_hotplug.py).
        with pytest.raises(NotSupported):
            await driver.resize_disk(spec.uuid, "root", bigger)
        return
    await driver.resize_disk(spec.uuid, "root", bigger)
    await driver.resize_disk(spec.uuid, "root", bigger)  # the same size: fine
    with pytest.raises(HypervisorError, match="only growing"):
        await driver.resize_disk(spec.uuid, "root", bigger - 1)
    with pytest.raises(DomainNotFound):
        await driver.resize_disk(str(uuidlib.uuid4()), "root", bigger)


async def test_cd_drive_media_and_seed(driver: HypervisorDriver, tmp_path: Path) -> None:
    """A CD drive with an ISO from the image cache (``<image id>.iso``) and the cloud-init
    seed: neither is listed among the disks; the ISO's image id is reported; the medium
    changes in the definition of a stopped domain."""
    image_a, image_b = str(uuidlib.uuid4()), str(uuidlib.uuid4())
    iso_a = disk_file(tmp_path, f"{image_a}.iso")
    iso_b = disk_file(tmp_path, f"{image_b}.iso")
    seed = ResolvedDisk(SEED_DISK_ID, disk_file(tmp_path, "seed.iso"), "raw",
                        device="cdrom", read_only=True)
    cdrom = ResolvedDisk("cdrom", iso_a, "raw", device="cdrom", read_only=True)
    spec = new_spec(driver, boot="cdrom")
    await driver.ensure_defined(spec, [root_disk(tmp_path), cdrom, seed], [])
    info = await driver.get_domain(spec.uuid)
    assert info is not None and info.disks == ["root"] and info.cdrom_image == image_a
    await driver.change_media(spec.uuid, "cdrom", None)
    await driver.change_media(spec.uuid, "cdrom", None)  # empty already: fine
    info = await driver.get_domain(spec.uuid)
    assert info is not None and info.cdrom_image is None
    await driver.change_media(spec.uuid, "cdrom", iso_b)
    info = await driver.get_domain(spec.uuid)
    assert info is not None and info.cdrom_image == image_b and info.disks == ["root"]
    with pytest.raises(HypervisorError, match="not a CD drive"):
        await driver.change_media(spec.uuid, "root", iso_a)
    with pytest.raises(HypervisorError, match="no CD drive 'cd9'"):
        await driver.change_media(spec.uuid, "cd9", iso_a)
    with pytest.raises(HypervisorError, match="CD drive"):
        await driver.detach_disk(spec.uuid, "cdrom")
    # Booted (from the CD), the drive keeps its medium; a live change is the guest's
    # business on real QEMU (tests/system/test_disk_hotplug.py).
    await driver.start(spec.uuid)
    info = await driver.get_domain(spec.uuid)
    assert info is not None and info.cdrom_image == image_b
    if driver.name == "libvirt":
        with pytest.raises(NotSupported):
            await driver.change_media(spec.uuid, "cdrom", iso_a)
    else:
        await driver.change_media(spec.uuid, "cdrom", iso_a)
        info = await driver.get_domain(spec.uuid)
        assert info is not None and info.cdrom_image == image_a


async def test_boot_from_cdrom_needs_a_cd_drive(driver: HypervisorDriver,
                                                tmp_path: Path) -> None:
    spec = new_spec(driver, boot="cdrom")
    with pytest.raises(HypervisorError, match="CD drive"):
        await driver.ensure_defined(spec, [root_disk(tmp_path)], [])
    assert await driver.get_domain(spec.uuid) is None


async def test_live_copy_of_a_disk(driver: HypervisorDriver, tmp_path: Path) -> None:
    root = root_disk(tmp_path)
    root.path.write_bytes(b"yun-root" * 1024)  # type: ignore[union-attr]
    spec = new_spec(driver)
    await driver.ensure_defined(spec, [root], [])
    target = tmp_path / "copy.qcow2"
    with pytest.raises(DomainNotRunning, match="not running"):
        await driver.backup_disk(spec.uuid, "root", target)
    await driver.start(spec.uuid)
    with pytest.raises(HypervisorError, match="no disk 'nope'"):
        await driver.backup_disk(spec.uuid, "nope", target)
    if driver.name == "libvirt":
        # test:/// has no backup jobs (the real one is exercised on QEMU in
        # tests/system/test_disk_hotplug.py).
        with pytest.raises(NotSupported):
            await driver.backup_disk(spec.uuid, "root", target)
        assert not target.exists()
        return
    await driver.backup_disk(spec.uuid, "root", target)
    assert target.read_bytes() == root.path.read_bytes()  # type: ignore[union-attr]
