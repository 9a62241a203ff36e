"""The simulated sandbox network: the same contract as the real one, in memory.

Used for many simulated nodes in one process, so it starts no thread, no process and
touches no file; it refuses what the real backend refuses (an address outside the
node's sandbox subnet, an address or MAC another port holds, a bad VM uuid).
``fail_next("ensure_port")`` makes the next call of that method raise, for testing
rollbacks.

Given a state file (see :mod:`yun.node.hypervisor.sim.hostfile`), its ports outlive its
process, as dnsmasq's hosts files do on a real node; without one they live in memory.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

from yun.node.hypervisor.base import ResolvedNic
from yun.node.hypervisor.sim.hostfile import SimHostFile, host_file
from yun.node.network.base import NetworkBackend, NetworkError
from yun.node.network.dnsmasq import PortRecord
from yun.node.network.ports import check_forwards, check_vm_uuid, plan_port
from yun.proto.messages import NicSpec
from yun.proto.network import NicNetwork, NodeForward, SandboxSettings

_METHODS = ("ensure_network", "ensure_port", "release_port", "release_ports", "vm_ports",
            "set_forwards", "teardown")


class SimSandboxBackend(NetworkBackend):
    """An in-memory sandbox network: ports, forwards and taps as dictionaries."""

    kind = NicNetwork.SANDBOX

    def __init__(self, state_file: Path | SimHostFile | None = None) -> None:
        self.settings: SandboxSettings | None = None
        self.ports: dict[str, list[PortRecord]] = {}
        self.forwards: dict[str, list[NodeForward]] = {}
        #: taps that "exist" on the node; the hypervisor simulator may add to it.
        self.taps: set[str] = set()
        self._fail: dict[str, tuple[str, int]] = {}
        self._file = host_file(state_file)
        if self._file is not None:
            # "ports" is keyed by MAC, as the invariant checker reads it.
            for mac, data in self._file.section("ports").items():
                self.ports.setdefault(data["vm_uuid"], []).append(PortRecord(
                    nic_id=data["nic_id"], mac=mac, ip=data["ip"],
                    hostname=data.get("hostname", ""), tap=data["tap"],
                    exposure=data.get("exposure", "private"),
                    extra_ips=tuple(data.get("extra_ips", ()))))
            for vm, fwds in self._file.section("forwards").items():
                self.forwards[vm] = [NodeForward.model_validate(f) for f in fwds]

    def _save(self) -> None:
        if self._file is not None:
            self._file.save("sandbox", self._sections)

    def _sections(self) -> dict[str, dict[str, Any]]:
        ports: dict[str, Any] = {}
        for vm, records in self.ports.items():
            for p in records:
                data = asdict(p)
                ports[data.pop("mac")] = {"vm_uuid": vm, **data}
        return {
            "ports": ports,
            "forwards": {vm: [f.model_dump(mode="json") for f in fs]
                         for vm, fs in self.forwards.items()}}

    def fail_next(self, method: str, message: str = "injected failure",
                  times: int = 1) -> None:
        """Make the next ``times`` calls of ``method`` raise :class:`NetworkError`."""
        if method not in _METHODS:
            raise ValueError(f"unknown method {method!r}; one of {', '.join(_METHODS)}")
        self._fail[method] = (message, times)

    def clear_faults(self) -> None:
        """Forget every failure armed with :meth:`fail_next`."""
        self._fail.clear()

    def _maybe_fail(self, method: str) -> None:
        armed = self._fail.pop(method, None)
        if armed is None:
            return
        message, times = armed
        if times > 1:
            self._fail[method] = (message, times - 1)
        raise NetworkError(f"{method}: {message}")

    async def ensure_network(self, settings: SandboxSettings | None = None) -> None:
        self._maybe_fail("ensure_network")
        if settings is not None:
            self.settings = settings

    async def ensure_port(self, vm_uuid: str, nic: NicSpec) -> ResolvedNic:
        self._maybe_fail("ensure_port")
        port, records = plan_port(self.settings, self.ports, vm_uuid, nic)
        self.ports[vm_uuid] = records
        self.taps.add(port.tap)
        self._save()
        return ResolvedNic(nic_id=nic.nic_id, mac=nic.mac, bridge=None, tap=port.tap)

    async def release_port(self, vm_uuid: str, nic_id: str) -> None:
        self._maybe_fail("release_port")
        check_vm_uuid(vm_uuid)
        ports = self.ports.get(vm_uuid, [])
        gone = [p for p in ports if p.nic_id == nic_id]
        if not gone:
            return
        for p in gone:
            self.taps.discard(p.tap)
        kept = [p for p in ports if p.nic_id != nic_id]
        if kept:
            self.ports[vm_uuid] = kept
        else:
            self.ports.pop(vm_uuid, None)
        self._save()

    async def release_ports(self, vm_uuid: str) -> None:
        self._maybe_fail("release_ports")
        check_vm_uuid(vm_uuid)
        ports = self.ports.pop(vm_uuid, [])
        for p in ports:
            self.taps.discard(p.tap)
        # Popped first: with ports to drop, an `or` would never get to the forwards.
        forwards = self.forwards.pop(vm_uuid, None)
        if ports or forwards is not None:
            self._save()

    async def vm_ports(self) -> dict[str, list[str]]:
        self._maybe_fail("vm_ports")
        return {vm: [p.mac for p in ps] for vm, ps in self.ports.items()}

    async def set_forwards(self, vm_uuid: str, forwards: list[NodeForward]) -> None:
        self._maybe_fail("set_forwards")
        check_vm_uuid(vm_uuid)
        check_forwards(vm_uuid, forwards, self.ports.get(vm_uuid, []), self.forwards)
        if forwards:
            self.forwards[vm_uuid] = list(forwards)
        else:
            self.forwards.pop(vm_uuid, None)
        self._save()

    async def teardown(self) -> None:
        self._maybe_fail("teardown")
        self.settings = None
        self.ports.clear()
        self.forwards.clear()
        self.taps.clear()
        self._save()


def state_of(backend: SimSandboxBackend) -> dict[str, Any]:
    """What the backend holds, for tests and the invariant checker."""
    return {"ports": {vm: [asdict(p) for p in ps] for vm, ps in backend.ports.items()},
            "forwards": {vm: [f.model_dump() for f in fs]
                         for vm, fs in backend.forwards.items()}}
