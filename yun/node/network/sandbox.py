"""The node's sandbox network, for real (F-NET-SANDBOX, F-SB-PRIVATE): routed taps,
one dnsmasq, one nftables table, policy routes to the intelligent routers.

* every sandbox NIC has a persistent tap ``ys`` + 10 hex digits (pyroute2, tuntap mode
  tap) made here, not by libvirt (``<interface type='ethernet'>``, managed='no'). The
  tap is up and holds the node's gateway as ``<gateway>/<subnet prefix>`` with
  ``noprefixroute`` (the same address on every tap, no route to the whole subnet),
  plus a host route ``<vm ip>/32 dev <tap>`` for the VM's address and each extra
  address, and ``proxy_arp`` on, so a VM asking for any other address of its /24 gets
  the node's MAC and its packets meet the node's forward chain (and are dropped);
* DHCP (:mod:`.dnsmasq`): one daemon for every tap (``--interface=ys*``,
  ``--bind-dynamic``), static leases from ``hosts/<vm>``, which with
  ``forwards/<vm>.json`` and ``settings.json`` is the whole state: an agent restart
  loses nothing;
* filtering and node forwards (:mod:`.nft`): table ``inet yun_sandbox``;
* outbound traffic of mono/share VMs: ``ip rule from <subnet> lookup main
  suppress_prefixlength 0`` (LAN and VM routes stay direct) then ``from <subnet>
  lookup 7077``, whose default route is an ECMP route over the live routers.

IPv4 forwarding is turned on in the node's network namespace (it is needed to route
the taps); every other forwarded flow is left as it was: the table's chains have
policy accept and only judge packets entering or leaving a ``ys*`` tap.

Every blocking step runs in a worker thread (:func:`asyncio.to_thread`).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import os
import socket
import threading
from pathlib import Path

from yun.node.hypervisor.base import ResolvedNic
from yun.node.network import nft
from yun.node.network.base import NetworkBackend, NetworkError
from yun.node.network.dnsmasq import Dnsmasq, DnsmasqConfig, DnsmasqError, PortRecord
from yun.node.network.links import delete_links, iproute, netlink_error, taps_named
from yun.node.network.ports import TAP_PREFIX, check_forwards, check_vm_uuid, plan_port
from yun.proto.messages import NicSpec
from yun.proto.network import Exposure, NicNetwork, NodeForward, SandboxSettings
from yun.util.run import CommandError, run

log = logging.getLogger("yun.node.network.sandbox")

IFA_F_NOPREFIXROUTE = 0x200
ROUTE_TABLE = 7077
RULE_PRIORITY = 7077
_IP_FORWARD = Path("/proc/sys/net/ipv4/ip_forward")


def elements_of(rec: PortRecord) -> nft.PortElements:
    """What a port puts in the nftables sets."""
    return nft.PortElements(tap=rec.tap, ips=(rec.ip, *rec.extra_ips),
                            exposed=rec.exposure != Exposure.PRIVATE)


# --------------------------------------------------------------------------- netlink



def ensure_tap(tap: str, gateway: str, prefixlen: int, ips: list[str]) -> bool:
    """The tap exists, is up, holds the gateway (noprefixroute), routes exactly ``ips``
    (/32 each) and answers ARP for the rest of the subnet. True when anything changed."""
    changed = False
    try:
        with iproute() as ipr:
            found = ipr.link_lookup(ifname=tap)
            if not found:
                ipr.link("add", ifname=tap, kind="tuntap", mode="tap")
                found = ipr.link_lookup(ifname=tap)
                changed = True
            index = found[0]
            link = ipr.get_links(index)[0]
            if not link["flags"] & 1:  # IFF_UP
                ipr.link("set", index=index, state="up")
                changed = True
            addrs = {(a.get_attr("IFA_ADDRESS"), a["prefixlen"])
                     for a in ipr.get_addr(index=index, family=socket.AF_INET)}
            if (gateway, prefixlen) not in addrs:
                ipr.addr("add", index=index, address=gateway, prefixlen=prefixlen,
                         IFA_FLAGS=IFA_F_NOPREFIXROUTE)
                changed = True
            routed = {r.get_attr("RTA_DST") for r in ipr.get_routes(
                family=socket.AF_INET, oif=index, table=254) if r["dst_len"] == 32}
            for ip in ips:
                if ip not in routed:
                    ipr.route("replace", dst=ip, dst_len=32, oif=index)
                    changed = True
            for stale in routed - set(ips) - {None}:
                with contextlib.suppress(netlink_error()):
                    ipr.route("del", dst=stale, dst_len=32, oif=index)
                    changed = True
    except netlink_error() as exc:
        raise NetworkError(f"tap {tap}: netlink: {exc}") from exc
    proxy = Path(f"/proc/sys/net/ipv4/conf/{tap}/proxy_arp")
    if proxy.read_text().strip() != "1":
        proxy.write_text("1\n")
        changed = True
    return changed


def node_addresses() -> list[str]:
    """The node's own IPv4 addresses outside the sandbox taps (VMs may reach none)."""
    with iproute() as ipr:
        names = {link["index"]: link.get_attr("IFLA_IFNAME") for link in ipr.get_links()}
        return sorted({a.get_attr("IFA_ADDRESS")
                       for a in ipr.get_addr(family=socket.AF_INET)
                       if not str(names.get(a["index"], "")).startswith(TAP_PREFIX)})


