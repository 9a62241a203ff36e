"""The node-local NAT network, for real: a Linux bridge, its dnsmasq and its nftables table.

* bridge (pyroute2): named by the settings (``yunbr0``), the subnet's first host as its
  address (the VMs' gateway), up; IPv4 forwarding on in this network namespace;
* DHCP (:mod:`.dnsmasq`): one daemon bound to the bridge, static MAC→IP leases, one
  hosts file per VM — the files are the whole port state, so an agent restart
  loses nothing;
* NAT (:mod:`.nft`): table ``inet yun_nat_<bridge>`` replaced whole, atomically.

Every blocking step runs in a worker thread (:func:`asyncio.to_thread`) so the agent's
event loop keeps serving while netlink, nft or dnsmasq answer.

The validation and planning helpers at the top are shared with the simulated backend
(:mod:`.sim`) so that both refuse exactly the same ports.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import ipaddress
import logging
import re
import socket
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from yun.node.hypervisor.base import ResolvedNic
from yun.node.network import nft
from yun.node.network.base import NetworkBackend, NetworkError
from yun.node.network.dnsmasq import Dnsmasq, DnsmasqConfig, DnsmasqError, PortRecord
from yun.proto.messages import NicSpec
from yun.util.run import CommandError

log = logging.getLogger("yun.node.network.nat")


@dataclass(frozen=True)
class NatNetwork:
    bridge: str
    subnet: str  # e.g. "10.77.0.0/24"
    gateway: str  # e.g. "10.77.0.1"

#: Tap names: "yv" + 10 hex digits = 12 characters (Linux allows 15).
TAP_PREFIX = "yv"
_BRIDGE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,14}$")
# A VM uuid names a file in hosts/: no slash, no leading dot, nothing odd.
_VM_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,127}$")
_IP_FORWARD = Path("/proc/sys/net/ipv4/ip_forward")


# --------------------------------------------------------------------------- validation


def parse_network(bridge: str, subnet: str) -> NatNetwork:
    """Check a bridge name and subnet; the gateway is the subnet's first host."""
    if not _BRIDGE_RE.match(bridge):
        raise NetworkError(
            f"bad bridge name {bridge!r}: 1-15 characters of letters, digits, '_', '.', '-'"
        )
    try:
        net = ipaddress.IPv4Network(subnet, strict=True)
    except ValueError as exc:
        raise NetworkError(f"bad NAT subnet {subnet!r}: {exc}") from exc
    if not 8 <= net.prefixlen <= 29:
        raise NetworkError(
            f"NAT subnet {subnet} must be between /8 and /29 to hold a gateway and VMs"
        )
    return NatNetwork(bridge=bridge, subnet=str(net), gateway=str(net.network_address + 1))


def check_vm_uuid(vm_uuid: str) -> None:
    """A VM uuid names a file of the hosts directory: refuse anything path-like."""
    if not _VM_RE.match(vm_uuid):
        raise NetworkError(f"bad VM uuid {vm_uuid!r}: letters, digits, '-' and '_' only")


def tap_name(nic_id: str) -> str:
    """The tap of a NIC: deterministic, ≤ 15 characters, the same on every retry.

    ``yv`` + the first 10 hex digits of a uuid-like NIC id (an operator can read the
    NIC back from the tap), or of a hash of any other id.
    """
    digits = re.sub(r"[^0-9a-f]", "", nic_id.lower())
    if len(digits) < 10 or len(digits) != len(nic_id.replace("-", "")):
        digits = hashlib.sha256(nic_id.encode()).hexdigest()
    return TAP_PREFIX + digits[:10]


def hostname_for(vm_uuid: str) -> str:
    """The hostname dnsmasq offers a VM: ``vm-`` + the start of its uuid."""
    return "vm-" + re.sub(r"[^a-z0-9]", "", vm_uuid.lower())[:12]


def validate_port(network: NatNetwork, vm_uuid: str, nic: NicSpec) -> PortRecord:
    """The record of ``nic``, or :class:`NetworkError` saying what is wrong with it."""
    check_vm_uuid(vm_uuid)
    if not nic.nic_id:
        raise NetworkError(f"VM {vm_uuid}: NIC without an id")
    net = ipaddress.IPv4Network(network.subnet)
    try:
        ip = ipaddress.IPv4Address(nic.ip)
    except ValueError as exc:
        raise NetworkError(f"NIC {nic.nic_id} of VM {vm_uuid}: {nic.ip!r} is not an "
                           f"IPv4 address") from exc
    where = f"NIC {nic.nic_id} of VM {vm_uuid}: address {ip}"
    if ip not in net:
        raise NetworkError(f"{where} is outside the NAT subnet {net} of {network.bridge}")
    if ip == net.network_address:
        raise NetworkError(f"{where} is the network address of {net}")
    if ip == net.broadcast_address:
        raise NetworkError(f"{where} is the broadcast address of {net}")
    if str(ip) == network.gateway:
        raise NetworkError(f"{where} is the gateway of {net} (the bridge {network.bridge})")
    mac = nic.mac.lower()
    if int(mac.split(":")[0], 16) & 1:
        raise NetworkError(f"NIC {nic.nic_id} of VM {vm_uuid}: MAC {mac} is multicast")
    return PortRecord(nic_id=nic.nic_id, mac=mac, ip=str(ip),
                      hostname=nic.hostname or hostname_for(vm_uuid),
                      tap=tap_name(nic.nic_id))


