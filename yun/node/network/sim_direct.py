"""The simulated direct network: the same contract as the real one, in memory.

It refuses what the real backend refuses (the checks are the same function,
:func:`~yun.node.network.direct.plan_direct_port`) and stands in for the LAN's DHCP
server: :meth:`SimDirectBackend.learned` reports for each port an address of the
simulated LAN, chosen from a hash of its MAC (the same MAC gets the same address on
every run; two ports never get the same one, and a port keeps its lease). The LAN's first host is
its router and DHCP server and is never handed out.

Given a state file (see :mod:`yun.node.hypervisor.sim.hostfile`), its ports outlive its
process, section ``direct_ports`` keyed by MAC.
"""

from __future__ import annotations

import hashlib
import ipaddress
from dataclasses import asdict
from pathlib import Path
from typing import Any

from yun.node.hypervisor.base import ResolvedNic
from yun.node.hypervisor.sim.hostfile import SimHostFile, host_file
from yun.node.network.base import NetworkBackend, NetworkError
from yun.node.network.direct import DirectPort, plan_direct_port
from yun.node.network.ports import check_vm_uuid
from yun.proto.messages import NicSpec
from yun.proto.network import LearnedAddress, NicNetwork, SandboxSettings

SECTION = "direct_ports"


def lan_lease(lan: ipaddress.IPv4Network, mac: str, taken: set[str]) -> str:
    """The address the simulated LAN DHCP server gives ``mac``: the host its hash points
    at, or the next one not in ``taken``. Raises :class:`NetworkError` when the LAN is
    full."""
    hosts = list(lan.hosts())[1:]  # the first host is the LAN's router / DHCP server
    start = int.from_bytes(hashlib.sha256(mac.encode()).digest()[:8], "big") % len(hosts)
    for step in range(len(hosts)):
        address = str(hosts[(start + step) % len(hosts)])
        if address not in taken:
            return address
    raise NetworkError(f"the simulated LAN {lan} has no free address for MAC {mac}")


class SimDirectBackend(NetworkBackend):
    """An in-memory direct network on a simulated LAN."""

    kind = NicNetwork.DIRECT

    def __init__(self, lan: str = "192.168.77.0/24",
                 state_file: Path | SimHostFile | None = None) -> None:
        try:
            self.lan = ipaddress.IPv4Network(lan, strict=False)
        except ValueError as exc:
            raise NetworkError(f"simulated LAN {lan!r}: {exc}") from exc
        if self.lan.num_addresses < 4:
            raise NetworkError(f"simulated LAN {lan}: too small for a router and a VM")
        self.ports: dict[str, list[DirectPort]] = {}
        #: the simulated LAN DHCP server's leases, MAC → address.
        self.leases: dict[str, str] = {}
        #: taps that "exist" on the node (joined to the simulated bridge).
        self.taps: set[str] = set()
        self.network_ready = False
        self._file = host_file(state_file)
        if self._file is not None:
            for mac, data in self._file.section(SECTION).items():
                self.ports.setdefault(data["vm_uuid"], []).append(
                    DirectPort(nic_id=data["nic_id"], mac=mac, tap=data["tap"]))
                if data.get("ip"):
                    self.leases[mac] = data["ip"]
                self.taps.add(data["tap"])

    def _save(self) -> None:
        if self._file is not None:
            self._file.save("direct", self._sections)

    def _sections(self) -> dict[str, dict[str, Any]]:
        section = {}
        for vm, records in self.ports.items():
            for p in records:
                data = asdict(p)
                mac = data.pop("mac")
                section[mac] = {"vm_uuid": vm, "ip": self.leases.get(mac), **data}
        return {SECTION: section}

    async def ensure_network(self, settings: SandboxSettings | None = None) -> None:
        self.network_ready = True

    async def ensure_port(self, vm_uuid: str, nic: NicSpec) -> ResolvedNic:
        port, records = plan_direct_port(self.ports, vm_uuid, nic)
        old = [p for p in self.ports.get(vm_uuid, []) if p.nic_id == port.nic_id]
        freed = {p.mac for p in old if p.mac != port.mac}
        lease = self.leases.get(port.mac) or lan_lease(
            self.lan, port.mac, {ip for mac, ip in self.leases.items() if mac not in freed})
        self.ports[vm_uuid] = records
        for p in old:
            self.taps.discard(p.tap)
        for mac in freed:
            self.leases.pop(mac, None)
        self.taps.add(port.tap)
        self.leases[port.mac] = lease
        self._save()
        return ResolvedNic(nic_id=port.nic_id, mac=port.mac, bridge=None, tap=port.tap)

    async def release_port(self, vm_uuid: str, nic_id: str) -> None:
        self._release(vm_uuid, nic_id)

    async def release_ports(self, vm_uuid: str) -> None:
        self._release(vm_uuid, None)

    def _release(self, vm_uuid: str, nic_id: str | None) -> None:
        check_vm_uuid(vm_uuid)
        records = self.ports.get(vm_uuid, [])
        gone = [p for p in records if nic_id is None or p.nic_id == nic_id]
        if not gone:
            return
        for p in gone:
            self.taps.discard(p.tap)
            self.leases.pop(p.mac, None)
        kept = [p for p in records if p not in gone]
        if kept:
            self.ports[vm_uuid] = kept
        else:
            self.ports.pop(vm_uuid, None)
        self._save()

    async def vm_ports(self) -> dict[str, list[str]]:
        return {vm: [p.mac for p in ps] for vm, ps in self.ports.items()}

    async def learned(self) -> list[LearnedAddress]:
        return [LearnedAddress(mac=mac, ip=ip) for mac, ip in sorted(self.leases.items())]

    async def teardown(self) -> None:
        self.ports.clear()
        self.taps.clear()
        self.leases.clear()
        self.network_ready = False
        self._save()
