"""The node's direct network, for real (F-NET-DIRECT): the VMs sit on the LAN.

* a Linux bridge (``[node] direct_bridge``, default ``yunbr0``) enslaves the uplink
  (``[node] direct_uplink``). As Proxmox's ``vmbr0`` does, the uplink's IPv4 addresses
  and its gateway routes move onto the bridge so the node keeps its own connectivity;
  the bridge takes the uplink's MAC so the LAN sees no new address for the node. Each
  step is checked first: a second run changes nothing, a run cut short is finished by
  the next one;
* every direct NIC has a persistent tap ``yd`` + 10 hex digits, made here (not by
  libvirt: ``<interface type='ethernet'>``, managed='no', so ``ResolvedNic.bridge`` is
  None), joined to the bridge and up. The tap's own MAC is the guest's with the first
  byte ``fe`` (as libvirt does): were it the guest's MAC, the bridge would take frames
  to the guest as its own;
* the VM takes its address from the LAN's DHCP server; the node snoops the server's
  DHCPACKs on the uplink (:mod:`.direct_dhcp`) and reports them (:meth:`learned`);
* filtering (:mod:`.direct_nft`): table ``bridge yun_direct``.

State: ``ports/<vm>.json`` (the VM's NICs: id, MAC, tap), ``learned.json`` (MAC →
address) and ``nft.fingerprint`` under the state dir: an agent restart loses nothing.
Every blocking step runs in a worker thread (:func:`asyncio.to_thread`).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import socket
import threading
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from yun.node.hypervisor.base import ResolvedNic
from yun.node.network import direct_nft
from yun.node.network.base import NetworkBackend, NetworkError
from yun.node.network.direct_dhcp import DhcpAck, DhcpSnooper
from yun.node.network.links import delete_links, iproute, netlink_error, taps_named
from yun.node.network.ports import check_vm_uuid, other_ports, tap_name
from yun.proto.messages import NicSpec
from yun.proto.network import LearnedAddress, NicNetwork, SandboxSettings
from yun.util.run import CommandError

log = logging.getLogger("yun.node.network.direct")

#: Direct taps: "yd" + 10 hex digits = 12 characters (Linux allows 15).
TAP_PREFIX = "yd"
RTPROT_KERNEL = 2


@dataclass(frozen=True)
class DirectPort:
    """A direct NIC on this node."""

    nic_id: str
    mac: str
    tap: str


def plan_direct_port(ports: Mapping[str, Sequence[DirectPort]], vm_uuid: str,
                     nic: NicSpec) -> tuple[DirectPort, list[DirectPort]]:
    """Validate ``nic`` against every direct port of the node (pure; shared with the
    simulated twin so both refuse the same requests with the same words).

    Returns its port and the VM's ports with it added or replaced (same NIC id)."""
    check_vm_uuid(vm_uuid)
    where = f"NIC {nic.nic_id} of VM {vm_uuid}"
    if nic.network != NicNetwork.DIRECT:
        raise NetworkError(f"{where} is in the {nic.network} network, not the direct one")
    if nic.ip is not None or nic.extra_ips:
        raise NetworkError(f"{where}: a direct NIC takes its address from the LAN's DHCP "
                           f"server; the platform gives it none")
    port = DirectPort(nic_id=nic.nic_id, mac=nic.mac, tap=tap_name(nic.nic_id, TAP_PREFIX))
    for other_vm, other in other_ports(ports, vm_uuid, port, where):
        if other.tap == port.tap:
            raise NetworkError(f"{where}: its tap {port.tap} is already NIC "
                               f"{other.nic_id} of VM {other_vm}")
    mine = [p for p in ports.get(vm_uuid, []) if p.nic_id != port.nic_id]
    return port, [*mine, port]


def learned_of(ports: Mapping[str, Sequence[DirectPort]],
               seen: Mapping[str, str]) -> list[LearnedAddress]:
    """The addresses seen (MAC → address) of the MACs that are ports here, sorted."""
    macs = {p.mac for records in ports.values() for p in records}
    return [LearnedAddress(mac=mac, ip=ip) for mac, ip in sorted(seen.items())
            if mac in macs]


