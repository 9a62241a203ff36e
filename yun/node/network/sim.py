"""The simulated node-local NAT network: the same contract, in memory.

Used for many simulated nodes in one process, so it starts no thread, no process and
touches no file; it refuses exactly the ports the real backend refuses (the checks are
shared with :mod:`.nat`). ``fail_next("ensure_port")`` makes the next call of that
method raise, for testing rollbacks.

Given a state file (see :mod:`yun.node.hypervisor.sim.hostfile`), its leases outlive its
process, as dnsmasq's hosts files do on a real node; without one they live in memory.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from yun.node.hypervisor.base import ResolvedNic
from yun.node.hypervisor.sim.hostfile import SimHostFile
from yun.node.network.base import NatNetwork, NetworkBackend, NetworkError
from yun.node.network.dnsmasq import PortRecord
from yun.node.network.nat import check_vm_uuid, parse_network, plan_port
from yun.proto.messages import NicSpec

_METHODS = ("ensure_network", "ensure_port", "release_ports", "vm_ports", "teardown")


class SimNetworkBackend(NetworkBackend):
    """An in-memory NAT network: a "bridge", leases and taps as dictionaries."""

    def __init__(self, bridge: str = "yunbr0", subnet: str = "10.77.0.0/24",
                 state_file: Path | None = None) -> None:
        self.network = parse_network(bridge, subnet)
        self.up = False
        self.ports: dict[str, list[PortRecord]] = {}
        #: taps that "exist" on the node; the hypervisor simulator may add to it.
        self.taps: set[str] = set()
        self._fail: dict[str, tuple[str, int]] = {}
        self._file = SimHostFile(state_file) if state_file is not None else None
        if self._file is not None:
            for mac, data in self._file.section("ports").items():
                self.ports.setdefault(data["vm_uuid"], []).append(PortRecord(
                    nic_id=data["nic_id"], mac=mac, ip=data["ip"],
                    hostname=data["hostname"], tap=data["tap"]))

    def _save(self) -> None:
        """Write every lease to the host's state file (when it has one)."""
        if self._file is None:
            return
        ports: dict[str, Any] = {
            r.mac: {"vm_uuid": vm, "ip": r.ip, "nic_id": r.nic_id, "hostname": r.hostname,
                    "tap": r.tap}
            for vm, records in self.ports.items() for r in records}
        self._file.write({"ports": ports})

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

    async def ensure_network(self) -> NatNetwork:
        self._maybe_fail("ensure_network")
        self.up = True
        return self.network

    async def ensure_port(self, vm_uuid: str, nic: NicSpec) -> ResolvedNic:
        self._maybe_fail("ensure_port")
        rec, records = plan_port(self.network, self.ports, vm_uuid, nic)
        self.ports[vm_uuid] = records
        self._save()
        return ResolvedNic(nic_id=rec.nic_id, mac=rec.mac, bridge=self.network.bridge,
                           tap=rec.tap)

    async def release_ports(self, vm_uuid: str) -> None:
        self._maybe_fail("release_ports")
        check_vm_uuid(vm_uuid)
        records = self.ports.pop(vm_uuid, [])
        for rec in records:
            self.taps.discard(rec.tap)
        if records:
            self._save()

    async def vm_ports(self) -> dict[str, list[str]]:
        self._maybe_fail("vm_ports")
        return {vm: [r.mac for r in recs] for vm, recs in self.ports.items()}

    async def teardown(self) -> None:
        self._maybe_fail("teardown")
        self.up = False
        self.ports.clear()
        self.taps.clear()
        self._save()
