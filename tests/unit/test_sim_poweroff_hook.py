"""The sim driver's test hook for hosts in another process: ``sim-poweroff`` beside the
state file switches the named running domains off at the next listing, with no event."""

from __future__ import annotations

import uuid
from pathlib import Path

from yun.node.hypervisor.sim.driver import POWEROFF_FILE, SimDriver
from yun.node.hypervisor.sim.hostfile import FILE_NAME, SimHostFile
from yun.proto.messages import DomainSpec, DomainState


async def running(driver: SimDriver) -> str:
    vm = str(uuid.uuid4())
    await driver.ensure_defined(DomainSpec(uuid=vm, name="vm", vcpus=1, memory_mb=256),
                                [], [])
    await driver.start(vm)
    return vm


async def test_poweroff_file_switches_named_domains_off_silently(tmp_path: Path) -> None:
    driver = SimDriver(state_file=tmp_path / FILE_NAME)
    a, b = await running(driver), await running(driver)
    while not driver._events.empty():  # the starts' events: not what is tested
        driver._events.get_nowait()
    request = tmp_path / POWEROFF_FILE
    assert driver.poweroff_file == request
    # An unknown uuid is skipped (logged), the others still apply.
    request.write_text(f"{a}\n{uuid.uuid4()}\n")

    states = {d.uuid: d.state for d in await driver.list_domains()}

    assert states == {a: DomainState.SHUTOFF, b: DomainState.RUNNING}
    assert not request.exists()  # consumed: the next listing changes nothing
    assert driver._events.empty()  # behind the agent's back: no event
    # Persisted like any change (a restarted host would remember it).
    assert SimHostFile(tmp_path / FILE_NAME).section("domains")[a]["state"] == "shutoff"
    assert {d.uuid: d.state for d in await driver.list_domains()}[a] is DomainState.SHUTOFF


async def test_no_state_file_no_hook() -> None:
    driver = SimDriver()
    vm = await running(driver)
    assert driver.poweroff_file is None
    assert [d.state for d in await driver.list_domains() if d.uuid == vm] == [
        DomainState.RUNNING]