def tap_mac(vm_mac: str) -> str:
    """The tap's own MAC: the guest's with the first byte fe (never a guest's)."""
    return "fe" + vm_mac[2:]


# --------------------------------------------------------------------------- netlink



def _index(ipr: Any, name: str) -> int | None:
    found = ipr.link_lookup(ifname=name)
    return int(found[0]) if found else None


def ensure_bridge(bridge: str, uplink: str) -> list[str]:
    """The bridge exists with the uplink's MAC, is up, enslaves the uplink and holds its
    IPv4 addresses and gateway routes. Returns what was changed (empty: nothing).

    Order matters for the node's own connectivity: the addresses are added to the
    bridge and the routes re-made through it before they leave the uplink."""
    changed: list[str] = []
    with iproute() as ipr:
        up_index = _index(ipr, uplink)
        if up_index is None:
            raise NetworkError(f"direct uplink {uplink!r} does not exist on this node "
                               f"([node] direct_uplink)")
        up_link = ipr.get_links(up_index)[0]
        up_mac = up_link.get_attr("IFLA_ADDRESS")
        br_index = _index(ipr, bridge)
        if br_index is None:
            ipr.link("add", ifname=bridge, kind="bridge")
            br_index = _index(ipr, bridge)
            assert br_index is not None
            changed.append("bridge created")
        br_link = ipr.get_links(br_index)[0]
        info = br_link.get_attr("IFLA_LINKINFO")
        if info is None or info.get_attr("IFLA_INFO_KIND") != "bridge":
            raise NetworkError(f"direct bridge {bridge!r} exists and is not a bridge")
        if br_link.get_attr("IFLA_ADDRESS") != up_mac:
            ipr.link("set", index=br_index, address=up_mac)
            changed.append("bridge MAC")
        if not br_link["flags"] & 1:  # IFF_UP
            ipr.link("set", index=br_index, state="up")
            changed.append("bridge up")
        # The uplink's addresses and the routes through a gateway that leave by it.
        up_addrs = [(a.get_attr("IFA_ADDRESS"), a["prefixlen"])
                    for a in ipr.get_addr(index=up_index, family=socket.AF_INET)]
        br_addrs = {(a.get_attr("IFA_ADDRESS"), a["prefixlen"])
                    for a in ipr.get_addr(index=br_index, family=socket.AF_INET)}
        for address, prefixlen in up_addrs:
            if (address, prefixlen) not in br_addrs:
                ipr.addr("add", index=br_index, address=address, prefixlen=prefixlen)
                changed.append(f"address {address}/{prefixlen} on the bridge")
        # Every route the kernel did not make itself (the prefix routes come back with
        # the addresses): the default route and any static one, gateway or on-link.
        routes = [r for r in ipr.get_routes(family=socket.AF_INET, table=254)
                  if r.get_attr("RTA_OIF") == up_index and r["proto"] != RTPROT_KERNEL]
        for r in routes:
            dst = r.get_attr("RTA_DST") or "0.0.0.0"
            extra = {"gateway": r.get_attr("RTA_GATEWAY")} if r.get_attr("RTA_GATEWAY") else {}
            ipr.route("replace", dst=dst, dst_len=r["dst_len"], oif=br_index,
                      priority=r.get_attr("RTA_PRIORITY") or 0, proto=r["proto"],
                      scope=r["scope"], **extra)
            changed.append(f"route {dst}/{r['dst_len']} through the bridge")
        if up_link.get_attr("IFLA_MASTER") != br_index:
            ipr.link("set", index=up_index, master=br_index)
            changed.append("uplink enslaved")
        if not up_link["flags"] & 1:
            ipr.link("set", index=up_index, state="up")
            changed.append("uplink up")
        for address, prefixlen in up_addrs:
            with contextlib.suppress(netlink_error()):
                ipr.addr("del", index=up_index, address=address, prefixlen=prefixlen)
                changed.append(f"address {address}/{prefixlen} off the uplink")
    return changed