def ensure_ip_forward() -> bool:
    """IPv4 forwarding on in the current network namespace (it is per namespace)."""
    if _IP_FORWARD.read_text().strip() == "1":
        return False
    _IP_FORWARD.write_text("1\n")
    return True


def ensure_policy_routes(subnet: str, routers: list[str]) -> None:
    """The VMs' traffic leaves through the routers (ECMP) unless the main table has a
    more specific route (the LAN, another VM's /32); no router: no default route."""
    rules = json.loads(run(["ip", "-j", "-4", "rule", "show"], timeout=30).stdout or "[]")
    have = {(r.get("priority"), r.get("src"), str(r.get("table"))) for r in rules}
    net = ipaddress.IPv4Network(subnet)
    src = str(net.network_address)
    for prio, table, extra in ((RULE_PRIORITY - 1, "main", ["suppress_prefixlength", "0"]),
                               (RULE_PRIORITY, str(ROUTE_TABLE), [])):
        if (prio, src, table) not in have:
            run(["ip", "-4", "rule", "add", "from", str(net), "lookup", table, *extra,
                 "priority", str(prio)], timeout=30)
    # A rule of an older subnet (the control server changed it) goes.
    for r in rules:
        if r.get("priority") in (RULE_PRIORITY - 1, RULE_PRIORITY) and r.get("src") != src:
            run(["ip", "-4", "rule", "del", "priority", str(r["priority"])], timeout=30,
                check=False)
    if routers:
        hops = [w for r in sorted(routers) for w in ("nexthop", "via", r)]
        argv = ["ip", "-4", "route", "replace", "default", "table", str(ROUTE_TABLE), *hops]
        try:
            run(argv, timeout=30)
        except CommandError as exc:
            raise NetworkError(f"route to the routers {', '.join(routers)}: "
                               f"{exc.stderr.strip()}") from exc
    else:
        run(["ip", "-4", "route", "flush", "table", str(ROUTE_TABLE)], timeout=30, check=False)


def remove_policy_routes() -> None:
    for prio in (RULE_PRIORITY - 1, RULE_PRIORITY):
        while run(["ip", "-4", "rule", "del", "priority", str(prio)], timeout=30,
                  check=False).returncode == 0:
            pass
    run(["ip", "-4", "route", "flush", "table", str(ROUTE_TABLE)], timeout=30, check=False)


# --------------------------------------------------------------------------- the backend


