"""The checks of sandbox ports and node forwards, shared by the real backend and its
simulated twin so that both refuse exactly the same requests with the same words.

Pure: no netlink, no nftables, no file.
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
from collections.abc import Iterator, Mapping, Sequence
from typing import Protocol, TypeVar

from yun.node.network.base import NetworkError
from yun.node.network.dnsmasq import PortRecord
from yun.proto.messages import NicSpec
from yun.proto.network import NicNetwork, NodeForward, SandboxSettings

#: Sandbox taps: "ys" + 10 hex digits = 12 characters (Linux allows 15).
TAP_PREFIX = "ys"
_VM_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,127}$")


def check_vm_uuid(vm_uuid: str) -> None:
    """A VM uuid names files and rules on the node: refuse anything path-like."""
    if not _VM_RE.match(vm_uuid):
        raise NetworkError(f"bad VM uuid {vm_uuid!r}: letters, digits, '-' and '_' only")


def tap_name(nic_id: str, prefix: str = TAP_PREFIX) -> str:
    """The tap of a NIC: deterministic, ≤ 15 characters, the same on every retry.

    The prefix + the first 10 hex digits of a uuid-like NIC id (an operator can read the
    NIC back from the tap), or of a hash of any other id."""
    digits = re.sub(r"[^0-9a-f]", "", nic_id.lower())
    if len(digits) < 10 or len(digits) != len(nic_id.replace("-", "")):
        digits = hashlib.sha256(nic_id.encode()).hexdigest()
    return prefix + digits[:10]


def hostname_for(vm_uuid: str) -> str:
    """The hostname dnsmasq offers a VM without one: ``vm-`` + the start of its uuid."""
    return "vm-" + "".join(c for c in vm_uuid.lower() if c.isalnum())[:12]


def plan_port(settings: SandboxSettings | None, ports: Mapping[str, Sequence[PortRecord]],
              vm_uuid: str, nic: NicSpec) -> tuple[PortRecord, list[PortRecord]]:
    """Validate ``nic`` against the node's settings (None: not known yet, addresses not
    checked against the subnet) and every port of the node.

    Returns its record and the VM's records with it added or replaced (same NIC id)."""
    check_vm_uuid(vm_uuid)
    where = f"NIC {nic.nic_id} of VM {vm_uuid}"
    if nic.network != NicNetwork.SANDBOX:
        raise NetworkError(f"{where} is in the {nic.network} network, not the sandbox")
    if not nic.ip:
        raise NetworkError(f"{where}: a sandbox NIC needs an address")
    for ip in (nic.ip, *nic.extra_ips):
        try:
            address = ipaddress.IPv4Address(ip)
        except ValueError as exc:
            raise NetworkError(f"{where}: {ip!r} is not an IPv4 address") from exc
        if settings is None:
            continue
        subnet = ipaddress.IPv4Network(settings.subnet)
        if (address not in subnet or address in (subnet.network_address,
                                                 subnet.broadcast_address)
                or ip == settings.gateway):
            raise NetworkError(f"{where}: {ip} is not a VM address of the node's sandbox "
                               f"subnet {subnet}")
    rec = PortRecord(nic_id=nic.nic_id, mac=nic.mac, ip=nic.ip,
                     hostname=nic.hostname or hostname_for(vm_uuid), tap=tap_name(nic.nic_id),
                     exposure=str(nic.exposure), extra_ips=tuple(nic.extra_ips))
    for other_vm, other in other_ports(ports, vm_uuid, rec, where):
        taken = {other.ip, *other.extra_ips} & {rec.ip, *rec.extra_ips}
        if taken:
            raise NetworkError(f"{where}: address {sorted(taken)[0]} is already held by "
                               f"NIC {other.nic_id} of VM {other_vm}")
    mine = [r for r in ports.get(vm_uuid, []) if r.nic_id != rec.nic_id]
    return rec, [*mine, rec]


class _Port(Protocol):
    @property
    def nic_id(self) -> str: ...

    @property
    def mac(self) -> str: ...


P = TypeVar("P", bound=_Port)


def other_ports(ports: Mapping[str, Sequence[P]], vm_uuid: str, port: _Port, where: str
                ) -> Iterator[tuple[str, P]]:
    """Every port of the node but ``port`` itself (the same NIC of the same VM), with its
    VM; refuses (NetworkError naming ``where``) when one holds ``port``'s MAC."""
    for other_vm, records in ports.items():
        for other in records:
            if other_vm == vm_uuid and other.nic_id == port.nic_id:
                continue
            if other.mac == port.mac:
                raise NetworkError(f"{where}: MAC {port.mac} is already used by NIC "
                                   f"{other.nic_id} of VM {other_vm}")
            yield other_vm, other


def check_forwards(vm_uuid: str, forwards: Sequence[NodeForward],
                   vm_ports: Sequence[PortRecord],
                   others: Mapping[str, Sequence[NodeForward]]) -> None:
    """Refuse node forwards to an address the VM does not hold here, or of a node port
    another VM's forward (``others``) or this request already uses."""
    check_vm_uuid(vm_uuid)
    mine = {ip for r in vm_ports for ip in (r.ip, *r.extra_ips)}
    seen: set[tuple[str, int]] = set()
    for f in forwards:
        if f.vm_ip not in mine:
            raise NetworkError(f"forward of port {f.node_port} to {f.vm_ip}:{f.vm_port}: "
                               f"{f.vm_ip} is not an address of VM {vm_uuid} here")
        key = (f.protocol, f.node_port)
        for other_vm, fs in others.items():
            if other_vm != vm_uuid and any((o.protocol, o.node_port) == key for o in fs):
                raise NetworkError(f"node port {f.protocol}/{f.node_port} already forwards "
                                   f"to VM {other_vm}")
        if key in seen:
            raise NetworkError(f"node port {f.protocol}/{f.node_port} given twice for VM "
                               f"{vm_uuid}")
        seen.add(key)