def bridge_networks(bridge: str) -> tuple[list[str], list[str]]:
    """The bridge's IPv4 addresses and the networks they sit in (the LAN)."""
    with iproute() as ipr:
        index = _index(ipr, bridge)
        if index is None:
            return [], []
        addrs = [(a.get_attr("IFA_ADDRESS"), a["prefixlen"])
                 for a in ipr.get_addr(index=index, family=socket.AF_INET)]
    return ([a for a, _ in addrs],
            [str(ipaddress.IPv4Network(f"{a}/{p}", strict=False)) for a, p in addrs])


def node_addresses() -> list[str]:
    """Every IPv4 address of the node outside loopback (a VM reaches none)."""
    with iproute() as ipr:
        return sorted({a.get_attr("IFA_ADDRESS") for a in ipr.get_addr(family=socket.AF_INET)
                       if not ipaddress.IPv4Address(a.get_attr("IFA_ADDRESS")).is_loopback})


def ensure_tap(tap: str, mac: str, bridge: str) -> bool:
    """The tap exists with ``mac``, in the bridge, up. True when anything changed."""
    changed = False
    with iproute() as ipr:
        br_index = _index(ipr, bridge)
        if br_index is None:
            raise NetworkError(f"direct bridge {bridge!r} does not exist")
        index = _index(ipr, tap)
        if index is None:
            ipr.link("add", ifname=tap, kind="tuntap", mode="tap")
            index = _index(ipr, tap)
            assert index is not None
            changed = True
        link = ipr.get_links(index)[0]
        if link.get_attr("IFLA_ADDRESS") != mac:
            ipr.link("set", index=index, address=mac)
            changed = True
        if link.get_attr("IFLA_MASTER") != br_index:
            ipr.link("set", index=index, master=br_index)
            changed = True
        if not link["flags"] & 1:
            ipr.link("set", index=index, state="up")
            changed = True
    return changed


# --------------------------------------------------------------------------- the backend


