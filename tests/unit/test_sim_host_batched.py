"""The sim host state of `yun serve sim-nodes` is written in batches: a burst of changes
of all the host's backends is one write, made without further activity within the flush
delay, and made at once at the node's stop; a restarted host finds all of it."""

from __future__ import annotations

import asyncio
import json
import uuid
from pathlib import Path

from test_sim_host_restart import provision

from yun.node.hypervisor.sim.driver import SimDriver
from yun.node.hypervisor.sim.hostfile import FILE_NAME, SimHostFile
from yun.node.network.sim import SimSandboxBackend
from yun.node.storage.sim import SimDiskBackend
from yun.proto.messages import DomainState


def shared_backends(file: SimHostFile) -> tuple[SimDriver, SimDiskBackend, SimSandboxBackend]:
    return (SimDriver(state_file=file), SimDiskBackend(total_gb=100, state_file=file),
            SimSandboxBackend(state_file=file))


async def test_a_burst_is_one_write_made_within_the_delay(tmp_path: Path) -> None:
    file = SimHostFile(tmp_path / FILE_NAME, flush_delay=0.3)
    driver, disks, net = shared_backends(file)
    vms = [str(uuid.uuid4()) for _ in range(5)]
    for i, vm in enumerate(vms):
        await provision(driver, disks, net, vm, f"10.77.0.{10 + i}", f"52:54:00:00:00:{i:02x}")
    # Dozens of changes of three backends so far, nothing written yet...
    assert file.writes == 0
    assert not file.path.exists()
    # ...and, with nothing else happening, one write of all of them (the bound is 0.3 s;
    # the wait is generous for a loaded machine).
    for _ in range(200):
        if file.writes:
            break
        await asyncio.sleep(0.05)
    assert file.writes == 1
    data = json.loads(file.path.read_text())
    assert sorted(data["domains"]) == sorted(vms)
    assert {p["vm_uuid"] for p in data["ports"].values()} == set(vms)
    assert set(data["vm_files"]) == set(vms)


async def test_stop_flushes_at_once_and_a_restart_finds_it(tmp_path: Path) -> None:
    file = SimHostFile(tmp_path / FILE_NAME, flush_delay=3600)  # only flush() writes
    driver, disks, net = shared_backends(file)
    vm = str(uuid.uuid4())
    await provision(driver, disks, net, vm, "10.77.0.10", "52:54:00:00:00:0a")
    # A reader in the same process sees the change before any timer.
    assert file.read()["domains"][vm]["state"] == "running"
    await driver.destroy(vm)
    file.flush()  # what the node's stop does
    writes = file.writes
    file.flush()  # nothing left: no second write
    assert file.writes == writes
    data = json.loads(file.path.read_text())
    assert data["domains"][vm]["state"] == "shutoff"

    again = SimDriver(state_file=SimHostFile(file.path, flush_delay=0.3))
    assert (await again.get_domain(vm)).state is DomainState.SHUTOFF  # type: ignore[union-attr]


def test_without_a_loop_a_change_is_written_at_once(tmp_path: Path) -> None:
    file = SimHostFile(tmp_path / FILE_NAME, flush_delay=5)
    file.save("x", lambda: {"x": {"a": 1}})
    assert json.loads(file.path.read_text()) == {"x": {"a": 1}}