class SandboxNetworkBackend(NetworkBackend):
    """The real sandbox network of a node (root only; acts on the current netns)."""

    kind = NicNetwork.SANDBOX

    def __init__(self, state_dir: Path, *, dnsmasq_user: str = "nobody") -> None:
        self.state_dir = Path(state_dir)
        self.dnsmasq_user = dnsmasq_user
        self._lock = threading.RLock()
        self.settings: SandboxSettings | None = None
        with contextlib.suppress(FileNotFoundError):
            self.settings = SandboxSettings.model_validate_json(
                self._settings_file.read_text())

    # -- files

    @property
    def _settings_file(self) -> Path:
        return self.state_dir / "settings.json"

    @property
    def _fingerprint_file(self) -> Path:
        return self.state_dir / "nft.fingerprint"

    @property
    def _forwards_dir(self) -> Path:
        return self.state_dir / "forwards"

    def _dnsmasq(self) -> Dnsmasq:
        s = self._require_settings()
        return Dnsmasq(DnsmasqConfig(interface=TAP_PREFIX + "*",
                                     subnet=ipaddress.IPv4Network(s.subnet),
                                     gateway=s.gateway, state_dir=self.state_dir,
                                     user=self.dnsmasq_user))

    def _require_settings(self) -> SandboxSettings:
        if self.settings is None:
            raise NetworkError("the sandbox network has no settings yet (the control server "
                               "sends them with the first provision and report answer)")
        return self.settings

    def _all_hosts(self) -> dict[str, list[PortRecord]]:
        if self.settings is None:
            return {}
        return self._dnsmasq().all_hosts()

    def _all_forwards(self) -> dict[str, list[NodeForward]]:
        out: dict[str, list[NodeForward]] = {}
        if not self._forwards_dir.is_dir():
            return out
        for path in sorted(self._forwards_dir.glob("*.json")):
            data = json.loads(path.read_text())
            out[path.stem] = [NodeForward.model_validate(f) for f in data]
        return out

    def _write_forwards(self, vm_uuid: str, forwards: list[NodeForward]) -> None:
        path = self._forwards_dir / f"{vm_uuid}.json"
        if not forwards:
            path.unlink(missing_ok=True)
            return
        self._forwards_dir.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{vm_uuid}.tmp")
        tmp.write_text(json.dumps([f.model_dump(mode="json") for f in forwards]))
        tmp.replace(path)

    def _forward_elements(self) -> list[nft.ForwardElement]:
        return [nft.ForwardElement(f.protocol, f.node_port, f.vm_ip, f.vm_port)
                for fs in self._all_forwards().values() for f in fs]

    # -- network

    async def ensure_network(self, settings: SandboxSettings | None = None) -> None:
        await asyncio.to_thread(self.ensure_network_sync, settings)

    def ensure_network_sync(self, settings: SandboxSettings | None = None) -> None:
        """Forwarding, policy routes, the nft table, dnsmasq and every recorded tap;
        each touched only when it is not right. Without settings (none given, none
        kept) there is nothing to set up yet."""
        with self._lock:
            if settings is not None and settings != self.settings:
                self.state_dir.mkdir(parents=True, exist_ok=True)
                tmp = self._settings_file.with_name(".settings.tmp")
                tmp.write_text(settings.model_dump_json())
                tmp.replace(self._settings_file)
                self.settings = settings
                log.info("sandbox settings applied", extra={
                    "subnet": settings.subnet, "gateway": settings.gateway,
                    "routers": settings.routers, "blocked": settings.blocked})
            if self.settings is None:
                return
            s = self.settings
            prefix = ipaddress.IPv4Network(s.subnet).prefixlen
            try:
                forward_changed = ensure_ip_forward()
                ensure_policy_routes(s.subnet, s.routers)
                hosts = self._all_hosts()
                for records in hosts.values():
                    for rec in records:
                        ensure_tap(rec.tap, s.gateway, prefix, [rec.ip, *rec.extra_ips])
                rules_changed = self._ensure_table(hosts)
                dhcp_started = self._dnsmasq().ensure_running()
            except (CommandError, DnsmasqError, OSError) as exc:
                raise NetworkError(f"sandbox network {s.subnet}: {exc}") from exc
        if forward_changed or rules_changed or dhcp_started:
            log.info("sandbox network ready", extra={
                "subnet": s.subnet, "gateway": s.gateway, "rules_changed": rules_changed,
                "dhcp_started": dhcp_started})

    def _skeleton(self) -> nft.Skeleton:
        s = self._require_settings()
        return nft.Skeleton(gateway=s.gateway,
                            blocked=[*s.blocked, *(f"{a}/32" for a in node_addresses())])

    def _ensure_table(self, hosts: dict[str, list[PortRecord]]) -> bool:
        sk = self._skeleton()
        fingerprint = sk.fingerprint()
        listing = nft.list_table()
        wanted_rules = len(nft.rules(sk.gateway)) + len(self._forward_elements())
        with contextlib.suppress(FileNotFoundError):
            if (listing is not None and self._fingerprint_file.read_text() == fingerprint
                    and nft.shape_of(listing) == ({*nft.chains(), "node_ports"},
                                                  wanted_rules)):
                return False
        ports = [elements_of(r) for recs in hosts.values() for r in recs]
        nft.apply(nft.build_ruleset(sk, ports, self._forward_elements()))
        self._fingerprint_file.write_text(fingerprint)
        return True

    async def teardown(self) -> None:
        await asyncio.to_thread(self.teardown_sync)

    def teardown_sync(self) -> None:
        """Stop dnsmasq, delete the table, every tap, the policy routes and the files."""
        with self._lock:
            try:
                if self.settings is not None:
                    dnsmasq = self._dnsmasq()
                    dnsmasq.stop()
                    dnsmasq.remove_files()
                nft.delete_table()
                delete_links(taps_named(TAP_PREFIX))
                remove_policy_routes()
            except (CommandError, OSError) as exc:
                raise NetworkError(f"sandbox network teardown: {exc}") from exc
            for path in (self._settings_file, self._fingerprint_file):
                path.unlink(missing_ok=True)
            if self._forwards_dir.is_dir():
                for child in self._forwards_dir.iterdir():
                    child.unlink(missing_ok=True)
                self._forwards_dir.rmdir()
            self.settings = None
        log.info("sandbox network removed", extra={"state_dir": str(self.state_dir)})

    # -- ports

    async def ensure_port(self, vm_uuid: str, nic: NicSpec) -> ResolvedNic:
        return await asyncio.to_thread(self.ensure_port_sync, vm_uuid, nic)

    def ensure_port_sync(self, vm_uuid: str, nic: NicSpec) -> ResolvedNic:
        """Record the lease, then make the tap, its routes and its set elements."""
        with self._lock:
            s = self._require_settings()
            dnsmasq = self._dnsmasq()
            hosts = dnsmasq.all_hosts()
            rec, records = plan_port(s, hosts, vm_uuid, nic)
            old = [r for r in hosts.get(vm_uuid, []) if r.nic_id == rec.nic_id]
            try:
                dnsmasq.write_hosts(vm_uuid, records)
                ensure_tap(rec.tap, s.gateway, ipaddress.IPv4Network(s.subnet).prefixlen,
                           [rec.ip, *rec.extra_ips])
                if self._ensure_table({**hosts, vm_uuid: records}) is False:
                    nft.apply(nft.replace_elements([elements_of(r) for r in old],
                                                   [elements_of(rec)]))
            except (CommandError, OSError) as exc:
                raise NetworkError(f"NIC {nic.nic_id} of VM {vm_uuid}: {exc}") from exc
        log.info("sandbox port ready", extra={"vm": vm_uuid, "nic": rec.nic_id, "mac": rec.mac,
                                              "ip": rec.ip, "tap": rec.tap,
                                              "exposure": rec.exposure})
        return ResolvedNic(nic_id=rec.nic_id, mac=rec.mac, bridge=None, tap=rec.tap)

    async def release_port(self, vm_uuid: str, nic_id: str) -> None:
        await asyncio.to_thread(self.release_port_sync, vm_uuid, nic_id)

    def release_port_sync(self, vm_uuid: str, nic_id: str) -> None:
        """One NIC unplugged: its forwards, elements, lease and tap go."""
        check_vm_uuid(vm_uuid)
        with self._lock:
            if self.settings is None:
                return
            dnsmasq = self._dnsmasq()
            records = dnsmasq.read_hosts(vm_uuid)
            gone = [r for r in records if r.nic_id == nic_id]
            if not gone:
                return
            kept = [r for r in records if r.nic_id != nic_id]
            try:
                if kept:
                    dnsmasq.write_hosts(vm_uuid, kept)
                else:
                    dnsmasq.retire_hosts(vm_uuid)
                dnsmasq.forget_leases(gone)
                ips = {ip for r in gone for ip in (r.ip, *r.extra_ips)}
                forwards = self._all_forwards().get(vm_uuid, [])
                if any(f.vm_ip in ips for f in forwards):
                    self._write_forwards(vm_uuid, [f for f in forwards if f.vm_ip not in ips])
                    nft.apply(nft.replace_forwards(self._forward_elements()))
                nft.apply(nft.replace_elements([elements_of(r) for r in gone], []))
                delete_links([r.tap for r in gone])
                if not kept:
                    dnsmasq.drop_retired(vm_uuid)
            except (CommandError, DnsmasqError, OSError) as exc:
                raise NetworkError(f"NIC {nic_id} of VM {vm_uuid}: releasing: {exc}") from exc
        log.info("sandbox port released", extra={"vm": vm_uuid, "nic": nic_id})

    async def release_ports(self, vm_uuid: str) -> None:
        await asyncio.to_thread(self.release_ports_sync, vm_uuid)

    def release_ports_sync(self, vm_uuid: str) -> None:
        """Hide the VM's record from dnsmasq, strike its leases, drop its forwards and set
        elements, delete its taps, and only then its record: a retry after a crash
        halfway still finds what it needs."""
        check_vm_uuid(vm_uuid)
        with self._lock:
            if self.settings is None:
                return
            dnsmasq = self._dnsmasq()
            try:
                records = dnsmasq.retire_hosts(vm_uuid)
                dnsmasq.forget_leases(records)
                had_forwards = vm_uuid in self._all_forwards()
                if had_forwards:
                    self._write_forwards(vm_uuid, [])
                    nft.apply(nft.replace_forwards(self._forward_elements()))
                if records and nft.list_table() is not None:
                    nft.apply(nft.replace_elements([elements_of(r) for r in records], []))
                deleted = delete_links(sorted({r.tap for r in records if r.tap}))
                dnsmasq.drop_retired(vm_uuid)
            except (CommandError, DnsmasqError, OSError) as exc:
                raise NetworkError(f"VM {vm_uuid}: releasing its ports: {exc}") from exc
        if records or deleted or had_forwards:
            log.info("sandbox ports released", extra={"vm": vm_uuid,
                                                      "taps_deleted": ",".join(deleted)})

    async def vm_ports(self) -> dict[str, list[str]]:
        return await asyncio.to_thread(self.vm_ports_sync)

    def vm_ports_sync(self) -> dict[str, list[str]]:
        return {vm: [r.mac for r in recs] for vm, recs in self._all_hosts().items()}

    async def set_forwards(self, vm_uuid: str, forwards: list[NodeForward]) -> None:
        await asyncio.to_thread(self.set_forwards_sync, vm_uuid, forwards)

    def set_forwards_sync(self, vm_uuid: str, forwards: list[NodeForward]) -> None:
        """Replace the VM's node forwards (kept in ``forwards/<vm>.json``)."""
        check_vm_uuid(vm_uuid)
        with self._lock:
            check_forwards(vm_uuid, forwards, self._all_hosts().get(vm_uuid, []),
                           self._all_forwards())
            try:
                self._write_forwards(vm_uuid, list(forwards))
                nft.apply(nft.replace_forwards(self._forward_elements()))
            except (CommandError, OSError) as exc:
                raise NetworkError(f"VM {vm_uuid}: node forwards: {exc}") from exc
        log.info("node forwards set", extra={
            "vm": vm_uuid, "forwards": [f"{f.protocol}/{f.node_port}->{f.vm_ip}:{f.vm_port}"
                                        for f in forwards]})


def dnsmasq_pid(state_dir: Path) -> int | None:
    """The pid of the sandbox dnsmasq of ``state_dir`` if it runs (for tests)."""
    with contextlib.suppress(OSError, ValueError):
        pid = int((state_dir / "dnsmasq.pid").read_text())
        if os.path.exists(f"/proc/{pid}"):
            return pid
    return None