def plan_port(
    network: NatNetwork,
    ports: dict[str, list[PortRecord]],
    vm_uuid: str,
    nic: NicSpec,
) -> tuple[PortRecord, list[PortRecord]]:
    """Validate ``nic`` against every port of the node.

    Returns its record and the VM's records with it added or replaced (same NIC id).
    Another port holding the same IP or MAC is an error naming that port.
    """
    rec = validate_port(network, vm_uuid, nic)
    for other_vm, records in ports.items():
        for other in records:
            if other_vm == vm_uuid and other.nic_id == rec.nic_id:
                continue
            owner = f"NIC {other.nic_id or '?'} of VM {other_vm}"
            if other.ip == rec.ip:
                raise NetworkError(
                    f"NIC {rec.nic_id} of VM {vm_uuid}: address {rec.ip} is already "
                    f"leased to {owner}")
            if other.mac == rec.mac:
                raise NetworkError(
                    f"NIC {rec.nic_id} of VM {vm_uuid}: MAC {rec.mac} is already used by "
                    f"{owner}")
    mine = [r for r in ports.get(vm_uuid, []) if r.nic_id != rec.nic_id]
    return rec, [*mine, rec]


# --------------------------------------------------------------------------- netlink


def _iproute() -> Any:
    # Imported here: the simulated backend shares this module's helpers and needs
    # no netlink.
    from pyroute2 import IPRoute

    return IPRoute()


def _netlink_error() -> type[Exception]:
    from pyroute2 import NetlinkError

    return NetlinkError  # type: ignore[no-any-return,unused-ignore]


def _link_kind(link: Any) -> str | None:
    info = link.get_attr("IFLA_LINKINFO")
    return info.get_attr("IFLA_INFO_KIND") if info is not None else None


def ensure_bridge(bridge: str, gateway: str, prefixlen: int) -> str:
    """The bridge exists, holds the gateway address and is up.

    Returns ``"created"``, ``"changed"`` (address added or brought up) or ``""``.
    """
    try:
        return _ensure_bridge(bridge, gateway, prefixlen)
    except _netlink_error() as exc:
        raise NetworkError(f"bridge {bridge}: netlink: {exc}") from exc


def _ensure_bridge(bridge: str, gateway: str, prefixlen: int) -> str:
    created = changed = False
    with _iproute() as ipr:
        found = ipr.link_lookup(ifname=bridge)
        if not found:
            ipr.link("add", ifname=bridge, kind="bridge")
            found = ipr.link_lookup(ifname=bridge)
            created = True
        index = found[0]
        link = ipr.get_links(index)[0]
        kind = _link_kind(link)
        if kind != "bridge":
            raise NetworkError(f"{bridge} exists but is a {kind or 'plain'} link, not a bridge")
        addrs = {(a.get_attr("IFA_ADDRESS"), a["prefixlen"])
                 for a in ipr.get_addr(index=index, family=socket.AF_INET)}
        if (gateway, prefixlen) not in addrs:
            ipr.addr("add", index=index, address=gateway, prefixlen=prefixlen)
            changed = True
        if not link["flags"] & 1:  # IFF_UP
            ipr.link("set", index=index, state="up")
            changed = True
    return "created" if created else "changed" if changed else ""


def delete_links(names: list[str]) -> list[str]:
    """Delete the links that exist among ``names``; the names deleted."""
    deleted = []
    with _iproute() as ipr:
        for name in names:
            for index in ipr.link_lookup(ifname=name):
                try:
                    ipr.link("del", index=index)
                except _netlink_error() as exc:
                    # Gone meanwhile (libvirt removes a tap when its domain stops): fine.
                    if getattr(exc, "code", None) == errno.ENODEV:
                        continue
                    raise NetworkError(f"deleting link {name}: netlink: {exc}") from exc
                deleted.append(name)
    return deleted


def ensure_ip_forward() -> bool:
    """IPv4 forwarding on in the current network namespace (it is per namespace)."""
    if _IP_FORWARD.read_text().strip() == "1":
        return False
    _IP_FORWARD.write_text("1\n")
    return True


# --------------------------------------------------------------------------- the backend