class DirectNetworkBackend(NetworkBackend):
    """The real direct network of a node (root only; acts on the current netns).

    The bridge and its uplink are left in place by :meth:`teardown` (the node's own
    connectivity lives on the bridge now); taps, table and state go."""

    kind = NicNetwork.DIRECT

    def __init__(self, state_dir: Path, uplink: str, bridge: str = "yunbr0", *,
                 blocked: Sequence[str] = (), snoop: bool = True) -> None:
        self.state_dir = Path(state_dir)
        self.uplink = uplink
        self.bridge = bridge
        self.extra_blocked = list(blocked)
        self.control_blocked: list[str] = []
        self._lock = threading.RLock()
        self._snooper = DhcpSnooper(uplink, self._on_ack) if snoop else None
        with contextlib.suppress(FileNotFoundError):
            self.control_blocked = json.loads(self._blocked_file.read_text())

    # -- files

    @property
    def _ports_dir(self) -> Path:
        return self.state_dir / "ports"

    @property
    def _learned_file(self) -> Path:
        return self.state_dir / "learned.json"

    @property
    def _blocked_file(self) -> Path:
        return self.state_dir / "control-blocked.json"

    @property
    def _fingerprint_file(self) -> Path:
        return self.state_dir / "nft.fingerprint"

    def _write_json(self, path: Path, data: Any) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(data))
        tmp.replace(path)

    def _all_ports(self) -> dict[str, list[DirectPort]]:
        out: dict[str, list[DirectPort]] = {}
        if not self._ports_dir.is_dir():
            return out
        for path in sorted(self._ports_dir.glob("*.json")):
            out[path.stem] = [DirectPort(**p) for p in json.loads(path.read_text())]
        return out

    def _write_ports(self, vm_uuid: str, ports: list[DirectPort]) -> None:
        path = self._ports_dir / f"{vm_uuid}.json"
        if ports:
            self._write_json(path, [asdict(p) for p in ports])
        else:
            path.unlink(missing_ok=True)

    def _seen(self) -> dict[str, str]:
        with contextlib.suppress(FileNotFoundError, ValueError):
            data = json.loads(self._learned_file.read_text())
            if isinstance(data, dict):
                return {str(k): str(v) for k, v in data.items()}
        return {}

    def _on_ack(self, ack: DhcpAck) -> None:
        """A DHCPACK seen on the uplink: kept when it is for one of our ports."""
        with self._lock:
            if not any(p.mac == ack.mac for ps in self._all_ports().values() for p in ps):
                return
            seen = self._seen()
            if seen.get(ack.mac) == ack.ip:
                return
            seen[ack.mac] = ack.ip
            self._write_json(self._learned_file, seen)
        log.info("direct VM address learned", extra={"mac": ack.mac, "ip": ack.ip,
                                                      "uplink": self.uplink})

    # -- network

    async def ensure_network(self, settings: SandboxSettings | None = None) -> None:
        await asyncio.to_thread(self.ensure_network_sync, settings)

    def ensure_network_sync(self, settings: SandboxSettings | None = None) -> None:
        """Bridge, uplink, taps of every recorded port, the table and the snooper; each
        touched only when it is not right. ``settings`` give the control server's blocked
        networks (the rest of them is the sandbox's business)."""
        with self._lock:
            if settings is not None and settings.blocked != self.control_blocked:
                self._write_json(self._blocked_file, settings.blocked)
                self.control_blocked = list(settings.blocked)
            try:
                changed = ensure_bridge(self.bridge, self.uplink)
                ports = self._all_ports()
                for records in ports.values():
                    for p in records:
                        ensure_tap(p.tap, tap_mac(p.mac), self.bridge)
                rules_changed = self._ensure_table(ports)
                if self._snooper is not None and not self._snooper.running:
                    self._snooper.start()
            except (CommandError, OSError) as exc:
                raise NetworkError(f"direct network on {self.uplink}: {exc}") from exc
            except netlink_error() as exc:
                raise NetworkError(f"direct network on {self.uplink}: netlink: {exc}") from exc
        if changed or rules_changed:
            log.info("direct network ready", extra={"bridge": self.bridge,
                                                    "uplink": self.uplink,
                                                    "changed": "; ".join(changed),
                                                    "rules_changed": rules_changed})

    def _blocked(self) -> list[ipaddress.IPv4Network]:
        _, lan = bridge_networks(self.bridge)
        return direct_nft.blocked_networks(self.control_blocked, lan, self.extra_blocked,
                                           node_addresses())

    def _ensure_table(self, ports: dict[str, list[DirectPort]]) -> bool:
        blocked = self._blocked()
        fingerprint = direct_nft.fingerprint(blocked)
        with contextlib.suppress(FileNotFoundError):
            if (self._fingerprint_file.read_text() == fingerprint
                    and direct_nft.table_exists()):
                return False
        elements = [direct_nft.PortElement(p.tap, p.mac) for ps in ports.values() for p in ps]
        direct_nft.apply(direct_nft.replace_table(blocked, elements))
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self._fingerprint_file.write_text(fingerprint)
        return True

    async def teardown(self) -> None:
        await asyncio.to_thread(self.teardown_sync)

    def teardown_sync(self) -> None:
        """Stop snooping; delete the table, every direct tap and the state files."""
        with self._lock:
            if self._snooper is not None:
                self._snooper.stop()
            try:
                direct_nft.apply(direct_nft.delete_text())
                delete_links(taps_named(TAP_PREFIX))
            except (CommandError, OSError) as exc:
                raise NetworkError(f"direct network teardown: {exc}") from exc
            for path in (self._learned_file, self._blocked_file, self._fingerprint_file):
                path.unlink(missing_ok=True)
            if self._ports_dir.is_dir():
                for child in self._ports_dir.iterdir():
                    child.unlink(missing_ok=True)
                self._ports_dir.rmdir()
            self.control_blocked = []
        log.info("direct network removed", extra={"bridge": self.bridge,
                                                  "state_dir": str(self.state_dir)})

    # -- ports

    async def ensure_port(self, vm_uuid: str, nic: NicSpec) -> ResolvedNic:
        return await asyncio.to_thread(self.ensure_port_sync, vm_uuid, nic)

    def ensure_port_sync(self, vm_uuid: str, nic: NicSpec) -> ResolvedNic:
        """Record the port, then make its tap and its element of the ``allowed`` set."""
        with self._lock:
            ports = self._all_ports()
            port, records = plan_direct_port(ports, vm_uuid, nic)
            old = [p for p in ports.get(vm_uuid, []) if p.nic_id == port.nic_id]
            try:
                self._write_ports(vm_uuid, records)
                ensure_tap(port.tap, tap_mac(port.mac), self.bridge)
                if not self._ensure_table({**ports, vm_uuid: records}):
                    direct_nft.apply(direct_nft.replace_elements(
                        [direct_nft.PortElement(p.tap, p.mac) for p in old],
                        [direct_nft.PortElement(port.tap, port.mac)]))
            except (CommandError, OSError) as exc:
                raise NetworkError(f"NIC {nic.nic_id} of VM {vm_uuid}: {exc}") from exc
            except netlink_error() as exc:
                raise NetworkError(f"NIC {nic.nic_id} of VM {vm_uuid}: netlink: {exc}"
                                   ) from exc
        log.info("direct port ready", extra={"vm": vm_uuid, "nic": port.nic_id,
                                             "mac": port.mac, "tap": port.tap,
                                             "bridge": self.bridge})
        return ResolvedNic(nic_id=port.nic_id, mac=port.mac, bridge=None, tap=port.tap)

    async def release_port(self, vm_uuid: str, nic_id: str) -> None:
        await asyncio.to_thread(self._release, vm_uuid, nic_id)

    async def release_ports(self, vm_uuid: str) -> None:
        await asyncio.to_thread(self._release, vm_uuid, None)

    def _release(self, vm_uuid: str, nic_id: str | None) -> None:
        """One NIC (or every NIC: ``nic_id`` None) of the VM gone: its element, tap,
        learned address and, last, its record (a retry after a crash finds it)."""
        check_vm_uuid(vm_uuid)
        with self._lock:
            records = self._all_ports().get(vm_uuid, [])
            gone = [p for p in records if nic_id is None or p.nic_id == nic_id]
            if not gone:
                return
            kept = [p for p in records if p not in gone]
            try:
                if direct_nft.table_exists():
                    direct_nft.apply(direct_nft.replace_elements(
                        [direct_nft.PortElement(p.tap, p.mac) for p in gone], []))
                deleted = delete_links([p.tap for p in gone])
                seen = self._seen()
                if any(p.mac in seen for p in gone):
                    for p in gone:
                        seen.pop(p.mac, None)
                    self._write_json(self._learned_file, seen)
                self._write_ports(vm_uuid, kept)
            except (CommandError, OSError) as exc:
                raise NetworkError(f"VM {vm_uuid}: releasing its direct ports: {exc}"
                                   ) from exc
        log.info("direct ports released", extra={"vm": vm_uuid, "nics": [p.nic_id for p in gone],
                                                 "taps_deleted": ",".join(deleted)})

    async def vm_ports(self) -> dict[str, list[str]]:
        return await asyncio.to_thread(self.vm_ports_sync)

    def vm_ports_sync(self) -> dict[str, list[str]]:
        with self._lock:
            return {vm: [p.mac for p in ps] for vm, ps in self._all_ports().items()}

    async def learned(self) -> list[LearnedAddress]:
        with self._lock:
            return learned_of(self._all_ports(), self._seen())