class NatNetworkBackend(NetworkBackend):
    """The real node-local NAT network (root only; acts on the current netns)."""

    def __init__(self, state_dir: Path, bridge: str, subnet: str, *,
                 dnsmasq_user: str = "nobody") -> None:
        self.network = parse_network(bridge, subnet)
        self.state_dir = Path(state_dir)
        self.dnsmasq = Dnsmasq(DnsmasqConfig(
            bridge=bridge, subnet=ipaddress.IPv4Network(self.network.subnet),
            state_dir=self.state_dir, user=dnsmasq_user,
        ))
        # Check-then-write of hosts/ must not interleave between two ports.
        self._ports_lock = threading.Lock()
        self._net_lock = threading.Lock()

    @property
    def bridge(self) -> str:
        return self.network.bridge

    # -- network

    async def ensure_network(self) -> NatNetwork:
        return await asyncio.to_thread(self.ensure_network_sync)

    def ensure_network_sync(self) -> NatNetwork:
        """Bridge, forwarding, NAT table, dnsmasq — each only touched when it is not right."""
        net = ipaddress.IPv4Network(self.network.subnet)
        with self._net_lock:
            try:
                bridge_changed = ensure_bridge(self.bridge, self.network.gateway, net.prefixlen)
                if bridge_changed == "created":
                    # A dnsmasq left from before was bound to the old bridge's index and
                    # would never hear the new one: replace it.
                    self.dnsmasq.stop()
                forward_changed = ensure_ip_forward()
                rules_changed = nft.ensure_table(self.bridge, self.network.subnet)
                dhcp_started = self.dnsmasq.ensure_running()
            except (CommandError, DnsmasqError, OSError) as exc:
                raise NetworkError(f"NAT network {self.bridge}: {exc}") from exc
        if bridge_changed or forward_changed or rules_changed or dhcp_started:
            log.info("NAT network ready", extra={
                "bridge": self.bridge, "subnet": self.network.subnet,
                "bridge_changed": bridge_changed, "rules_changed": rules_changed,
                "dhcp_started": dhcp_started})
        return self.network

    async def teardown(self) -> None:
        await asyncio.to_thread(self.teardown_sync)

    def teardown_sync(self) -> None:
        """Stop dnsmasq, delete the table and the bridge, drop the DHCP files."""
        with self._net_lock:
            self.dnsmasq.stop()
            try:
                nft.delete_table(self.bridge)
            except CommandError as exc:
                raise NetworkError(f"NAT network {self.bridge}: {exc}") from exc
            delete_links([self.bridge])
            self.dnsmasq.remove_files()
        log.info("NAT network removed", extra={"bridge": self.bridge})

    # -- ports

    async def ensure_port(self, vm_uuid: str, nic: NicSpec) -> ResolvedNic:
        return await asyncio.to_thread(self.ensure_port_sync, vm_uuid, nic)

    def ensure_port_sync(self, vm_uuid: str, nic: NicSpec) -> ResolvedNic:
        with self._ports_lock:
            rec, records = plan_port(self.network, self.dnsmasq.all_hosts(), vm_uuid, nic)
            try:
                self.dnsmasq.write_hosts(vm_uuid, records)
            except OSError as exc:
                raise NetworkError(f"VM {vm_uuid}: cannot write its DHCP hosts file: "
                                   f"{exc}") from exc
        log.info("port ready", extra={"bridge": self.bridge, "vm": vm_uuid,
                                      "nic": rec.nic_id, "mac": rec.mac, "ip": rec.ip,
                                      "tap": rec.tap})
        return ResolvedNic(nic_id=rec.nic_id, mac=rec.mac, bridge=self.bridge, tap=rec.tap)

    async def release_ports(self, vm_uuid: str) -> None:
        await asyncio.to_thread(self.release_ports_sync, vm_uuid)

    def release_ports_sync(self, vm_uuid: str) -> None:
        """Hide the VM's record from dnsmasq, strike its leases, delete its taps, and
        only then delete the record: a retry after a crash halfway still finds the
        MACs, addresses and tap names it needs."""
        check_vm_uuid(vm_uuid)
        with self._ports_lock:
            try:
                records = self.dnsmasq.retire_hosts(vm_uuid)
                # The record is gone from dnsmasq first, so a restarted daemon cannot
                # hand the lease straight back.
                self.dnsmasq.forget_leases(records)
                taps = sorted({r.tap for r in records if r.tap})
                deleted = delete_links(taps) if taps else []
                self.dnsmasq.drop_retired(vm_uuid)
            except (CommandError, DnsmasqError, OSError) as exc:
                raise NetworkError(f"VM {vm_uuid}: releasing its ports: {exc}") from exc
        if records or deleted:
            log.info("ports released", extra={"bridge": self.bridge, "vm": vm_uuid,
                                              "taps_deleted": ",".join(deleted)})

    async def vm_ports(self) -> dict[str, list[str]]:
        return await asyncio.to_thread(self.vm_ports_sync)

    def vm_ports_sync(self) -> dict[str, list[str]]:
        return {vm: [r.mac for r in recs] for vm, recs in self.dnsmasq.all_hosts().items()}
